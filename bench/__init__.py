"""bench: a robustness benchmarking harness and leaderboard for image classifiers.

Importing :mod:`bench` is cheap: heavy modules (torch, the defenses, the attacks) are
imported only when a registry entry is looked up or a command needs them.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
