import pytest
import torch
import torchvision

from kamal_attr import KamalError
from kamal_attr.models import (AttributeResNet, FeatureTaps, build_model, describe_init,
                               load_imagenet_weights, tap_channels)


def test_parameter_names_match_torchvision_resnet18():
    ours = {k: v.shape for k, v in AttributeResNet(["Male"], 64).state_dict().items()
            if not k.startswith("heads.")}
    theirs = {k: v.shape for k, v in torchvision.models.resnet18().state_dict().items()
              if not k.startswith("fc.")}
    assert ours == theirs


@pytest.mark.parametrize("width", [8, 16, 90])
def test_heads_and_taps(width):
    model = AttributeResNet(["Male", "Young", "Smiling"], width).eval()
    taps = FeatureTaps(model)
    logits = model(torch.randn(2, 3, 64, 64))
    assert logits.shape == (2, 3, 2)
    features = taps.features()
    assert [f.shape[1] for f in features] == list(tap_channels(width))
    assert [f.shape[-1] for f in features] == [32, 16, 8, 4, 2]
    taps.remove()
    model(torch.randn(1, 3, 32, 32))
    with pytest.raises(KeyError):
        taps.features()


def test_taps_reject_unknown_layers():
    with pytest.raises(KamalError, match="no module"):
        FeatureTaps(AttributeResNet(["Male"], 8), ["conv1", "layer9"])


def test_imagenet_weights_load_from_a_torchvision_file(tmp_path):
    reference = torchvision.models.resnet18()
    path = tmp_path / "resnet18-f37072fd.pth"
    torch.save(reference.state_dict(), path)
    model, init = build_model(["Male", "Young"], 64, "auto", tmp_path)
    assert init.startswith("ImageNet weights resnet18-f37072fd.pth (sha256 ")
    assert torch.equal(model.layer3[1].conv2.weight, reference.layer3[1].conv2.weight)
    assert torch.equal(model.bn1.running_mean, reference.bn1.running_mean)
    # the init enters the source net's recipe by content: other weights under the same
    # name (another folder, or the file replaced) are another init, the same bytes are not
    other = tmp_path / "other" / path.name
    other.parent.mkdir()
    torch.save(torchvision.models.resnet18().state_dict(), other)
    assert describe_init(str(other), 64, tmp_path) != init
    copy = tmp_path / "copy" / path.name
    copy.parent.mkdir()
    copy.write_bytes(path.read_bytes())
    assert describe_init(str(copy), 64, tmp_path) == init


def test_bad_weight_files_fail_clearly(tmp_path):
    bad = tmp_path / "bad.pth"
    torch.save({"conv1.weight": torch.zeros(3)}, bad)
    with pytest.raises(KamalError, match="not a torchvision resnet18"):
        load_imagenet_weights(AttributeResNet(["Male"], 64), bad)
    (tmp_path / "junk.pth").write_bytes(b"garbage")
    with pytest.raises(KamalError, match="cannot load .*junk.pth"):
        load_imagenet_weights(AttributeResNet(["Male"], 64), tmp_path / "junk.pth")
    with pytest.raises(KamalError, match="width 64"):
        load_imagenet_weights(AttributeResNet(["Male"], 16), bad)


def test_missing_imagenet_weights_are_an_error_unless_random_init_is_asked_for(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(KamalError, match="resnet18-f37072fd.pth there, or pass --pretrained none"):
        build_model(["Male"], 64, "auto", tmp_path / "empty")
    with pytest.raises(KamalError, match="width 64"):
        describe_init(str(tmp_path / "x.pth"), 16, tmp_path)
    _, init = build_model(["Male"], 16, "none", tmp_path)
    assert init == "random init"


def test_channels_last_placement_keeps_the_outputs():
    from torch.utils.data import TensorDataset, DataLoader
    from kamal_attr.engine import place, predict
    torch.manual_seed(0)
    net = AttributeResNet(["Bangs", "Male"], width=4).eval()
    images = torch.randn(6, 3, 32, 32)
    with torch.no_grad():
        expected = net(images)
    loader = DataLoader(TensorDataset(images, torch.zeros(6, 2), torch.arange(6)), batch_size=3)
    logits, _ = predict(net, loader, torch.device("cpu"))
    assert net.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(logits, expected, atol=1e-5)
    assert place(net, torch.device("cpu")) is net


def test_imagenet_weights_are_found_by_architecture(tmp_path):
    from kamal_attr.models import find_imagenet_weights
    (tmp_path / "resnet50-0676ba61.pth").write_bytes(b"")
    assert find_imagenet_weights(tmp_path, "resnet18") is None  # another architecture's file
    assert find_imagenet_weights(tmp_path, "resnet50").name == "resnet50-0676ba61.pth"
    other = tmp_path / "lone"
    other.mkdir()
    (other / "imagenet.pth").write_bytes(b"")  # one file named otherwise: tried (shapes checked)
    assert find_imagenet_weights(other, "resnet34").name == "imagenet.pth"
