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


def configure_threads(requested: int | None = None) -> int | None:
    """Set torch's intra-op threads from ``requested`` (``--threads``), else ``$BENCH_THREADS``;
    return the number set, or ``None`` (torch's default kept). A value that is not an integer
    >= 1 is a :class:`BenchError`."""
    raw: object = requested if requested is not None else os.environ.get("BENCH_THREADS") or None
    if raw is None:
        return None
    source = "--threads" if requested is not None else "$BENCH_THREADS"
    try:
        threads = int(str(raw))
    except ValueError:
        raise BenchError(f"invalid {source} '{raw}': give an integer >= 1") from None
    if threads < 1:
        raise BenchError(f"invalid {source} {threads}: give an integer >= 1")
    import torch

    torch.set_num_threads(threads)
    return threads


def oversubscribed() -> str | None:
    """A one-line warning when the 1-minute load average exceeds the CPU count (other processes
    compete for the cores: timings and ETAs will be slow), else ``None``."""
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        return None
    cores = os.cpu_count() or 1
    if load <= cores:
        return None
    return (f"the machine is oversubscribed (load average {load:.1f} on {cores} cores): timings will be slow; "
            "set --threads (or $BENCH_THREADS) so that processes x threads <= cores")
