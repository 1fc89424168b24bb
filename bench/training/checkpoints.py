"""Checkpoint files: the cache of trained models and loading of user-supplied checkpoints.

Trained models are cached under ``$BENCH_HOME/checkpoints`` (default ``~/.cache/bench``) by the
hash of their training configuration, and written atomically (a crash never leaves a partial
file under the final name) and once: :func:`checkpoint_lock` serializes the processes that would
train the same model, so the second waits and loads the first one's file instead of rewriting
it under a run that recorded its hash. Every file a user hands in is loaded with ``weights_only=True``.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import pickle
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench.errors import CheckpointError
from bench.paths import atomic_write, cache_subdir

FORMAT = "bench-checkpoint-1"


def listed(items: Any, limit: int = 4) -> str:
    """The first ``limit`` items, comma-separated, and how many more there are."""
    items = list(items)
    return ", ".join(items[:limit]) + (f" (+{len(items) - limit} more)" if len(items) > limit else "")


def key_mismatches(target: Any, state: Any) -> tuple[list[str], list[str], list[str]]:
    """How ``state`` (a state dict) fails to fit ``target`` (a model's state dict): the missing
    keys, the unexpected keys and one line per shape mismatch, each sorted."""
    missing = sorted(set(target) - set(state))
    unexpected = sorted(set(state) - set(target))
    shapes = [f"{k}: checkpoint {tuple(state[k].shape)}, model {tuple(target[k].shape)}"
              for k in target if k in state and tuple(getattr(state[k], "shape", ())) != tuple(target[k].shape)]
    return missing, unexpected, shapes


def checkpoint_dir() -> Path:
    return cache_subdir("checkpoints")


def sha256_file(path: str | os.PathLike[str]) -> str:
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
    except OSError as exc:
        raise CheckpointError(f"cannot read checkpoint {path}: {exc.strerror or exc}") from None
    return digest.hexdigest()


def _first_sentence(exc: BaseException) -> str:
    text = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return text.split(". ")[0].rstrip(".")[:300]


@contextlib.contextmanager
def checkpoint_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``<path>.lock`` (``fcntl.flock``; waits for another holder):
    whoever holds it may check, train and write ``path``. The lock ends with the process, so a
    killed holder never blocks the next one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def atomic_save(path: Path, obj: Any) -> None:
    """``torch.save`` to a temporary file, then rename: ``path`` is never half-written. A write
    that fails (a full disk, a read-only folder) is a :class:`CheckpointError` and leaves nothing."""
    import torch

    try:
        atomic_write(path, lambda tmp: torch.save(obj, tmp))
    except (OSError, RuntimeError) as exc:  # torch reports a failed write as a RuntimeError
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else _first_sentence(exc)
        raise CheckpointError(f"cannot write {path}: {reason}") from None


def save_checkpoint(path: Path, state_dict: dict[str, Any], meta: dict[str, Any]) -> None:
    """Write ``{"format", "state_dict", "meta"}`` atomically to ``path``."""
    atomic_save(path, {"format": FORMAT, "state_dict": state_dict, "meta": meta})


def read_checkpoint(path: str | os.PathLike[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Load ``path`` safely and return ``(state_dict, meta)``.

    Accepts bench's own format, the common ``{"state_dict": ...}`` / ``{"model": ...}`` wrappers
    and bare state dicts; strips DataParallel's ``module.`` prefix.
    """
    import torch

    name = str(path)
    if not os.path.isfile(name):
        raise CheckpointError(f"checkpoint file not found: {name}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. torch's note on pickle protocols: the error says enough
            obj = torch.load(name, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = _first_sentence(exc)
        if "weights_only" in str(exc) or "Unsupported global" in str(exc):
            raise CheckpointError(f"refusing to load {name}: it contains Python objects other than tensors "
                                  f"and plain containers, which weights_only=True rejects ({first})") from None
        raise CheckpointError(f"{name} is not a PyTorch checkpoint ({first})") from None
    except (RuntimeError, EOFError, ValueError, OSError, AttributeError, ImportError, IndexError,
            KeyError, TypeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{name} is not a readable PyTorch checkpoint ({_first_sentence(exc)})") from None
    meta: dict[str, Any] = {}
    state: Any = obj
    if isinstance(obj, dict):
        if isinstance(obj.get("meta"), dict):
            meta = obj["meta"]
        for key in ("state_dict", "model_state_dict", "model", "net"):
            if isinstance(obj.get(key), dict):
                state = obj[key]
                break
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{name} holds no state dict of tensors (expected a state_dict or "
                              f"{{'state_dict': ...}})")
    if all(str(k).startswith("module.") for k in state):
        state = {str(k)[len("module."):]: v for k, v in state.items()}
    return state, meta


def load_into(defense: Any, model: Any, state: dict[str, Any], source: str) -> None:
    """Load ``state`` into ``model`` through the defense's adapter; mismatches are user errors."""
    try:
        defense.load_state_dict(model, state)
    except RuntimeError as exc:
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        detail = "; ".join(lines[:3])
        if len(detail) > 400:
            detail = detail[:400] + "..."
        raise CheckpointError(f"checkpoint {source} does not fit defense '{defense.name}': {detail}") from None
