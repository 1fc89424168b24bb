"""The networks and input layers of the official randomized-smoothing code, under its
state_dict names, and the loader of its released checkpoints.

Official code (read for names and shapes; nothing here is copied from it):

* Cohen et al., ``locuslab/smoothing``: ``code/archs/cifar_resnet.py`` (the CIFAR ResNet of
  bearpaw/pytorch-classification), ``code/architectures.py`` (``cifar_resnet20``,
  ``cifar_resnet110``; ``resnet50`` = torchvision's ResNet-50 inside ``DataParallel``) and
  ``code/datasets.py`` (``NormalizeLayer``, the CIFAR-10 and ImageNet mean/std).
* Salman et al. (SmoothAdv), ``Hadisalman/smoothing-adversarial``: the same networks, plus
  ``InputCenterLayer`` (subtract the mean only), used by most of their released models.

An official model is ``Sequential(input_layer, classifier)`` and its file is
``torch.save({"epoch", "arch", "state_dict", "optimizer"})``. The input layer keeps its mean
(and std) as plain tensors, not buffers, so the state dict holds only the classifier:
``1.conv1.weight``, ``1.layer1.0.bn1.running_mean``, ``1.fc.bias`` ... for the CIFAR ResNets and
``1.module.conv1.weight`` ... for ImageNet (the ResNet-50 is wrapped in ``DataParallel``).
Which input layer a file needs cannot be read from it; it is the ``input_layer`` choice.

In bench the input layer is :class:`~bench.models.defended.DefendedModel`'s ``normalize``
module (buffers ``normalize.mean`` and ``normalize.std``), so the classifier's keys map to
``net.<name>`` and the normalization runs exactly once, with the official constants.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from bench.errors import BenchError, CheckpointError
from bench.models.defended import DefendedModel
from bench.models.names import COHEN_ARCH_NAMES, INPUT_LAYERS
from bench.models.normalize import Normalize

if TYPE_CHECKING:
    from bench.data.base import DatasetSpec

__all__ = ["CIFAR_DEPTHS", "OFFICIAL_STATS", "CifarBasicBlock", "CifarResNet", "InputCenterLayer", "NormalizeLayer",
           "build_cohen_model", "cohen_backbone", "cohen_to_bench", "imagenet_resnet50", "input_layer",
           "load_cohen_state_dict", "looks_official", "official_arch", "official_stats", "split_official"]

# The official code's constants (datasets.py), by bench dataset name. Other datasets use their own.
OFFICIAL_STATS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}
CIFAR_DEPTHS = {"cifar_resnet20": 20, "cifar_resnet110": 110}


# -- networks ----------------------------------------------------------------------------------
def _init_conv(conv: nn.Conv2d) -> None:
    # N(0, 2 / (k*k*out_channels)), the official initialisation, which is He's with fan_out
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")


class CifarBasicBlock(nn.Module):
    """3x3 conv, BN, ReLU, 3x3 conv, BN; add the input (through ``downsample``, a 1x1 conv and
    BN, when the shape changes); ReLU. Submodule names are the official ones."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                                            nn.BatchNorm2d(planes))
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class CifarResNet(nn.Module):
    """The CIFAR ResNet of depth 6n+2 (He et al., 2016, section 4.2): a 16-channel 3x3 stem,
    three stages of n basic blocks (16, 32, 64 channels; stride 2 at the start of stages 2
    and 3), global average pooling and ``fc``.

    Names as in the official file (``conv1``, ``bn1``, ``layer1``-``layer3``, ``fc``). The
    official ``AvgPool2d(8)`` only fits 32 px inputs; adaptive pooling gives the same result
    there and also works at other sizes. ``in_channels`` (3 officially) follows the dataset.
    """

    def __init__(self, depth: int = 110, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise BenchError(f"CIFAR ResNet depth must be 6n+2 with n >= 1 (20, 32, 44, 56, 110, ...), got {depth}")
        n = (depth - 2) // 6
        self.depth = depth
        self.conv1 = nn.Conv2d(in_channels, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU()
        self.layer1 = self._stage(16, 16, n, 1)
        self.layer2 = self._stage(16, 32, n, 2)
        self.layer3 = self._stage(32, 64, n, 2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                _init_conv(m)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    @staticmethod
    def _stage(in_planes: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
        return nn.Sequential(*(CifarBasicBlock(in_planes if i == 0 else planes, planes, stride if i == 0 else 1)
                               for i in range(blocks)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        return self.fc(self.avgpool(out).flatten(1))


def imagenet_resnet50(num_classes: int = 1000, in_channels: int = 3) -> nn.Module:
    """torchvision's ResNet-50 (random weights), as the official code builds it; a stem for
    ``in_channels`` other than 3 keeps the name ``conv1``."""
    from torchvision.models import resnet50

    net = resnet50(weights=None, num_classes=num_classes)
    if in_channels != 3:
        net.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
        _init_conv(net.conv1)
    return net


def cohen_backbone(arch: str, in_channels: int, num_classes: int) -> nn.Module:
    """The classifier part of an official model (without its input layer)."""
    if arch in CIFAR_DEPTHS:
        return CifarResNet(CIFAR_DEPTHS[arch], num_classes, in_channels)
    if arch == "resnet50":
        return imagenet_resnet50(num_classes, in_channels)
    raise BenchError(f"unknown official smoothing architecture '{arch}'; known: {', '.join(COHEN_ARCH_NAMES)}")


# -- input layers ------------------------------------------------------------------------------
class NormalizeLayer(Normalize):
    """The official ``NormalizeLayer``: ``(x - mean) / std`` per channel (buffers ``mean``, ``std``)."""

    kind = "normalize"


class InputCenterLayer(Normalize):
    """The official ``InputCenterLayer``: ``x - mean`` per channel, no scaling.

    It keeps a ``std`` buffer of ones so that its state dict has the same keys as
    :class:`NormalizeLayer`'s (``DefendedModel``'s ``normalize.mean`` and ``normalize.std``).
    """

    kind = "center"

    def __init__(self, mean: Sequence[float]) -> None:
        super().__init__(mean, [1.0] * len(mean))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x - self.mean


def official_stats(spec: DatasetSpec) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The mean and std of the official input layers for ``spec``'s dataset (CIFAR-10 and
    ImageNet: the official constants; other datasets: their own)."""
    return OFFICIAL_STATS.get(spec.name, (tuple(spec.mean), tuple(spec.std)))


def input_layer(kind: str, mean: Sequence[float], std: Sequence[float]) -> Normalize:
    """``normalize`` -> :class:`NormalizeLayer`, ``center`` -> :class:`InputCenterLayer` (std unused)."""
    if kind == "normalize":
        return NormalizeLayer(mean, std)
    if kind == "center":
        return InputCenterLayer(mean)
    raise BenchError(f"unknown input_layer '{kind}'; known: {', '.join(INPUT_LAYERS)}")


def build_cohen_model(spec: DatasetSpec, image_size: int, arch: str,
                      input_layer_kind: str = "normalize") -> DefendedModel:
    """An untrained official-architecture model for ``spec``: ``input_layer_kind`` then ``arch``.

    The model records ``cohen_arch`` and ``input_layer``, which :func:`load_cohen_state_dict` checks.
    """
    net = cohen_backbone(arch, spec.channels, spec.num_classes)
    mean, std = official_stats(spec)
    model = DefendedModel(net, mean, std, spec.shape(image_size), spec.num_classes, spec.task)
    model.normalize = input_layer(input_layer_kind, mean, std)
    # plain attributes of this model: nn.Module's __setattr__ is typed for tensors and modules only
    model.cohen_arch = arch  # type: ignore[assignment]
    model.input_layer = input_layer_kind  # type: ignore[assignment]
    return model


# -- checkpoints -------------------------------------------------------------------------------
_PREFIX = "module."
_INPUT_LAYER_KEYS = {frozenset({"means", "sds"}): "normalize", frozenset({"means"}): "center"}
_IMAGENET_RESNETS: dict[tuple[bool, tuple[int, ...]], str] = {  # (bottleneck, blocks per stage) -> arch
    (False, (2, 2, 2, 2)): "resnet18", (False, (3, 4, 6, 3)): "resnet34",
    (True, (3, 4, 6, 3)): "resnet50", (True, (3, 4, 23, 3)): "resnet101",
    (True, (3, 8, 36, 3)): "resnet152",
}
_OFFICIAL_NAME = {"normalize": "NormalizeLayer (input_layer=normalize)",
                  "center": "InputCenterLayer (input_layer=center)"}


def _strip(state: Mapping[str, Any]) -> dict[str, Any]:
    keys = [str(k) for k in state]
    if keys and all(k.startswith(_PREFIX) for k in keys):
        return {str(k)[len(_PREFIX):]: v for k, v in state.items()}
    return {str(k): v for k, v in state.items()}


def _listed(items: Sequence[str], limit: int = 4) -> str:
    from bench.training.checkpoints import listed

    return listed(items, limit)


def split_official(state: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any], list[str]]:
    """``Sequential(input_layer, classifier)`` keys -> (input layer, classifier, stray keys).

    A leading ``module.`` on every key (a DataParallel around the whole model) and a
    ``module.`` after ``1.`` (the official ImageNet ResNet-50 inside DataParallel) are removed.
    """
    layer: dict[str, Any] = {}
    classifier: dict[str, Any] = {}
    stray: list[str] = []
    for key, value in _strip(state).items():
        head, _, rest = key.partition(".")
        if head == "0" and rest:
            layer[rest] = value
        elif head == "1" and rest:
            classifier[rest[len(_PREFIX):] if rest.startswith(_PREFIX) else rest] = value
        else:
            stray.append(key)
    return layer, classifier, stray


def official_arch(classifier: Mapping[str, Any]) -> str:
    """The official architecture name a classifier state dict has the layout of, read from its
    keys: ``cifar_resnet{6n+2}`` (n basic blocks per stage), ``resnet50`` (and the other
    torchvision ResNets), or a description when it is neither."""
    keys = list(classifier)
    if "conv1.weight" not in classifier or "fc.weight" not in classifier:
        return "an unrecognised network (no conv1 and fc)"

    def blocks(stage: int) -> int:
        pattern = re.compile(rf"^layer{stage}\.(\d+)\.")
        return len({m.group(1) for k in keys if (m := pattern.match(k))})

    bottleneck = "layer1.0.conv3.weight" in classifier
    counts = tuple(blocks(stage) for stage in (1, 2, 3, 4))
    if counts[3]:
        return _IMAGENET_RESNETS.get((bottleneck, counts), f"an ImageNet-style ResNet with {counts} blocks")
    n = counts[0]
    if n and counts == (n, n, n, 0):
        return f"cifar_resnet{(9 if bottleneck else 6) * n + 2}" + (" with bottleneck blocks" if bottleneck else "")
    return f"an unrecognised network ({counts[:3]} blocks in layer1-layer3)"


def looks_official(state: Mapping[str, Any]) -> str | None:
    """The official architecture of ``state`` if it has the official naming, else None."""
    layer, classifier, stray = split_official(state)
    if stray or "conv1.weight" not in classifier:
        return None
    return official_arch(classifier)


def _stat(value: Any, ours: torch.Tensor, what: str, name: str) -> torch.Tensor:
    if value is None:
        return ours
    if not isinstance(value, torch.Tensor) or value.numel() != ours.numel():
        raise CheckpointError(f"{name}: the checkpoint's input layer '{what}' has shape "
                              f"{tuple(getattr(value, 'shape', ()))}, expected {ours.numel()} channel values")
    return value.detach().to(ours.dtype).reshape(ours.shape)


def _mismatches(target: Mapping[str, torch.Tensor], state: Mapping[str, Any]) -> str | None:
    from bench.training.checkpoints import key_mismatches

    missing, unexpected, shapes = key_mismatches(target, state)
    parts = []
    if shapes:
        parts.append("shape mismatch " + _listed(shapes, 2))
    if missing:
        parts.append("missing keys " + _listed(missing))
    if unexpected:
        parts.append("unexpected keys " + _listed(unexpected))
    return "; ".join(parts) or None


def cohen_to_bench(state: Mapping[str, Any], model: DefendedModel, *, name: str = "rs") -> dict[str, Any]:
    """Rename an official checkpoint's state dict to ``model``'s keys, after checking it.

    ``1.<name>`` / ``1.module.<name>`` -> ``net.<name>``. The input layer has no official keys;
    its buffers come from ``model`` (the ``input_layer`` it was built with). Should a file hold
    input-layer tensors (``0.means`` with ``0.sds``: NormalizeLayer; ``0.means`` alone:
    InputCenterLayer, as in forks that made them buffers), the kind must match ``model``'s and
    the values are used. BatchNorm ``num_batches_tracked`` counters, absent from files saved by
    PyTorch before 0.4.1, are taken from ``model`` (they do not affect evaluation).

    Raises :class:`~bench.errors.CheckpointError` (one line) when the naming is not the
    official one, when the network is another architecture than ``model.cohen_arch``, when the
    input layers disagree, or when keys or shapes do not match.
    """
    arch = getattr(model, "cohen_arch", None)
    kind = getattr(model, "input_layer", None)
    if arch is None or kind is None:
        raise BenchError(f"{name}: the model was not built with an official architecture "
                         f"({', '.join(COHEN_ARCH_NAMES)}); set the hparam arch")
    layer, classifier, stray = split_official(state)
    if stray or not classifier:
        raise CheckpointError(f"{name}: the checkpoint does not have the official Sequential(input_layer, classifier) "
                              f"naming ('1.conv1.weight', ...); found {_listed(stray or sorted(state))}")
    found = official_arch(classifier)
    if found != arch:
        hint = (f"pass --hparam arch={found}" if found in COHEN_ARCH_NAMES
                else f"bench builds {', '.join(COHEN_ARCH_NAMES)}")
        raise CheckpointError(f"{name}: the checkpoint's network is {found}, not the {arch} asked for with "
                              f"arch={arch}; {hint}")
    if layer:
        file_kind = _INPUT_LAYER_KEYS.get(frozenset(layer))
        if file_kind is None:
            raise CheckpointError(f"{name}: unknown input-layer tensors in the checkpoint: "
                                  f"{_listed(['0.' + k for k in sorted(layer)])} (expected 0.means and 0.sds, "
                                  f"or 0.means alone)")
        if file_kind != kind:
            raise CheckpointError(f"{name}: the checkpoint's input layer is {_OFFICIAL_NAME[file_kind]} but the model "
                                  f"was built with input_layer={kind}; pass --hparam input_layer={file_kind}")
    target = model.state_dict()
    out: dict[str, Any] = {"net." + k: v for k, v in classifier.items()}
    out["normalize.mean"] = _stat(layer.get("means"), target["normalize.mean"], "means", name)
    out["normalize.std"] = _stat(layer.get("sds"), target["normalize.std"], "sds", name)
    for key, value in target.items():
        if key.endswith(".num_batches_tracked") and key not in out:
            out[key] = value
    report = _mismatches(target, out)
    if report is not None:
        raise CheckpointError(f"{name}: the official {arch} checkpoint does not fit the model: {report}")
    return out


def _check_bench_input_layer(model: DefendedModel, state: Mapping[str, Any], name: str) -> None:
    """A bench checkpoint of an official architecture records its input layer in
    ``normalize.std`` (ones for ``center``); refuse one trained with the other layer."""
    std = state.get("normalize.std")
    ours = model.state_dict()["normalize.std"]
    if not isinstance(std, torch.Tensor) or std.numel() != ours.numel():
        return  # the strict load reports it
    ones = bool(torch.all(std == 1))
    if model.input_layer == "center" and not ones:
        file_kind = "normalize"
    elif model.input_layer == "normalize" and ones and not bool(torch.all(ours == 1)):
        file_kind = "center"
    else:
        return
    raise CheckpointError(f"{name}: the checkpoint was trained with input_layer={file_kind}, the model was built "
                          f"with input_layer={model.input_layer}; pass --hparam input_layer={file_kind}")


def load_cohen_state_dict(model: DefendedModel, state: Mapping[str, Any], *, name: str = "rs") -> None:
    """Load an official randomized-smoothing checkpoint (or bench's own checkpoint of the same
    model) into ``model``, built by :func:`build_cohen_model`.

    Official naming goes through :func:`cohen_to_bench`; bench's naming (``net.`` and
    ``normalize.`` keys) loads strictly after checking its input layer. ``name`` prefixes the
    error messages (the calling defense).
    """
    plain = _strip(state)
    if any(k.startswith(("net.", "normalize.")) for k in plain):
        if getattr(model, "input_layer", None) is not None:
            _check_bench_input_layer(model, plain, name)
        model.load_state_dict(plain, strict=True)
        return
    model.load_state_dict(cohen_to_bench(plain, model, name=name), strict=True)
