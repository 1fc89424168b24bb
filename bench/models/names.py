"""Architecture names, importable without torch."""

from __future__ import annotations

from bench.errors import BenchError

ARCH_NAMES = ("cnn-small", "resnet18")


def resolve_arch(arch: str, image_size: int, recipe: str | None = None) -> str:
    """``auto`` picks the small CNN for images up to 16 px or for the ``cpu`` recipe, and the
    CIFAR ResNet-18 otherwise (paper-scale training on a GPU)."""
    if arch == "auto":
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
