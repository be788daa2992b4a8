import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from kamal_attr.attributes import CELEBA_ATTRIBUTES
from kamal_attr.celeba import CelebA, CelebAError, find_celeba, read_attribute_list
from kamal_attr.cli import one_line

from conftest import write_celeba

ATTRS = ["Male", "Young", "Black_Hair"]


def columns(labels):
    return labels[:, [CELEBA_ATTRIBUTES.index(a) for a in ATTRS]]


@pytest.mark.parametrize("layout", [
    dict(kind="official"),
    dict(kind="official", lists_dir="split", image_dir="Img/img_align_celeba"),
    dict(kind="official", lists_dir="celeba", image_dir="celeba/img_align_celeba"),  # torchvision
    dict(kind="kaggle", image_dir="img_align_celeba/img_align_celeba"),
    dict(kind="official", newline="\r\n", sep="   "),  # CRLF and runs of spaces
    dict(kind="kaggle", newline="\r\n"),
])
def test_layouts_read_the_same_labels(tmp_path, layout):
    labels = write_celeba(tmp_path, n=6, **layout)
    data = CelebA(tmp_path, "train", ATTRS, image_size=16)
    assert len(data) == 2  # partition i % 3 == 0: images 1 and 4
    image, y, index = data[1]
    assert image.shape == (3, 16, 16) and index == 1
    assert torch.equal(data.labels, torch.from_numpy(columns(labels)[[0, 3]]).long())
    assert set(np.unique(data.labels.numpy())) <= {0, 1}


def test_layout_is_reported(tmp_path):
    write_celeba(tmp_path, kind="kaggle", image_dir="img_align_celeba/img_align_celeba")
    layout = find_celeba(tmp_path)
    assert layout.kind == "kaggle" and layout.image_dir.name == "img_align_celeba"
    assert layout.image_dir.parent.name == "img_align_celeba"


def test_minus_one_maps_to_zero(tmp_path):
    labels = write_celeba(tmp_path, n=3)
    names, parsed = read_attribute_list(tmp_path / "list_attr_celeba.txt")
    assert names == ["000001.jpg", "000002.jpg", "000003.jpg"]
    assert parsed.dtype == np.uint8 and np.array_equal(parsed, labels)


def test_parts_are_disjoint_and_cover_the_split(tmp_path):
    write_celeba(tmp_path, n=30)
    whole = CelebA(tmp_path, "train", ATTRS, image_size=8).files
    parts = [CelebA(tmp_path, "train", ATTRS, image_size=8, part=(k, 3)).files for k in (1, 2, 3)]
    assert sum(parts, []) == whole and all(parts)


def corrupt(path, line, text):
    lines = path.read_text().splitlines()
    lines[line - 1] = text
    path.write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize("damage, message", [
    (lambda r: corrupt(r / "list_attr_celeba.txt", 4, "000002.jpg 1 -1"),
     r"list_attr_celeba.txt:4: expected a file name and 40 values, got 3 fields"),
    (lambda r: corrupt(r / "list_attr_celeba.txt", 3, "000001.jpg " + " ".join(["0"] * 40)),
     r"list_attr_celeba.txt:3: attribute values must be 1 or -1, got '0'"),
    (lambda r: corrupt(r / "list_attr_celeba.txt", 1, "7"), r"line 1 says 7 images but 6"),
    (lambda r: corrupt(r / "list_attr_celeba.txt", 2, "Male Young"), r"list_attr_celeba.txt:2: expected the 40"),
    (lambda r: corrupt(r / "list_eval_partition.txt", 2, "000002.jpg 5"),
     r"list_eval_partition.txt:2: expected 'file_name 0\|1\|2'"),
    (lambda r: (r / "list_attr_celeba.txt").write_text("<!DOCTYPE html><html>Quota exceeded</html>"),
     r"list_attr_celeba.txt is an HTML page"),
    (lambda r: (r / "list_eval_partition.txt").unlink(), r"no partition list"),
    (lambda r: (r / "img_align_celeba" / "000004.jpg").unlink(), r"image missing: .*000004.jpg"),
    (lambda r: [p.unlink() for p in (r / "img_align_celeba").iterdir()], r"no image folder"),
])
def test_malformed_input_names_file_and_line(tmp_path, damage, message):
    write_celeba(tmp_path, n=6)
    damage(tmp_path)
    with pytest.raises(CelebAError, match=message):
        CelebA(tmp_path, "train", ATTRS, image_size=8)


def test_missing_root_and_empty_root(tmp_path):
    with pytest.raises(CelebAError, match="does not exist"):
        find_celeba(tmp_path / "nowhere")
    with pytest.raises(CelebAError, match="no CelebA under"):
        find_celeba(tmp_path)


def test_undecodable_image_is_named_also_from_a_worker(tmp_path):
    write_celeba(tmp_path, n=6)
    (tmp_path / "img_align_celeba" / "000004.jpg").write_bytes(b"not a jpeg")
    data = CelebA(tmp_path, "train", ATTRS, image_size=8)
    with pytest.raises(CelebAError, match=r"cannot decode .*000004.jpg"):
        data[1]
    with pytest.raises(CelebAError) as info:
        list(DataLoader(data, batch_size=2, num_workers=1))
    assert one_line(info.value).startswith("cannot decode ") and "000004.jpg" in one_line(info.value)
