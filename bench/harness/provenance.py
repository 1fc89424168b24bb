"""Provenance recorded with every run: code and package versions, device, host, seeds, hashes.

The recorded command never holds a database password (:func:`command_line`)."""

from __future__ import annotations

import os
import platform
import socket
import subprocess
import sys
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import bench

PACKAGES = ("torch", "torchvision", "torchattacks", "pyautoattack", "numpy", "scipy", "scikit-learn", "sqlalchemy")


def package_versions(names: tuple[str, ...] = PACKAGES) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in names:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def git_commit() -> dict[str, Any] | None:
    """The commit of the bench source tree (and whether it has uncommitted changes), if it is a checkout."""
    root = Path(bench.__file__).resolve().parent.parent
    if not (root / ".git").exists():
        return None
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit, "dirty": bool(dirty)}


def device_info(device: str) -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"device": device, "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count()}
    if device.startswith("cuda") and torch.cuda.is_available():
        index = torch.device(device).index or 0
        info["gpu"] = torch.cuda.get_device_name(index)
        info["cuda"] = torch.version.cuda
    return info


def collect(*, device: str, seed: int, dataset: str, indices_hash: str, checkpoint_sha256: str | None,
            data_root: str | None = None) -> dict[str, Any]:
    return {
        "bench_version": bench.__version__,
        "git": git_commit(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "host": socket.gethostname(),
        "packages": package_versions(),
        **device_info(device),
        "seed": seed,
        "dataset": dataset,
        "data_root": data_root,
        "indices_hash": indices_hash,
        "checkpoint_sha256": checkpoint_sha256,
        "started_at": datetime.now(timezone.utc).isoformat(),
        "command": command_line(sys.argv),
    }


def command_line(argv: list[str]) -> str | None:
    """``argv`` as one line, with the password of every database URL in it (``--db`` or a
    ``BENCH_DB`` written into the command) replaced by ``***``."""
    from bench.results.store import redact

    return redact(" ".join(argv)) if argv else None
