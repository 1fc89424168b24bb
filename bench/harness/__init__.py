"""The harness: configuration resolution, training, evaluation, checks, provenance."""

from __future__ import annotations

__all__: list[str] = []
