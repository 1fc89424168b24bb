"""The plan of a run: its stages with their sizes, printed before any work, and a time estimate.

A plan lists, in order, training (when bench trains the model: epochs and images), the model
checks, the clean pass, every attack of the protocol (threat model, examples at most, the
attack's budget) and every certificate (examples x samples). :func:`estimate` turns it into
seconds from a measured forward pass of the model (an upper bound: every example is assumed to
reach every attack, and no attack stops early). ``bench run`` prints the plan; ``bench run
--dry-run`` prints the resolved configuration and the plan with the estimate, and exits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from bench.config import AttackSpec, CertifySpec
from bench.registry import ATTACKS

if TYPE_CHECKING:
    from bench.harness.resolve import ResolvedRun

__all__ = ["PlanStage", "build_plan", "estimate", "format_plan"]

# Forward-pass equivalents of one backward pass (a gradient step costs one forward and one backward).
BACKWARD = 2.0
TARGETS = 9  # target classes of AutoAttack's targeted components (apgd-t, fab-t)


def autoattack_passes(version: str, n_iter: int, n_queries: int) -> float:
    """Forward-pass equivalents per example still robust of AutoAttack (Croce & Hein 2020):
    ``standard`` APGD-CE, APGD-T and FAB-T (9 targets) and Square; ``plus`` APGD-CE/DLR and FAB
    (5 restarts), Square, APGD-T and FAB-T; ``rand`` APGD-CE/DLR with 20 EOT draws."""
    step = 1 + BACKWARD
    return {"standard": n_iter * step + 2 * TARGETS * n_iter * step + n_queries,
            "plus": 3 * 5 * n_iter * step + n_queries + 2 * TARGETS * n_iter * step,
            "rand": 2 * n_iter * 20 * step}.get(version, 0.0)


AUTOATTACK = {version: autoattack_passes(version, 100, 5000) for version in ("standard", "plus", "rand")}


@dataclass(frozen=True)
class PlanStage:
    """One stage: what it is, how many examples (or images) it handles, and its forward-pass
    equivalents per example (``None`` when not estimated, e.g. training)."""

    label: str
    size: str
    examples: int
    passes_per_example: float | None
    key: str  # the description of the stage's progress task starts with it


def _attack_passes(spec: AttackSpec, draws: int) -> float:
    """Forward-pass equivalents per attacked example of ``spec``, scoring included (an upper bound)."""
    return _passes(spec.attack, ATTACKS.get(spec.attack)(**spec.kwargs).params) + draws


def _passes(name: str, p: dict[str, Any]) -> float:
    """Forward-pass equivalents per example of attack ``name`` with its checked parameters ``p``
    (defaults filled in by the attack itself)."""
    if name in ("eot", "bpda"):
        inner = ATTACKS.get(p["attack"])(**(p["params"] or {})).params
        return int(p.get("draws", 1)) * _passes(p["attack"], inner)
    if name == "autoattack":
        return autoattack_passes(str(p["version"]), int(p["n_iter"]), int(p["n_queries"]))
    if name == "square":
        return int(p["n_queries"]) * int(p["n_restarts"])
    if name == "smoothadv":
        return int(p["m"]) * int(p["steps"]) * (1 + BACKWARD)
    steps = int(p.get("steps", p.get("n_iter", 1)))
    restarts = int(p.get("restarts", p.get("n_restarts", 1)))
    targets = TARGETS if name in ("apgd-t", "fab-t") else 1
    return steps * restarts * targets * (1 + BACKWARD)


def _certify_passes(spec: CertifySpec) -> float:
    p = dict(spec.params)
    if spec.certifier == "smoothing":
        return int(p.get("n0", 100)) + int(p.get("n", 100_000))
    return float(p.get("n", 1) or 1)


def build_plan(resolved: ResolvedRun, n_examples: int) -> list[PlanStage]:
    """The stages of ``resolved`` on ``n_examples`` examples, training first when bench trains the
    model (skipped at run time when a cached model exists)."""
    stages: list[PlanStage] = []
    protocol = resolved.protocol
    if resolved.recipe is not None:
        stages.append(PlanStage(f"train {resolved.label} ({resolved.recipe_name} recipe)",
                                f"up to {resolved.recipe.epochs} epochs (skipped when a cached model exists)", 0,
                                None, "training"))
    draws = protocol.draws if resolved.info.randomized else 1
    stages.append(PlanStage("clean", f"{n_examples} examples x {draws} draw{'s' if draws > 1 else ''}",
                            n_examples, float(draws), "clean"))
    for spec in protocol.attacks:
        passes = _attack_passes(spec, draws)
        stages.append(PlanStage(spec.label, f"the still-robust of {n_examples} examples, up to {passes:,.0f} "
                                "forward passes each", n_examples, passes, spec.label))
    for cert in protocol.certifiers:
        passes = _certify_passes(cert)
        stages.append(PlanStage(cert.label, f"{n_examples} examples x {passes:,.0f} samples", n_examples, passes,
                                cert.label))
    return stages + _saturation_stages(resolved, n_examples, draws)  # they run once the stages are stored


def _saturation_stages(resolved: ResolvedRun, n_examples: int, draws: int) -> list[PlanStage]:
    """The EOT saturation checks after the attacks (:mod:`bench.harness.saturation`): for a
    randomized model that is not a smoothed classifier, the first EOT stage of each threat model
    again and with K and steps doubled, on at most ``MAX_EXAMPLES`` examples."""
    from bench.harness.saturation import CHECK, MAX_EXAMPLES, applies_to, saturation_stages, scaled_eot

    info, protocol = resolved.info, resolved.protocol
    if not applies_to(info.randomized, info.smoothed, protocol):
        return []
    examples = min(n_examples, MAX_EXAMPLES)
    out = []
    for _, spec in saturation_stages(protocol):
        passes = _attack_passes(spec, draws) + _attack_passes(scaled_eot(spec, 2), draws)
        out.append(PlanStage(f"{CHECK} {spec.threat.label}", f"up to {examples} examples, {spec.label} and with "
                             f"K and steps doubled, up to {passes:,.0f} forward passes each", examples, passes,
                             CHECK))
    return out


def format_plan(stages: list[PlanStage], seconds: list[float | None] | None = None) -> list[str]:
    """One line per stage, ``k/n label: size`` (and ``~T`` when estimated)."""
    lines = []
    for k, stage in enumerate(stages, start=1):
        eta = ""
        if seconds is not None and seconds[k - 1] is not None:
            eta = f"  (up to ~{_duration(float(seconds[k - 1] or 0.0))})"
        lines.append(f"  {k}/{len(stages)} {stage.label}: {stage.size}{eta}")
    return lines


def estimate(stages: list[PlanStage], seconds_per_pass: float) -> list[float | None]:
    """Upper-bound seconds per stage: examples x passes per example x seconds per example pass."""
    return [None if s.passes_per_example is None else s.examples * s.passes_per_example * seconds_per_pass
            for s in stages]


def measure_pass(model: Any, shape: tuple[int, ...], batch: int, device: Any) -> float:
    """Seconds per example of one forward pass of ``model`` (eval, no grad), on a batch of
    ``batch`` random inputs of ``shape``: the median of a few timed passes after a warm-up."""
    import statistics
    import time

    import torch

    x = torch.rand(batch, *shape, device=device)
    times = []
    with torch.no_grad():
        model(x)
        for _ in range(5):
            start = time.perf_counter()
            model(x)
            if x.is_cuda:
                torch.cuda.synchronize(x.device)
            times.append(time.perf_counter() - start)
    return statistics.median(times) / batch


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
