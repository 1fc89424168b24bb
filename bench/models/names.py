"""Architecture names, importable without torch."""

from __future__ import annotations

from bench.errors import BenchError

ARCH_NAMES = ("cnn-tiny", "cnn-small", "resnet18")


def resolve_arch(arch: str, image_size: int, recipe: str | None = None) -> str:
    """``auto`` picks the tiny CNN (width 16) for images up to 8 px (digits), the small CNN
    (width 32) for images up to 16 px or for the ``cpu`` recipe, and the CIFAR ResNet-18
    otherwise (paper-scale training on a GPU)."""
    if arch == "auto":
        if image_size <= 8:
            return "cnn-tiny"
        return "cnn-small" if image_size <= 16 or recipe == "cpu" else "resnet18"
    if arch not in ARCH_NAMES:
        raise BenchError(f"unknown architecture '{arch}'; known: auto, {', '.join(ARCH_NAMES)}")
    return arch


# The architectures of the official randomized-smoothing code (locuslab/smoothing,
# Hadisalman/smoothing-adversarial), built with the official state_dict names by
# :mod:`bench.models.cohen`; offered by the smoothing defenses, not by every defense.
COHEN_ARCH_NAMES = ("cifar_resnet20", "cifar_resnet110", "resnet50")
# Their input layer: ``normalize`` = the official NormalizeLayer ((x - mean) / std),
# ``center`` = the official InputCenterLayer (x - mean).
INPUT_LAYERS = ("normalize", "center")


# Per-channel (mean, std) of the usual input normalizations, for user models that normalize
# outside (``--normalize``): CIFAR-10's and CIFAR-100's training-set statistics, ImageNet's
# torchvision convention.
NORMALIZE_PRESETS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}
