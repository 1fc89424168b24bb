"""``bench attack RUN_ID``: run one more attack on a stored run.

The stored run's model (its checkpoint, verified by sha256), data split and example indices are
reloaded exactly; the new attack runs only on the examples still robust under its threat model
(clean-correct and not broken by any earlier attack with the same norm and eps), so the run's
worst-case robust accuracy can only go down. The attack becomes a new evaluation of the run,
committed batch by batch; repeating the same command resumes it, then returns it as stored.

Several ``bench attack`` on one run may run at once: each stage gets its own position, and is
recorded in the run's ``config.extra_attacks`` in the same transaction that creates it
(:meth:`bench.results.store.Store.add_stage`), so neither a concurrent writer nor a kill loses
the record; identical concurrent stages share one position and cooperate on its rows.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from bench.config import AttackSpec, ThreatModel, parse_eps, parse_norm
from bench.errors import BenchError
from bench.harness.resolve import ResolvedRun
from bench.harness.runner import record_result_checks
from bench.progress import Progress
from bench.results.schema import EvalKind, RunStatus
from bench.results.store import Store
from bench.results.stored import ExtraAttack, StoredConfig

if TYPE_CHECKING:
    from bench.harness.stages import Scoring
    from bench.results.schema import RunRow

__all__ = ["add_attack", "attack_threats"]


def _finished(store: Store, run_id: int, spec: AttackSpec) -> bool:
    """Whether the run already holds this attack as a finished stage (read only)."""
    return any(ev.kind is EvalKind.ATTACK and ev.method == spec.attack and ev.norm == spec.threat.norm.value
               and ev.eps == spec.threat.eps and (ev.params or {}) == spec.kwargs and ev.finished
               for ev in store.evaluations(run_id))


def _stage_position(store: Store, run_id: int, spec: AttackSpec, escalated_for: str | None) -> tuple[int, bool]:
    """The position of this attack in the run (an existing identical stage, or the next free one,
    recorded in ``config.extra_attacks`` at once) and whether it is finished."""

    def record(config: dict[str, Any], position: int) -> dict[str, Any]:
        return StoredConfig.from_json(config).with_extra_attack(ExtraAttack(position, spec, escalated_for))

    return store.add_stage(run_id, EvalKind.ATTACK, spec.attack, norm=spec.threat.norm.value, eps=spec.threat.eps,
                           params=spec.kwargs, record=record)


def _still_robust(store: Store, run_id: int, spec: AttackSpec, position: int, scoring: Scoring) -> set[int]:
    """Clean-correct examples not broken by earlier finished attacks of the same threat model (an
    earlier stage another ``bench attack`` is still computing does not prune: attacking more
    examples can only lower the measured robustness, never overstate it). "Correct" follows the
    run's scoring as in ``bench run`` (:attr:`Scoring.survives_on_any_draw`)."""
    alive: set[int] | None = None
    for ev in store.evaluations(run_id):
        same_threat = ev.norm == spec.threat.norm.value and ev.eps == spec.threat.eps
        earlier = ev.kind is EvalKind.ATTACK and same_threat and ev.position < position and ev.finished
        if ev.kind is EvalKind.CLEAN or earlier:
            correct = store.correct_indices(ev.id, any_draw=scoring.survives_on_any_draw)
            alive = correct if alive is None else alive & correct
    return alive or set()


def add_attack(store: Store, run_id: int, spec: AttackSpec, progress: Progress | None = None,
               device: str = "auto", escalated_for: str | None = None, randomized: bool | None = None,
               min_draws: int = 1) -> int:
    """Run ``spec`` on stored run ``run_id``; returns the run id. See the module docstring.

    The adversarial examples are scored by the one scoring policy
    (:func:`bench.harness.stages.scoring_for`) with the run's R, exactly as inside ``bench run``;
    ``randomized`` and ``min_draws`` are passed to it (``--escalate`` scores a model whose outputs
    vary with at least 10 draws even if it does not declare randomness). ``escalated_for``
    records the sanity check whose remedy this stage is."""
    import torch

    from bench.harness.resolve import check_attacks
    from bench.harness.stages import Evaluator, scoring_for
    from bench.harness.stored import load_model, load_run_examples
    from bench.results.queries import get_run_or_fail

    progress = progress or Progress()
    run = get_run_or_fail(store, run_id)
    if run.status is not RunStatus.FINISHED:
        raise BenchError(f"run {run_id} is {run.status.value}; finish it first by re-running its command")
    check_attacks([spec])  # name, parameters and norm, before any work
    if _finished(store, run_id, spec):
        return run_id
    started = time.perf_counter()
    resolved = ResolvedRun.from_stored(run, device)
    model = load_model(store, run, resolved)
    data = load_run_examples(run, resolved, progress, "extend")
    position, finished = _stage_position(store, run_id, spec, escalated_for)  # the first write
    if finished:  # another `bench attack` finished it meanwhile
        return run_id
    torch_device = torch.device(resolved.device)
    model.to(torch_device)
    scoring = scoring_for(model, resolved.protocol.draws, randomized=randomized, min_draws=min_draws,
                          version=resolved.protocol.scoring, exact=resolved.protocol.exact)
    evaluator = Evaluator(store, run_id, model, data, torch_device, resolved.config.batch_size, resolved.config.seed,
                          scoring, progress, frozen=resolved.protocol.frozen)
    store.start_clock(run_id, started)  # each committed batch accounts its cost: kills lose at most one batch
    try:
        evaluator.attack(position, spec, _still_robust(store, run_id, spec, position, scoring))
    finally:
        store.stop_clock(run_id)
    record_result_checks(store, run_id)
    return run_id


def attack_threats(run: RunRow, attack: str, norm: str | None, eps: Sequence[str | float]) -> list[ThreatModel]:
    """The threat models ``bench attack`` runs ``attack`` at on stored run ``run``.

    ``norm`` (else each norm of the run's protocol attacks that the attack supports, else the
    attack's first norm) times ``eps`` (else the run's own eps for those norms). A run with no
    threat model of those norms and no ``eps`` is a :class:`BenchError`."""
    from bench.registry import ATTACKS

    supported = ATTACKS.get(attack).info.norms
    run_threats = list(dict.fromkeys(a.threat for a in StoredConfig.from_json(run.config).protocol.attacks))
    if norm is not None:
        norms = [parse_norm(norm)]  # an unsupported explicit norm is reported by the attack
    else:
        norms = [n for n in dict.fromkeys(t.norm for t in run_threats) if n in supported] or list(supported[:1])
    if eps:
        return [ThreatModel(n, parse_eps(e)) for n in norms for e in eps]
    threats = [t for t in run_threats if t.norm in norms]
    if not threats:
        raise BenchError(f"run {run.id} has no {'/'.join(n.value for n in norms)} threat model for attack "
                         f"'{attack}'; give --norm and --eps")
    return threats
