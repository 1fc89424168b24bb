"""The EOT saturation check: is the protocol's EOT attack strong enough?

An EOT attack on a randomized model is *saturated* when a stronger budget no longer finds more
adversarial examples. :func:`eot_saturation` re-runs one stored EOT stage as configured and with
its number of draws K and its number of steps doubled (same seeds), scores both with ``draws``
independent draws per example, and compares the single-draw robust accuracy (the mean over the
examples of the fraction of correct draws). It triggers when the doubled attack is lower by more
than the half-width of a 95% paired Student-t interval of the per-example differences (and by
more than 0 points): the configured attack then overestimates robustness.

:func:`record_saturation_checks` runs it after the attacks of a run of a randomized model (not a
smoothed classifier), once per threat model, on the first EOT stage of that threat model, and
stores each outcome as check ``eot_saturation <threat>`` (:func:`check_name`). The remedy
(``--escalate``) is EOT with 4x K and 4x steps (:func:`scaled_eot`, :mod:`bench.harness.escalate`).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from bench.capabilities import capability
from bench.config import AttackSpec, Protocol, ThreatModel
from bench.errors import BenchError
from bench.harness.draws import draw_logits, draw_outcomes
from bench.harness.stages import seed_of
from bench.registry import ATTACKS
from bench.results.checks import CheckResult

if TYPE_CHECKING:
    from bench.data.base import Split
    from bench.progress import Progress
    from bench.results.store import Store

__all__ = ["CHECK", "MAX_EXAMPLES", "check_name", "eot_budget", "eot_saturation", "record_saturation_checks",
           "saturation_stages", "scaled_eot"]

CHECK = "eot_saturation"
MAX_EXAMPLES = 100  # examples the check attacks at most (a seeded choice among those the stage attacked)
CONFIDENCE = 0.95
STEP_KEYS = ("steps", "n_iter")  # the parameter that counts an inner attack's iterations


def check_name(threat: ThreatModel) -> str:
    """The stored name of the check at ``threat`` (one check per threat model, e.g. ``eot_saturation Linf 0.1``)."""
    return f"{CHECK} {threat.label}"


# -- budgets ---------------------------------------------------------------------------------------
def _scaled_params(name: str, params: dict[str, Any] | None, factor: int) -> dict[str, Any]:
    """``params`` of attack ``name`` with its iteration count (its given value, else its default)
    times ``factor``; a wrapper (``attack`` and ``params``) scales its inner attack's."""
    defaults = ATTACKS.get(name).defaults
    out = dict(params or {})
    for key in STEP_KEYS:
        if key in defaults:
            out[key] = int(out[key] if out.get(key) is not None else defaults[key]) * factor
            return out
    if {"attack", "params"} <= set(defaults):
        out["params"] = _scaled_params(str(out.get("attack", defaults["attack"])), out.get("params"), factor)
        return out
    raise BenchError(f"attack '{name}' has no iteration count ({' or '.join(STEP_KEYS)}) to scale")


def scaled_eot(spec: AttackSpec, factor: int) -> AttackSpec:
    """The EOT stage ``spec`` with K (draws) and the inner attack's steps multiplied by ``factor``
    (defaults included: an EOT without ``draws`` has K = 20); everything else (restarts, an
    explicit step size, the threat model) unchanged. A default step size (PGD: 2.5 eps / steps)
    follows the new number of steps."""
    if spec.attack != "eot":
        raise BenchError(f"the EOT saturation check needs an 'eot' stage, got '{spec.attack}'")
    defaults = ATTACKS.get("eot").defaults
    kwargs = spec.kwargs
    draws = int(kwargs["draws"] if kwargs.get("draws") is not None else defaults["draws"]) * factor
    inner = _scaled_params(str(kwargs.get("attack", defaults["attack"])), kwargs.get("params"), factor)
    return AttackSpec("eot", spec.threat, tuple(sorted({**kwargs, "draws": draws, "params": inner}.items())))


def eot_budget(spec: AttackSpec) -> str:
    """``K=10, 20 steps`` (defaults included) for an EOT stage."""
    attack = ATTACKS.get(spec.attack)(**spec.kwargs)
    parts = [f"K={attack.params['draws']}"]
    inner = getattr(attack, "inner", None)
    while inner is not None:
        step = next((inner.params[k] for k in STEP_KEYS if k in inner.params), None)
        if step is not None:
            parts.append(f"{step} steps")
            restarts = inner.params.get("restarts", inner.params.get("n_restarts"))
            if restarts not in (None, 1):
                parts.append(f"{restarts} restarts")
            break
        inner = getattr(inner, "inner", None)
    return ", ".join(parts)


# -- scoring ---------------------------------------------------------------------------------------
def single_draw_values(model: nn.Module, x_adv: torch.Tensor, y: torch.Tensor, draws: int) -> torch.Tensor:
    """Per example, the fraction of ``draws`` draws that classify ``x_adv`` correctly; the draws are
    independent across draws and examples (:func:`bench.harness.draws.draw_logits`)."""
    _, correct = draw_outcomes(draw_logits(model, x_adv, draws), y, str(capability(model, "task")))
    return correct.double() / draws


def _attacked_values(model: nn.Module, x: torch.Tensor, y: torch.Tensor, spec: AttackSpec, draws: int, seed: int,
                     batch_size: int) -> torch.Tensor:
    """Single-draw values of the examples after attack ``spec``; batch ``b`` is attacked with seed
    (seed, b) and scored with seed (seed, b, 1), whatever the attack (common random numbers)."""
    attack = ATTACKS.get(spec.attack)(**spec.kwargs)
    values = []
    for number, begin in enumerate(range(0, len(x), batch_size)):
        xb, yb = x[begin:begin + batch_size], y[begin:begin + batch_size]
        torch.manual_seed(seed_of(seed, number))
        x_adv = attack(model, xb, yb, spec.threat).x_adv
        torch.manual_seed(seed_of(seed, number, 1))
        values.append(single_draw_values(model, x_adv, yb, draws))
    return torch.cat(values) if values else torch.zeros(0, dtype=torch.float64)


# -- the check -------------------------------------------------------------------------------------
def paired_half_width(differences: torch.Tensor, confidence: float = CONFIDENCE) -> float:
    """Half-width of the two-sided Student-t interval of the mean of paired ``differences``:
    t_{(1+confidence)/2, n-1} * s / sqrt(n) (:func:`bench.results.intervals.t_half_width`);
    infinite with fewer than 2 differences."""
    from bench.results.intervals import t_half_width

    return t_half_width(differences.tolist(), confidence)


def _subset(x: torch.Tensor, y: torch.Tensor, max_examples: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """At most ``max_examples`` of the examples: a seeded choice, kept in their order."""
    if len(x) <= max_examples:
        return x, y
    generator = torch.Generator().manual_seed(seed_of(seed, len(x)))
    keep = torch.randperm(len(x), generator=generator)[:max_examples].sort().values
    return x[keep.to(x.device)], y[keep.to(y.device)]


def eot_saturation(model: nn.Module, x: torch.Tensor, y: torch.Tensor, spec: AttackSpec, draws: int, seed: int,
                   *, batch_size: int = 128, max_examples: int = MAX_EXAMPLES) -> CheckResult:
    """Whether EOT stage ``spec`` is saturated on ``(x, y)`` (see the module docstring).

    Attacks at most ``max_examples`` of the examples (a seeded choice) with ``spec`` and with
    :func:`scaled_eot` (``spec``, 2), each batch with the same seed for both attacks, scores each
    adversarial batch with ``draws`` independent draws per example, and compares the two mean
    single-draw accuracies. Triggered when the doubled attack is lower by more than 0 and by more
    than the half-width of the 95% paired Student-t interval of the per-example differences.
    Deterministic for a fixed ``seed`` (the global random state is restored afterwards)."""
    stronger = scaled_eot(spec, 2)
    x, y = _subset(x, y, max_examples, seed)
    devices = [x.device] if x.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        before = _attacked_values(model, x, y, spec, draws, seed, batch_size)
        after = _attacked_values(model, x, y, stronger, draws, seed, batch_size)
    return judge(spec, stronger, before, after, draws)


def judge(spec: AttackSpec, stronger: AttackSpec, before: torch.Tensor, after: torch.Tensor,
          draws: int) -> CheckResult:
    """The check's outcome from the per-example single-draw values under both attacks."""
    where = f"{spec.threat.label}: "
    if len(before) == 0:
        return CheckResult(CHECK, False, where + "no example to attack (every example already broken)")
    differences = before - after
    gap, half = float(differences.mean()), paired_half_width(differences)
    triggered = gap > 0 and gap > half
    detail = (f"{where}EOT {eot_budget(spec)}: single-draw robust accuracy {100 * float(before.mean()):.2f}%; "
              f"EOT {eot_budget(stronger)}: {100 * float(after.mean()):.2f}% (lower by {100 * gap:.2f} points; "
              f"95% paired t half-width {100 * half:.2f} points; {len(before)} examples, {draws} draws each)")
    verdict = ("not saturated: the protocol's EOT overestimates robustness; use more draws and steps (--escalate)"
               if triggered else "saturated within the interval")
    return CheckResult(CHECK, triggered, f"{detail}: {verdict}")


# -- the hook after the attacks of a run -----------------------------------------------------------
def saturation_stages(protocol: Protocol) -> list[tuple[int, AttackSpec]]:
    """``(position, spec)`` of the first EOT stage of each threat model of ``protocol`` (positions
    as the run numbers its attacks: 1, 2, ...), in protocol order."""
    first: dict[ThreatModel, tuple[int, AttackSpec]] = {}
    for position, spec in enumerate(protocol.attacks, start=1):
        if spec.attack == "eot" and spec.threat not in first:
            first[spec.threat] = (position, spec)
    return list(first.values())


def applies_to(randomized: bool, smoothed: bool, protocol: Protocol) -> bool:
    """The check runs for a randomized model that is not a smoothed classifier, attacked by a
    protocol with an EOT stage and fresh draws (not a frozen draw)."""
    return randomized and not smoothed and not protocol.frozen and bool(saturation_stages(protocol))


def applies(model: nn.Module, protocol: Protocol) -> bool:
    """:func:`applies_to` with what ``model`` declares."""
    return applies_to(bool(capability(model, "randomized")), bool(capability(model, "smoothed_evaluation")),
                      protocol)


def record_saturation_checks(store: Store, run_id: int, model: nn.Module, data: Split, device: torch.device,
                             protocol: Protocol, seed: int, batch_size: int, progress: Progress) -> None:
    """Run :func:`eot_saturation` on the first EOT stage of each threat model of a finished attack
    cascade and store each outcome as :func:`check_name` (threat). A check already stored (a
    resumed run) is not run again; nothing runs unless :func:`applies`."""
    from bench.results.schema import EvalKind

    if not applies(model, protocol):
        return
    stored = {c.name for c in store.checks(run_id)}
    evaluations = {ev.position: ev for ev in store.evaluations(run_id) if ev.kind is EvalKind.ATTACK}
    assert data.indices is not None
    position_of = {int(ex): pos for pos, ex in enumerate(data.indices.tolist())}
    for position, spec in saturation_stages(protocol):
        name, ev = check_name(spec.threat), evaluations.get(position)
        if name in stored or ev is None or ev.skipped:
            continue
        attacked = [position_of[r.example_index] for r in store.results([ev.id])]
        pos = torch.tensor(attacked, dtype=torch.long)
        x, y = data.images[pos].to(device), data.labels[pos].to(device)
        progress.log(progress.numbered(f"{CHECK} {spec.threat.label}: {spec.label} ({eot_budget(spec)}) against "
                                       f"doubled K and steps on {min(len(attacked), MAX_EXAMPLES)} examples"))
        started = time.perf_counter()
        result = eot_saturation(model, x, y, spec, protocol.draws, seed, batch_size=batch_size)
        store.set_check(run_id, name, result.triggered, result.detail)
        outcome = "triggered" if result.triggered else "passed"
        progress.log(f"{name}: {outcome} in {time.perf_counter() - started:.0f} s ({result.detail})")
