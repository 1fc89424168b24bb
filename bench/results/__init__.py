"""Results: the SQL store (per-example rows are the source of truth), queries, leaderboards."""

from __future__ import annotations

__all__: list[str] = []
