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


# glibc mallopt parameters: M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD
_MALLOC_SETTINGS = ((-1, (1 << 31) - 1), (-2, 1 << 28), (-3, 1 << 30))  # C ints


def configure_allocator() -> bool:
    """Let glibc's ``malloc`` keep freed memory in the process instead of returning it to the
    system, so that the same large activations, allocated and freed at every forward pass, reuse
    pages that are already mapped (each fresh page otherwise costs a page fault and zeroing: a
    64 px HyCAS forward pass of 512 samples ran about 1.8x slower, forward and backward of 512
    about 1.4x, docs/performance.md). Settings: blocks up to 1 GiB from the heap rather than from
    ``mmap``; trim the heap only above 2 GiB of free memory at its top; grow it 256 MiB at a time. The
    price: the process's resident memory stays at its peak until it exits. Returns whether the
    settings were applied: only with glibc (Linux), and not when ``$BENCH_MALLOC`` is ``default``.
    Nothing computed changes, only where memory comes from."""
    if os.environ.get("BENCH_MALLOC", "").strip().lower() == "default" or not sys.platform.startswith("linux"):
        return False
    import ctypes
    import platform

    if platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    return all(mallopt(ctypes.c_int(param), ctypes.c_int(value)) == 1 for param, value in _MALLOC_SETTINGS)


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
