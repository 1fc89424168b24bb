"""Aggregates computed from per-example rows, as pure functions.

Semantics (docs/protocols.md):

* clean accuracy: correct clean predictions / n;
* attacks sharing a threat model (norm, eps) form a cascade: each runs only on examples still
  robust, and an attack's ``accuracy`` is the robust accuracy *after* it (cumulative);
* a threat model's robust accuracy is the per-example worst case over its attacks;
* ``robust_accuracy`` is the per-example worst case over every attack of the run
  (robust under all threat models at once), or ``None`` when no attack ran;
* certified accuracy at radius r: correct, not abstained, and radius >= r, over n.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from bench.results.schema import EvalKind


@dataclass(frozen=True)
class Outcome:
    """The parts of an example row that aggregates need."""

    index: int
    correct: bool
    radius: float | None = None
    abstained: bool = False


@dataclass(frozen=True)
class Stage:
    """The parts of an evaluation row that aggregates need."""

    id: int
    position: int
    kind: EvalKind
    method: str
    norm: str | None
    eps: float | None
    finished: bool = True
    sigma: float | None = None


def _fraction(count: int, n: int) -> float | None:
    return count / n if n else None


def attack_table(stages: Sequence[Stage], outcomes: dict[int, list[Outcome]], n: int) -> dict[str, Any]:
    """Clean accuracy, cumulative per-attack accuracy, per-threat and overall worst case."""
    clean = [s for s in stages if s.kind is EvalKind.CLEAN]
    clean_ok = {o.index for s in clean for o in outcomes.get(s.id, []) if o.correct}
    attacks_out: list[dict[str, Any]] = []
    groups: dict[tuple[str | None, float | None], set[int]] = {}
    for stage in sorted((s for s in stages if s.kind is EvalKind.ATTACK), key=lambda s: s.position):
        key = (stage.norm, stage.eps)
        alive = groups.get(key, clean_ok)
        survived = {o.index for o in outcomes.get(stage.id, []) if o.correct}
        alive = alive & survived
        groups[key] = alive
        attacks_out.append({"name": stage.method, "norm": stage.norm, "eps": stage.eps,
                            "accuracy": _fraction(len(alive), n)})
    threats = [{"norm": norm, "eps": eps, "robust_accuracy": _fraction(len(alive), n)}
               for (norm, eps), alive in groups.items()]
    robust: float | None = None
    if groups:
        robust_set = set(clean_ok)
        for alive in groups.values():
            robust_set &= alive
        robust = _fraction(len(robust_set), n)
    return {
        "clean_accuracy": _fraction(len(clean_ok), n) if clean else None,
        "attacks": attacks_out,
        "threat_models": threats,
        "robust_accuracy": robust,
    }


def certified_table(stages: Sequence[Stage], outcomes: dict[int, list[Outcome]], n: int,
                    radii: Iterable[float]) -> list[dict[str, Any]]:
    """Certified accuracy at each radius, for each certification stage."""
    out: list[dict[str, Any]] = []
    radii = list(radii)
    for stage in sorted((s for s in stages if s.kind is EvalKind.CERTIFY), key=lambda s: s.position):
        rows = outcomes.get(stage.id, [])
        for r in radii:
            hits = sum(1 for o in rows if o.correct and not o.abstained and o.radius is not None and o.radius >= r)
            out.append({"certifier": stage.method, "radius": r, "accuracy": _fraction(hits, n)})
    return out
