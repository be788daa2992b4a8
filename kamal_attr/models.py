"""Multi-head ResNet-18 (every net of the paper) and forward-hook feature taps.

:class:`AttributeResNet` reuses torchvision's ``BasicBlock`` and keeps
``torchvision.models.resnet18``'s parameter names (``conv1``, ``bn1``, ``layer1.0.conv1``...),
so ImageNet weights load into it; its base width is configurable (64 as in the paper,
90 for the target net, less for the CPU demo). The classifier is one 2-way head per
attribute, stored as one ``Linear(C, 2 * n)`` whose output is viewed as ``(B, n, 2)``.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Sequence

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval
from torchvision.models.resnet import BasicBlock

from . import KamalError
from .attributes import check_attribute

#: The five feature taps of METHOD.md: conv1's output and the four stages.
TAP_LAYERS: tuple[str, ...] = ("conv1", "layer1", "layer2", "layer3", "layer4")


def tap_channels(width: int) -> tuple[int, ...]:
    """Channel count at each tap for base width ``width`` (64 -> 64, 64, 128, 256, 512)."""
    return (width, width, 2 * width, 4 * width, 8 * width)


class AttributeResNet(nn.Module):
    """ResNet-18 with base ``width`` and one 2-logit head per attribute.

    ``forward`` returns logits of shape ``(batch, len(attributes), 2)``.
    """

    def __init__(self, attributes: Sequence[str], width: int = 64) -> None:
        super().__init__()
        if width < 1:
            raise KamalError(f"--width must be positive, got {width}")
        self.attributes = tuple(check_attribute(a) for a in attributes)
        self.width = width
        self.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        channels = tap_channels(width)[1:]
        self.inplanes = width
        self.layer1 = self._make_layer(channels[0], stride=1)
        self.layer2 = self._make_layer(channels[1], stride=2)
        self.layer3 = self._make_layer(channels[2], stride=2)
        self.layer4 = self._make_layer(channels[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.heads = nn.Linear(channels[3], 2 * len(self.attributes))
        for m in self.modules():  # torchvision's initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _make_layer(self, planes: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes:
            downsample = nn.Sequential(nn.Conv2d(self.inplanes, planes, 1, stride, bias=False),
                                       nn.BatchNorm2d(planes))
        layers = [BasicBlock(self.inplanes, planes, stride, downsample), BasicBlock(planes, planes)]
        self.inplanes = planes
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = torch.flatten(self.avgpool(x), 1)
        return self.heads(x).view(x.shape[0], len(self.attributes), 2)


def fold_batchnorm(net: AttributeResNet) -> AttributeResNet:
    """A frozen copy of ``net`` whose residual blocks' BatchNorms are folded into the
    convolutions before them: ``BN(W x) = (g/s) W x + (b - g m/s)`` in eval mode, so a
    teacher's forward skips 16-20 normalisation passes with the same outputs (up to
    rounding). The stem's ``bn1`` stays: the ``conv1`` tap reads the conv's raw output.
    """
    folded = copy.deepcopy(net).eval()
    for block in (b for layer in (folded.layer1, folded.layer2, folded.layer3, folded.layer4)
                  for b in layer):
        block.conv1, block.bn1 = fuse_conv_bn_eval(block.conv1, block.bn1), nn.Identity()
        block.conv2, block.bn2 = fuse_conv_bn_eval(block.conv2, block.bn2), nn.Identity()
        if block.downsample is not None:
            block.downsample = fuse_conv_bn_eval(*block.downsample)
    return folded.requires_grad_(False)


class FeatureTaps:
    """Reads named modules' outputs through forward hooks registered once.

    After ``model(x)``, :meth:`features` returns the tapped outputs in ``layers`` order.
    Keeps nothing between forwards but the latest outputs; ``remove()`` detaches the hooks.
    """

    def __init__(self, model: nn.Module, layers: Sequence[str] = TAP_LAYERS) -> None:
        modules = dict(model.named_modules())
        missing = [name for name in layers if name not in modules]
        if missing:
            raise KamalError(f"{type(model).__name__} has no module(s) {missing} to tap")
        self.layers = tuple(layers)
        self._outputs: dict[str, torch.Tensor] = {}
        self._handles = [modules[name].register_forward_hook(self._hook(name)) for name in layers]

    def _hook(self, name: str):
        def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            self._outputs[name] = output
        return hook

    def features(self) -> list[torch.Tensor]:
        return [self._outputs[name] for name in self.layers]

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._outputs.clear()


def find_imagenet_weights(weights_dir: str | Path) -> Path | None:
    """The first torchvision ResNet-18 ``.pth`` file in ``weights_dir``, if any."""
    weights_dir = Path(weights_dir)
    files = sorted(weights_dir.glob("*.pth")) if weights_dir.is_dir() else []
    return files[0] if files else None


def load_imagenet_weights(model: AttributeResNet, path: str | Path) -> int:
    """Load a torchvision-format ResNet-18 state dict (``weights_only``) into ``model``.

    The ImageNet classifier (``fc.*``) is dropped: our heads are per attribute. Returns the
    number of tensors loaded. Raises naming the file if it is not such a state dict.
    """
    path = Path(path)
    if model.width != 64:
        raise KamalError(f"ImageNet weights {path} are for width 64, the model has width "
                         f"{model.width}; use --pretrained none or --width 64")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise KamalError(f"pretrained weights {path} do not exist") from None
    except Exception as e:  # pickle errors, truncated files, code-carrying pickles
        raise KamalError(f"cannot load {path} as a state dict (weights_only): {e}") from None
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise KamalError(f"{path} holds a {type(state).__name__}, not a ResNet-18 state dict")
    state = {k.removeprefix("module."): v for k, v in state.items() if not k.startswith("fc.")}
    own = model.state_dict()
    bad = [k for k, v in state.items() if k not in own or own[k].shape != v.shape]
    missing = [k for k in own if not k.startswith("heads.") and k not in state]
    if bad or missing:
        raise KamalError(f"{path} is not a torchvision ResNet-18 state dict "
                         f"(unexpected: {bad[:3]}, missing: {missing[:3]})")
    model.load_state_dict(state, strict=False)
    return len(state)


def describe_init(pretrained: str, width: int, weights_dir: str | Path) -> str:
    """How a source net starts, decided before anything is written: ``"random init"`` or
    ``"ImageNet weights <file>"``.

    ``pretrained``: ``"none"`` is random init; ``"auto"`` needs a ``.pth`` in
    ``weights_dir`` and width 64 (METHOD.md's protocol starts teachers from ImageNet: 50
    epochs from random init would be a different experiment, so it is an error, not a
    warning); anything else is a path to such a file.
    """
    if pretrained == "none":
        return "random init"
    if pretrained == "auto":
        found = find_imagenet_weights(weights_dir)
        if found is None:
            raise KamalError(f"no ImageNet ResNet-18 weights in {weights_dir}: put torchvision's "
                             "resnet18-f37072fd.pth there, or pass --pretrained none to train "
                             "the source nets from random init")
        pretrained = str(found)
    if width != 64:
        raise KamalError(f"ImageNet weights are for width 64, this net has width {width}; "
                         "pass --width 64, or --pretrained none")
    if not Path(pretrained).is_file():
        raise KamalError(f"--pretrained {pretrained}: no such file")
    return f"ImageNet weights {Path(pretrained).name}"


def build_model(attributes: Sequence[str], width: int, pretrained: str,
                weights_dir: str | Path) -> tuple[AttributeResNet, str]:
    """Build a net and initialise it as :func:`describe_init` says; returns
    ``(model, description of the init)``."""
    init = describe_init(pretrained, width, weights_dir)
    model = AttributeResNet(attributes, width)
    if pretrained != "none":
        load_imagenet_weights(model, find_imagenet_weights(weights_dir) if pretrained == "auto"
                              else pretrained)
    return model, init
