"""``bench verify``: re-compute part of an exported run (a capsule) and compare it row by row.

Every stored row was computed in a batch seeded by (run seed, stage position, batch number)
over the stage's target list (:class:`bench.harness.stages.Evaluator`). For each stage the
target list is rebuilt from the capsule's rows (clean and certificates: every example in index
order; an attack stage: the examples that have a row in it, in index order), the batches holding
the chosen examples are found, and exactly those batches are re-computed: the capsule is
imported into a throwaway in-memory store *without* those batches' rows, and the harness's own
:class:`Evaluator` fills them in (it skips every stored row, so it computes exactly the missing
batches, with their original numbers and seeds). The chosen examples' rows are then compared.

Agreement (``TOLERANCE``): the discrete fields (label, prediction, correct, abstained, draws,
correct draws, votes for the predicted class, samples used, multilabel predictions) must be
equal; the float fields (certified radius, bound, perturbation norm, multilabel scores) must
agree within a relative and absolute 1e-6. A deterministic model on the same device kind and
library versions reproduces every row exactly; a randomized or smoothed model does too, because
its randomness is drawn from the same seeded generator per batch. On other hardware or library
versions float rounding may flip a borderline example: verify then reports it, as it should.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from bench.errors import BenchError
from bench.results.stored import StoredConfig

__all__ = ["TOLERANCE", "StageReport", "Verification", "choose_examples", "verify_capsule"]

TOLERANCE = 1e-6  # relative and absolute, for the float fields of a row
EXACT_FIELDS = ("label", "prediction", "correct", "abstained", "draws", "correct_draws", "count_a", "samples_used")
FLOAT_FIELDS = ("radius", "bound", "perturbation_norm")


@dataclass
class StageReport:
    """One stage's verification: how many chosen examples were compared, in how many re-computed
    batches, and the first disagreement (None when every compared example agrees)."""

    position: int
    label: str
    compared: int = 0
    batches: int = 0
    disagreement: str | None = None
    skipped: str | None = None


@dataclass
class Verification:
    """Every stage's report; ``ok`` only when no stage disagrees."""

    examples: list[int]
    stages: list[StageReport] = field(default_factory=list)
    checkpoint_mismatch: str | None = None  # the checkpoint is not the capsule's model

    @property
    def ok(self) -> bool:
        return self.checkpoint_mismatch is None and all(stage.disagreement is None for stage in self.stages)

    @property
    def first_disagreement(self) -> StageReport | None:
        return next((stage for stage in self.stages if stage.disagreement is not None), None)


def choose_examples(indices: Sequence[int], k: int | None, seed: int) -> list[int]:
    """``k`` of the run's example indices chosen with ``seed`` (all when ``k`` is None or at least
    their number), in index order."""
    import torch

    if k is None or k >= len(indices):
        return list(indices)
    generator = torch.Generator().manual_seed(seed)
    positions = torch.randperm(len(indices), generator=generator)[:k].sort().values
    return [int(indices[p]) for p in positions.tolist()]


def _label(ev: dict[str, Any]) -> str:
    if ev["kind"] == "clean":
        return "clean"
    if ev["kind"] == "certify":
        return f"certify {ev['method']}"
    return f"{ev['method']} {ev['norm']} {ev['eps']:g}"


def _targets(ev: dict[str, Any], order: list[int]) -> list[int]:
    """The stage's target list as the Evaluator formed it."""
    if ev["kind"] == "attack":
        present = {int(r["example_index"]) for r in ev["rows"]}
        return [e for e in order if e in present]
    return list(order)


def _batch_size(ev: dict[str, Any], batch_size: int) -> int:
    from bench.harness.stages import certify_batch

    if ev["kind"] != "certify":
        return batch_size
    return certify_batch((ev.get("params") or {}).get("certificate") or {}, batch_size)


def _recomputed_batches(ev: dict[str, Any], order: list[int], chosen: set[int], batch_size: int) -> list[list[int]]:
    """The members of every batch of the stage that holds a chosen example."""
    from bench.harness.stages import _batches

    return [members for _, members in _batches(_targets(ev, order), _batch_size(ev, batch_size))
            if chosen.intersection(members)]


def _check_checkpoint(capsule: dict[str, Any], checkpoint: str | None) -> tuple[str, str, str | None]:
    """The checkpoint to verify with, its sha256, and a mismatch message when that is not the
    capsule's model's sha256 (the examples are still re-run, so the report names the first one
    the swapped model disagrees on)."""
    from bench.training.checkpoints import sha256_file

    model = capsule.get("model") or {}
    expected = model.get("checkpoint_sha256")
    path = checkpoint or model.get("checkpoint_path")
    if not expected or not path:
        raise BenchError("the capsule records no model checkpoint to verify with")
    sha = sha256_file(path)
    if sha == expected:
        return str(path), sha, None
    return str(path), sha, (f"checkpoint sha256 mismatch: {path} has {sha[:16]}, the capsule's model has "
                            f"{expected[:16]}; this is not the model that produced the capsule")


def _partial_capsule(capsule: dict[str, Any], path: str, sha: str, removed: dict[int, set[int]]) -> dict[str, Any]:
    """The capsule with the model at ``path`` (of sha256 ``sha``) and without the rows to re-compute."""
    evaluations = [{**ev, "rows": [r for r in ev["rows"] if int(r["example_index"]) not in removed.get(i, set())]}
                   for i, ev in enumerate(capsule["evaluations"])]
    model = {**capsule["model"], "checkpoint_path": path, "checkpoint_sha256": sha}
    return {**capsule, "model": model, "evaluations": evaluations}


def verify_capsule(capsule: dict[str, Any], *, examples: int | None = 16, checkpoint: str | None = None,
                   seed: int = 0, device: str = "auto") -> Verification:
    """Re-compute the batches holding ``examples`` seeded examples of every stage and compare the
    chosen examples' rows with the capsule's (see the module docstring). A checkpoint whose
    sha256 is not the capsule's is reported (``checkpoint_mismatch``) and fails the verification;
    the examples are re-run with it all the same, so the report names the first disagreement."""
    from bench.results.capsule import import_capsule
    from bench.results.store import Store

    path, sha, mismatch = _check_checkpoint(capsule, checkpoint)
    run = capsule["run"]
    order = [int(i) for i in run["indices"] or []]
    chosen = choose_examples(order, examples, seed)
    batch_size = StoredConfig.from_json(run["config"]).batch_size
    plans = {i: _recomputed_batches(ev, order, set(chosen), batch_size)
             for i, ev in enumerate(capsule["evaluations"]) if not ev.get("skipped")}
    removed = {i: {e for members in batches for e in members} for i, batches in plans.items()}
    store = Store("sqlite://")
    try:
        run_id = import_capsule(store, _partial_capsule(capsule, path, sha, removed)).run_id
        recomputed = _recompute(store, run_id, capsule, device)
        report = Verification(chosen, checkpoint_mismatch=mismatch)
        for i, ev in enumerate(capsule["evaluations"]):
            report.stages.append(_compare(ev, recomputed.get(ev["position"], {}), chosen, plans.get(i)))
        return report
    finally:
        store.close()


def _recompute(store: Any, run_id: int, capsule: dict[str, Any], device: str) -> dict[int, dict[int, Any]]:
    """Run every (not skipped) stage of the imported run; the Evaluator computes only the missing
    batches. Returns the store's rows per stage position and example."""
    import torch

    from bench.harness.resolve import ResolvedRun
    from bench.harness.stored import load_model, load_run_examples
    from bench.progress import Progress

    run = store.get_run(run_id)
    resolved = ResolvedRun.from_stored(run, device)
    model = load_model(store, run, resolved)
    data = load_run_examples(run, resolved, Progress(), "verify")
    torch_device = torch.device(resolved.device)
    model.to(torch_device)
    out: dict[int, dict[int, Any]] = {}
    for ev in capsule["evaluations"]:
        if ev.get("skipped"):
            continue
        evaluator = _evaluator(store, run_id, model, data, torch_device, resolved, ev)
        _run_stage(evaluator, ev, resolved.radii)
    for stored_ev in store.evaluations(run_id):
        out[stored_ev.position] = {r.example_index: r for r in store.results([stored_ev.id])}
    return out


def _evaluator(store: Any, run_id: int, model: Any, data: Any, device: Any, resolved: Any, ev: dict[str, Any]) -> Any:
    """An Evaluator scoring as the stage did, through the one scoring policy with the stage's stored
    number of draws R: PREDICT for a smoothed model, else R draws (R > 1 also covers an escalated
    stage's raised R on a model whose randomness is undeclared)."""
    from bench.harness.stages import Evaluator, scoring_for
    from bench.progress import Progress

    draws = max([int(r.get("draws") or 1) for r in ev["rows"]], default=1)
    scoring = scoring_for(model, draws, randomized=True if draws > 1 else None, version=resolved.protocol.scoring,
                          exact=resolved.protocol.exact)
    return Evaluator(store, run_id, model, data, device, resolved.config.batch_size, resolved.config.seed,
                     scoring, Progress(), frozen=resolved.protocol.frozen)


def _run_stage(evaluator: Any, ev: dict[str, Any], radii: Sequence[float]) -> None:
    from bench.config import AttackSpec, CertifySpec

    params = ev.get("params") or {}
    if ev["kind"] == "clean":
        evaluator.clean()
    elif ev["kind"] == "attack":
        attack = AttackSpec.from_dict({**ev, "attack": ev["method"]})
        evaluator.attack(int(ev["position"]), attack, {int(r["example_index"]) for r in ev["rows"]})
    else:
        certify = CertifySpec(ev["method"], tuple(sorted((k, v) for k, v in params.items() if k != "certificate")))
        evaluator.certify(int(ev["position"]), certify, radii)


def _close(a: Any, b: Any) -> bool:
    if a is None or b is None:
        return a is b
    return math.isclose(float(a), float(b), rel_tol=TOLERANCE, abs_tol=TOLERANCE)


def _differences(stored: dict[str, Any], row: Any) -> list[str]:
    """The fields on which a stored row and a re-computed row disagree (``name stored X, recomputed Y``)."""
    out = [f"{name} stored {stored.get(name)!r}, recomputed {getattr(row, name)!r}" for name in EXACT_FIELDS
           if name in stored and stored.get(name) != getattr(row, name)]
    out += [f"{name} stored {stored.get(name)!r}, recomputed {getattr(row, name)!r}" for name in FLOAT_FIELDS
            if name in stored and not _close(stored.get(name), getattr(row, name))]
    ml_stored, ml_new = stored.get("multilabel"), row.multilabel
    if ml_stored is not None or ml_new is not None:
        ml_stored, ml_new = ml_stored or {}, ml_new or {}
        if ml_stored.get("pred") != ml_new.get("pred") or ml_stored.get("y") != ml_new.get("y") or not all(
                _close(a, b) for a, b in zip(ml_stored.get("score") or [], ml_new.get("score") or [])):
            out.append(f"multilabel stored {ml_stored}, recomputed {ml_new}")
    return out


def _compare(ev: dict[str, Any], recomputed: dict[int, Any], chosen: list[int],
             batches: list[list[int]] | None) -> StageReport:
    report = StageReport(int(ev["position"]), _label(ev), skipped=ev.get("skipped"))
    if batches is None:  # a stage that could not run on this model: nothing to re-compute
        return report
    report.batches = len(batches)
    stored = {int(r["example_index"]): r for r in ev["rows"]}
    for example in chosen:
        if example not in stored:
            continue  # not a target of this attack stage (already not robust)
        report.compared += 1
        row = recomputed.get(example)
        if row is None:
            report.disagreement = f"example {example}: stored row, none re-computed"
            return report
        diffs = _differences(stored[example], row)
        if diffs:
            report.disagreement = f"example {example}: " + "; ".join(diffs)
            return report
    return report
