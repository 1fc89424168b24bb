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
