"""Attacks: the contract (:mod:`bench.attacks.base`) and adapters over attack libraries."""

from __future__ import annotations

__all__: list[str] = []
