"""Check outcomes, and the checks computed from a run's stored results (pure functions of its
summary, run after the attacks). The model checks, which need a model, are in
:mod:`bench.harness.checks`; both kinds are stored in the ``checks`` table.
"""

from __future__ import annotations

from dataclasses import dataclass

from bench.results.types import RunSummary

__all__ = ["CheckResult", "result_checks"]


@dataclass(frozen=True)
class CheckResult:
    """One sanity check's outcome: ``triggered`` means the number may be wrong (docs/checks.md)."""

    name: str
    triggered: bool
    detail: str


# -- checks on the results, run after the attacks (pure functions of the run summary) -------------
WHITEBOX_GAP = 0.002  # AutoAttack's flag: Square more than 0.2 points below the best white-box result


def check_square_beats_whitebox(summary: RunSummary) -> CheckResult:
    """Within a threat model's cascade, a score-based attack (Square) that breaks examples the
    gradient attacks before it left robust means those gradients were uninformative."""
    worst = []
    for threat in summary.get("threat_models", []):
        stages = [a for a in summary["attacks"] if (a["norm"], a["eps"]) == (threat["norm"], threat["eps"])]
        for k, stage in enumerate(stages):
            before = [a for s in stages[:k] if s["name"] != "square" and (a := s["accuracy"]) is not None]
            if stage["name"] == "square" and before and stage["accuracy"] is not None:
                gap = min(before) - stage["accuracy"]
                if gap > WHITEBOX_GAP:
                    worst.append(f"{threat['norm']} {threat['eps']:.4g}: square {100 * gap:.2f} points below")
    detail = ("; ".join(worst) + ": white-box gradients look masked; use EOT/BPDA or more restarts"
              if worst else "no score-based attack beat the white-box attacks by more than 0.2 points")
    return CheckResult("square_beats_whitebox", bool(worst), detail)


def check_eps_monotone(summary: RunSummary) -> CheckResult:
    """Robust accuracy must not increase with eps (per norm): otherwise an attack failed at large eps."""
    problems = []
    by_norm: dict[str, list[tuple[float, float]]] = {}
    for threat in summary.get("threat_models", []):
        if threat["robust_accuracy"] is not None:
            by_norm.setdefault(threat["norm"], []).append((threat["eps"], threat["robust_accuracy"]))
    for norm, points in by_norm.items():
        points.sort()
        for (e1, a1), (e2, a2) in zip(points, points[1:]):
            if a2 > a1:
                problems.append(f"{norm}: {100 * a1:.2f}% at eps {e1:.4g} but {100 * a2:.2f}% at eps {e2:.4g}")
    detail = ("; ".join(problems) + ": the attack is weaker at the larger eps (failed optimisation or masking)"
              if problems else "robust accuracy does not increase with eps")
    return CheckResult("eps_monotone", bool(problems), detail)


def result_checks(summary: RunSummary) -> list[CheckResult]:
    return [check_square_beats_whitebox(summary), check_eps_monotone(summary)]
