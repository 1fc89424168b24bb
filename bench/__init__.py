"""bench: a robustness benchmarking harness and leaderboard for image classifiers.

Importing :mod:`bench` is cheap: heavy modules (torch, the defenses, the attacks) are
imported only when a registry entry is looked up or a command needs them.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

__all__ = ["__version__", "evaluate"]


def __getattr__(name: str) -> Any:
    """``bench.evaluate`` (:func:`bench.api.evaluate`), imported on first use."""
    if name == "evaluate":
        from bench.api import evaluate

        return evaluate
    raise AttributeError(f"module 'bench' has no attribute {name!r}")
