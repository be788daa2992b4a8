"""Multi-head ResNets (ResNet-18 for every net of the paper; ResNet-34/50 for teacher pools
of mixed architectures), forward-hook feature taps, and what a teacher needs to be fed.

:class:`AttributeResNet` reuses torchvision's ``BasicBlock``/``Bottleneck`` and keeps
``torchvision.models.resnet*``'s parameter names (``conv1``, ``bn1``, ``layer1.0.conv1``...),
so ImageNet weights load into it; its base width is configurable (64 as in the paper,
90 for the target net, less for the CPU demo). The classifier is one 2-way head per
attribute, stored as one ``Linear(C, 2 * n)`` whose output is viewed as ``(B, n, 2)``.
"""
from __future__ import annotations

import copy
import functools
import hashlib
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval
from torch.utils.flop_counter import FlopCounterMode
from torchvision.models.resnet import BasicBlock, Bottleneck

from . import KamalError, load_failure
from .attributes import check_attribute
from .precision import float32_region

#: The five feature taps of METHOD.md: conv1's output and the four stages.
TAP_LAYERS: tuple[str, ...] = ("conv1", "layer1", "layer2", "layer3", "layer4")

#: torchvision's ResNet definitions: block type and blocks per stage.
ARCHS: dict[str, tuple[type[nn.Module], tuple[int, ...]]] = {
    "resnet18": (BasicBlock, (2, 2, 2, 2)),
    "resnet34": (BasicBlock, (3, 4, 6, 3)),
    "resnet50": (Bottleneck, (3, 4, 6, 3)),
}


def check_arch(arch: str) -> str:
    if arch not in ARCHS:
        raise KamalError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHS)}")
    return arch


def tap_channels(width: int, arch: str = "resnet18") -> tuple[int, ...]:
    """Channel count at each tap for base width ``width``: ResNet-18/34 at 64 -> 64, 64, 128,
    256, 512; ResNet-50 (bottlenecks expand 4x) -> 64, 256, 512, 1024, 2048."""
    expansion = ARCHS[check_arch(arch)][0].expansion
    return (width,) + tuple(width * m * expansion for m in (1, 2, 4, 8))


class AttributeResNet(nn.Module):
    """A torchvision ResNet (``arch``) with base ``width`` and one 2-logit head per attribute.

    ``forward`` returns logits of shape ``(batch, len(attributes), 2)``.
    """

    def __init__(self, attributes: Sequence[str], width: int = 64, arch: str = "resnet18") -> None:
        super().__init__()
        if width < 1:
            raise KamalError(f"--width must be positive, got {width}")
        block, depths = ARCHS[check_arch(arch)]
        self.attributes = tuple(check_attribute(a) for a in attributes)
        self.width, self.arch = width, arch
        self.tap_channels = tap_channels(width, arch)
        self.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.inplanes = width
        self.layer1 = self._make_layer(block, width, depths[0], stride=1)
        self.layer2 = self._make_layer(block, 2 * width, depths[1], stride=2)
        self.layer3 = self._make_layer(block, 4 * width, depths[2], stride=2)
        self.layer4 = self._make_layer(block, 8 * width, depths[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.heads = nn.Linear(self.tap_channels[-1], 2 * len(self.attributes))
        for m in self.modules():  # torchvision's initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _make_layer(self, block: type[nn.Module], planes: int, blocks: int,
                    stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride, bias=False),
                nn.BatchNorm2d(planes * block.expansion))
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = torch.flatten(self.avgpool(x), 1)
        # The heads in float32 under autocast too: bf16 logits (8-bit mantissas) would blur
        # the logit loss's targets and tie close calls, which argmax gives to class 0.
        with float32_region(x.device.type):
            return self.heads(x.float()).view(x.shape[0], len(self.attributes), 2)


def fold_batchnorm(net: AttributeResNet) -> AttributeResNet:
    """A frozen copy of ``net`` whose residual blocks' BatchNorms are folded into the
    convolutions before them: ``BN(W x) = (g/s) W x + (b - g m/s)`` in eval mode, so a
    teacher's forward skips 16-20 normalisation passes with the same outputs (up to
    rounding). The stem's ``bn1`` stays: the ``conv1`` tap reads the conv's raw output.
    """
    folded = copy.deepcopy(net).eval()
    for block in (b for layer in (folded.layer1, folded.layer2, folded.layer3, folded.layer4)
                  for b in layer):
        for k in (1, 2, 3) if isinstance(block, Bottleneck) else (1, 2):
            conv, bn = getattr(block, f"conv{k}"), getattr(block, f"bn{k}")
            setattr(block, f"conv{k}", fuse_conv_bn_eval(conv, bn))
            setattr(block, f"bn{k}", nn.Identity())
        if block.downsample is not None:
            block.downsample = fuse_conv_bn_eval(*block.downsample)
    return folded.requires_grad_(False)


class InputAdapter(nn.Module):
    """Feeds a teacher its own input from a batch prepared for the student.

    A batch normalised as ``x = (p - m_s) / s_s`` at the student's size is turned into
    ``(resize(p) - m_t) / s_t`` at the teacher's size: the same view of the same images
    (eval and train views are scale-free crops), in the teacher's normalisation.
    """

    def __init__(self, image_size: int, mean: Sequence[float], std: Sequence[float],
                 from_mean: Sequence[float], from_std: Sequence[float]) -> None:
        super().__init__()
        self.image_size = image_size
        view = lambda v: torch.tensor(v, dtype=torch.float32).view(1, 3, 1, 1)  # noqa: E731
        # x_t = x_s * (s_s / s_t) + (m_s - m_t) / s_t, one multiply-add per pixel
        self.register_buffer("scale", view(from_std) / view(std), persistent=False)
        self.register_buffer("shift", (view(from_mean) - view(mean)) / view(std), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear",
                              align_corners=False, antialias=True)
        return x * self.scale + self.shift


def input_adapter(record: dict, image_size: int, mean: Sequence[float],
                  std: Sequence[float]) -> nn.Module:
    """``nn.Identity`` for a net trained on this run's input (size ``image_size``, ``mean``,
    ``std``), else the :class:`InputAdapter` that feeds it what its record says it saw."""
    same = (record["image_size"] == image_size and list(record["mean"]) == list(mean)
            and list(record["std"]) == list(std))
    return nn.Identity() if same else InputAdapter(record["image_size"], record["mean"],
                                                   record["std"], mean, std)


def tap_shapes(net: AttributeResNet, image_size: int) -> list[tuple[int, int, int]]:
    """``(C, H, W)`` at each tap for a ``image_size`` input, from a forward on the ``meta``
    device (shapes only: no memory, no arithmetic)."""
    probe = copy.deepcopy(net).to("meta").eval()
    taps = FeatureTaps(probe)
    probe(torch.empty(1, 3, image_size, image_size, device="meta"))
    return [tuple(f.shape[1:]) for f in taps.features()]


def check_tap_sizes(student: AttributeResNet, student_size: int,
                    teachers: Sequence[tuple[str, AttributeResNet, int]]) -> None:
    """The feature loss compares each teacher's taps with the student's (through 1x1
    bridges, which map channels, not space): every teacher's ``H x W`` at every tap must be
    the student's. ``teachers`` holds ``(name, net, its input size)``; raises naming the
    first teacher that differs."""
    want = [s[1:] for s in tap_shapes(student, student_size)]
    sizes = sorted({size for _, _, size in teachers})
    for name, net, size in teachers:
        got = [s[1:] for s in tap_shapes(net, size)]
        if got != want:
            fmt = lambda sizes: ", ".join(f"{h}x{w}" for h, w in sizes)  # noqa: E731
            # one input size for all teachers: the student can take it; several: no size fits
            fix = (f"pass --image_size {size}" if len(sizes) == 1 else
                   f"the teachers were trained at {', '.join(map(str, sizes))} px, so no one "
                   "--image_size fits them all: use teachers of one size")
            raise KamalError(f"teacher {name} ({net.arch}, {size} px) has taps of {fmt(got)}, "
                             f"the student at {student_size} px has {fmt(want)}: the feature loss "
                             f"needs equal sizes; {fix}, or pass --no_feature_loss")


def net_cost(net: nn.Module, image_size: int) -> dict[str, float]:
    """Parameters and MFLOPs of one forward for one ``image_size`` image, counted by
    ``torch.utils.flop_counter`` (2 FLOPs per multiply-add; convolutions and matrix
    products, which are nearly all of a ResNet's arithmetic)."""
    counter = FlopCounterMode(display=False)
    probe = copy.deepcopy(net).cpu().eval()
    with counter, torch.no_grad():
        probe(torch.zeros(1, 3, image_size, image_size))
    return {"params": sum(p.numel() for p in net.parameters()),
            "mflops": counter.get_total_flops() / 1e6}


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


def find_imagenet_weights(weights_dir: str | Path, arch: str = "resnet18") -> Path | None:
    """The first ``.pth`` file named after ``arch`` in ``weights_dir`` (torchvision's names:
    ``resnet18-f37072fd.pth``, ``resnet34-b627a593.pth``, ``resnet50-0676ba61.pth``), if any."""
    weights_dir = Path(weights_dir)
    files = sorted(weights_dir.glob("*.pth")) if weights_dir.is_dir() else []
    named = [f for f in files if f.name.startswith(arch)]
    if named:
        return named[0]
    # a lone file named otherwise (as older versions accepted): its shapes are checked on loading
    others = [f for f in files if not f.name.startswith(tuple(ARCHS))]
    return others[0] if len(files) == 1 and others else None


def load_imagenet_weights(model: AttributeResNet, path: str | Path) -> int:
    """Load a torchvision-format ResNet state dict (``weights_only``) of the model's
    architecture into ``model``.

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
        raise KamalError(f"cannot load {path} as a state dict (weights_only): "
                         f"{load_failure(path, e)}") from None
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise KamalError(f"{path} holds a {type(state).__name__}, not a {model.arch} state dict")
    state = {k.removeprefix("module."): v for k, v in state.items() if not k.startswith("fc.")}
    own = model.state_dict()
    bad = [k for k, v in state.items() if k not in own or own[k].shape != v.shape]
    missing = [k for k in own if not k.startswith("heads.") and k not in state]
    if bad or missing:
        raise KamalError(f"{path} is not a torchvision {model.arch} state dict "
                         f"(unexpected: {bad[:3]}, missing: {missing[:3]})")
    model.load_state_dict(state, strict=False)
    return len(state)


def describe_init(pretrained: str, width: int, weights_dir: str | Path,
                  arch: str = "resnet18") -> str:
    """How a source net starts, decided before anything is written: ``"random init"`` or
    ``"ImageNet weights <file name> (sha256 <16 hex digits of its bytes>)"``.

    ``pretrained``: ``"none"`` is random init; ``"auto"`` needs a ``.pth`` in
    ``weights_dir`` and width 64 (METHOD.md's protocol starts teachers from ImageNet: 50
    epochs from random init would be a different experiment, so it is an error, not a
    warning); anything else is a path to such a file.
    """
    if pretrained == "none":
        return "random init"
    if pretrained == "auto":
        found = find_imagenet_weights(weights_dir, arch)
        if found is None:
            example = {"resnet18": "resnet18-f37072fd.pth", "resnet34": "resnet34-b627a593.pth",
                       "resnet50": "resnet50-0676ba61.pth"}[arch]
            raise KamalError(f"no ImageNet {arch} weights in {weights_dir}: put torchvision's "
                             f"{example} there, or pass --pretrained none to train "
                             "the source nets from random init")
        pretrained = str(found)
    if width != 64:
        raise KamalError(f"ImageNet weights are for width 64, this net has width {width}; "
                         "pass --width 64, or --pretrained none")
    if not Path(pretrained).is_file():
        raise KamalError(f"--pretrained {pretrained}: no such file")
    return f"ImageNet weights {Path(pretrained).name} (sha256 {file_digest(pretrained)})"


@functools.lru_cache(maxsize=8)
def _file_digest(path: Path, size: int, mtime_ns: int) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()[:16]


def file_digest(path: str | Path) -> str:
    """SHA-256 (16 hex digits) of a file's bytes, read once per version of the file: the
    starting weights enter a source net's recipe by content, not by name."""
    path = Path(path).resolve()
    st = path.stat()
    return _file_digest(path, st.st_size, st.st_mtime_ns)


def build_model(attributes: Sequence[str], width: int, pretrained: str,
                weights_dir: str | Path, arch: str = "resnet18") -> tuple[AttributeResNet, str]:
    """Build a net and initialise it as :func:`describe_init` says; returns
    ``(model, description of the init)``."""
    init = describe_init(pretrained, width, weights_dir, arch)
    model = AttributeResNet(attributes, width, arch)
    if pretrained != "none":
        load_imagenet_weights(model, find_imagenet_weights(weights_dir, arch)
                              if pretrained == "auto" else pretrained)
    return model, init
