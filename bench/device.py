"""Device resolution that does not import torch when no GPU can be present."""

from __future__ import annotations

import glob
import os
import sys

from bench.errors import BenchError


def _gpu_device_files() -> bool:
    return bool(glob.glob("/dev/nvidia[0-9]*") or os.path.exists("/dev/kfd"))


def cuda_available() -> bool:
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) == "":
        return False
    if sys.platform.startswith("linux") and not _gpu_device_files():
        return False  # no GPU device node: CUDA cannot be available, skip importing torch
    import torch

    return bool(torch.cuda.is_available())


def resolve_device(requested: str) -> str:
    """``auto`` -> ``cuda`` when a GPU is usable, else ``cpu``; explicit ``cuda`` must be usable."""
    if requested == "auto":
        return "cuda" if cuda_available() else "cpu"
    if requested.startswith("cuda") and not cuda_available():
        raise BenchError(f"--device {requested} requested but CUDA is not available on this machine")
    return requested


def device_kind(device: str) -> str:
    return device.split(":")[0]
