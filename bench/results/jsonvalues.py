"""JSON the store and the CLI can always write: NaN and +-Infinity are not JSON.

Python's ``json`` module writes ``NaN`` and ``Infinity`` by default, which no JSON parser (nor
SQLite's ``json_extract``) accepts. The store serialises its JSON columns with
:func:`strict_dumps`, which refuses them; values that can legitimately be non-finite at run time
(a diverged training loss, the score of a model whose output is NaN) are passed through
:func:`null_non_finite` first, explicitly, by the code that stores them.
"""

from __future__ import annotations

import json
import math
from typing import Any

__all__ = ["non_finite_paths", "null_non_finite", "strict_dumps"]


def strict_dumps(value: Any) -> str:
    """``json.dumps`` that raises ``ValueError`` on NaN and +-Infinity: its output is always valid JSON."""
    return json.dumps(value, allow_nan=False)


def _child(path: str, key: Any) -> str:
    return f"{path}[{key}]" if isinstance(key, int) else (f"{path}.{key}" if path else str(key))


def null_non_finite(value: Any, path: str = "") -> tuple[Any, list[str]]:
    """``value`` with every non-finite float (NaN, +-Infinity) inside dicts, lists and tuples
    replaced by ``None``, and the paths of the replaced values (``"loss"``, ``"history[3].loss"``).

    Everything else is returned as it is (tuples become lists); ``value`` is not modified.
    """
    if isinstance(value, float) and not math.isfinite(value):
        return None, [path or "(value)"]
    if isinstance(value, dict):
        out: dict[Any, Any] = {}
        replaced: list[str] = []
        for key, item in value.items():
            out[key], found = null_non_finite(item, _child(path, key))
            replaced += found
        return out, replaced
    if isinstance(value, (list, tuple)):
        items, replaced = [], []
        for i, item in enumerate(value):
            clean, found = null_non_finite(item, _child(path, i))
            items.append(clean)
            replaced += found
        return items, replaced
    return value, []


def non_finite_paths(value: Any) -> list[str]:
    """The paths of the non-finite floats in ``value`` (empty when it is valid JSON as far as numbers go)."""
    return null_non_finite(value)[1]
