"""Defenses: one module per defense; the contract is :mod:`bench.defenses.base`."""

from __future__ import annotations

__all__: list[str] = []
