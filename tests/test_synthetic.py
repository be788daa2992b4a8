import numpy as np

from kamal_attr.attributes import CELEBA_ATTRIBUTES
from kamal_attr.celeba import CelebA, read_attribute_list
from kamal_attr.synthetic import STYLE_SKEW, assign_styles, generate, sample_faces, split_sizes

#: CelebA's prevalences the issue names, and a tolerance for a 20 000-face sample.
CELEBA_PREVALENCE = {"Male": 0.42, "Young": 0.77, "Smiling": 0.48, "Black_Hair": 0.24,
                     "Blond_Hair": 0.15, "Eyeglasses": 0.07}


def test_prevalences_near_celeba():
    faces = sample_faces(20000, np.random.default_rng(0))
    for attribute, target in CELEBA_PREVALENCE.items():
        assert abs(faces[attribute].mean() - target) < 0.02, attribute
    assert all(0.01 < faces[a].mean() < 0.99 for a in CELEBA_ATTRIBUTES)


def test_dependencies_hold_in_the_clean_truth():
    f = sample_faces(20000, np.random.default_rng(1))
    colours = f["Black_Hair"].astype(int) + f["Blond_Hair"] + f["Brown_Hair"] + f["Gray_Hair"]
    assert colours.max() == 1 and not (colours[f["Bald"]]).any()
    female = ~f["Male"]
    assert not (f["Goatee"] | f["Mustache"] | ~f["No_Beard"] | f["5_o_Clock_Shadow"])[female].any()
    assert f["Heavy_Makeup"][f["Male"]].mean() < 0.03 < 0.5 < f["Heavy_Makeup"][female].mean()
    assert f["Gray_Hair"][f["Young"]].mean() < 0.02 < 0.1 < f["Gray_Hair"][~f["Young"]].mean()
    assert not (f["Straight_Hair"] & f["Wavy_Hair"]).any()


def test_training_thirds_are_style_skewed():
    styles = assign_styles(3000, 600, np.random.default_rng(0))
    for k in range(3):
        block = styles[k * 1000:(k + 1) * 1000]
        assert abs((block == k).mean() - STYLE_SKEW) < 0.05
    assert abs((styles[3000:] == 0).mean() - 1 / 3) < 0.07


def test_layout_noise_and_determinism(tmp_path, synthetic_root):
    again = generate(tmp_path / "again", num_images=54, seed=1, workers=2)
    for name in ("list_attr_celeba.txt", "list_eval_partition.txt", "list_style_synthetic.txt"):
        assert (again / name).read_bytes() == (synthetic_root / name).read_bytes()
    for image in ("000001.jpg", "000054.jpg"):
        assert (again / "img_align_celeba" / image).read_bytes() == \
            (synthetic_root / "img_align_celeba" / image).read_bytes()
    other = generate(tmp_path / "other", num_images=54, seed=2, workers=1)
    assert (other / "list_attr_celeba.txt").read_bytes() != (synthetic_root / "list_attr_celeba.txt").read_bytes()
    names, noisy = read_attribute_list(synthetic_root / "list_attr_celeba.txt")
    _, clean = read_attribute_list(synthetic_root / "list_attr_celeba_clean.txt")
    assert names[0] == "000001.jpg" and noisy.shape == clean.shape == (54, 40)
    assert 0 < (noisy != clean).mean() < 0.05  # a few percent of labels flipped
    sizes = [len(CelebA(synthetic_root, s, ["Male"], image_size=32)) for s in ("train", "val", "test")]
    assert sizes == list(split_sizes(54)) == [32, 5, 17]



def test_a_dataset_drawn_by_an_older_generator_is_other_data_and_is_drawn_again(tmp_path):
    """Same lists, other drawings: the digest (hence caches and recipes) must change, and
    the demo redraws a dataset of ours made by an older version (issue 11's review)."""
    import json
    from types import SimpleNamespace
    from kamal_attr.celeba import find_celeba, list_digest
    from kamal_attr.runtime import demo_data_needed
    from kamal_attr.synthetic import DRAWING, MARKER
    root = generate(tmp_path / "synthetic", num_images=12, seed=1, workers=1)
    cfg = SimpleNamespace(demo=True, data_root=root)
    assert json.loads((root / MARKER).read_text())["drawing"] == DRAWING
    assert not demo_data_needed(cfg)
    new = list_digest(find_celeba(root))
    (root / MARKER).write_text(json.dumps({"num_images": 12, "seed": 1}))  # before versions
    assert demo_data_needed(cfg)
    assert list_digest(find_celeba(root)) != new
