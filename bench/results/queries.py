"""Queries that turn stored rows into the run summary (the ``--json`` object) and leaderboards."""

from __future__ import annotations

from collections import defaultdict
from typing import Any, cast

from bench.errors import BenchError
from bench.results.schema import ModelRow, RunRow, RunStatus
from bench.results.store import Store, iso
from bench.results.stored import StoredConfig
from bench.results.summary import Labels, Outcome, Stage, attack_table, certificate_table, certified_table, labels_from
from bench.results.types import (
    AttackTable,
    Escalation,
    ExampleOutcome,
    LabelMetrics,
    ModelInfo,
    RunSummary,
    TrainSummary,
)

__all__ = ["run_summary"]


def _stages_and_outcomes(store: Store, run_id: int) -> tuple[list[Stage], dict[int, list[Outcome]]]:
    evaluations = store.evaluations(run_id)
    stages = [Stage(e.id, e.position, e.kind, e.method, e.norm, e.eps, e.finished, e.sigma, e.skipped, e.params)
              for e in evaluations]
    outcomes: dict[int, list[Outcome]] = defaultdict(list)
    for row in store.results([s.id for s in stages]):
        outcomes[row.evaluation_id].append(Outcome(row.example_index, row.correct, row.radius, row.abstained,
                                                   row.label, row.multilabel, row.prediction, row.draws or 1,
                                                   row.correct_draws, row.samples_used))
    return stages, outcomes


def get_run_or_fail(store: Store, run_id: int) -> RunRow:
    run = store.get_run(run_id)
    if run is None:
        raise BenchError(f"no run with id {run_id} in {store.url}")
    return run


def run_summary(store: Store, run_id: int) -> RunSummary:
    """The run's summary object (stable keys, in this order; later versions only add keys).

    The run's stored configuration is read through :class:`StoredConfig` (task, classes,
    imbalance, radius grid, split, escalated stages) and included verbatim as ``config``."""
    run = get_run_or_fail(store, run_id)
    stages, outcomes = _stages_and_outcomes(store, run_id)
    n = run.n_examples or 0
    stored = StoredConfig.from_json(run.config)
    labels = labels_from(stages, outcomes, stored.task, stored.classes)
    table = attack_table(stages, outcomes, n, labels)
    return {
        "run_id": run.id,
        "defense": run.defense,
        "dataset": run.dataset,
        "protocol": f"{run.protocol}@{run.protocol_version}",
        "n_examples": n,
        "clean_accuracy": table["clean_accuracy"],
        "attacks": table["attacks"],
        "robust_accuracy": table["robust_accuracy"],
        "certified": certified_table(stages, outcomes, n, stored.radii),
        "certificate": certificate_table(stages, outcomes, n),
        "checks": [{"name": c.name, "triggered": c.triggered, "detail": c.detail} for c in store.checks(run_id)],
        "wall_time_s": run.wall_time_s,
        # additions beyond the stable core
        "clean_draws": table["clean_draws"],
        "pending_attacks": table["pending_attacks"],
        "skipped_attacks": table["skipped_attacks"],
        "task": labels.task,
        "imbalanced": stored.imbalanced,
        "balanced_accuracy": table["balanced_accuracy"],
        "per_class_recall": table["per_class_recall"],
        "robust_balanced_accuracy": table["robust_balanced_accuracy"],
        **_label_metrics(table),
        "split": stored.split,
        "status": run.status.value,
        "complete": run.status is RunStatus.FINISHED,
        "threat_models": table["threat_models"],
        "model": _model_info(store.get_model(run.model_id) if run.model_id is not None else None),
        "forward_passes": run.forward_passes,
        "backward_passes": run.backward_passes,
        "seed": run.seed,
        "indices_hash": run.indices_hash,
        "config": run.config,
        "provenance": run.provenance,
        "created_at": iso(run.created_at),
        "finished_at": iso(run.finished_at),
        "error": run.error,
        "escalation": _escalation(stages, outcomes, n, labels, stored.escalated, table),
        # the single-draw headline of a randomized run (added keys; the ones above keep their meaning)
        "clean_single_draw": table["clean_single_draw"],
        "robust_single_draw": table["robust_single_draw"],
        "robust_majority": table["robust_majority"],
    }


def _label_metrics(table: AttackTable) -> LabelMetrics:
    """The multilabel metrics of ``table``, when it has them."""
    out: LabelMetrics = {}
    if "per_label_accuracy" in table:
        out["per_label_accuracy"] = table["per_label_accuracy"]
    if "auroc" in table:
        out["auroc"] = table["auroc"]
    return out


def _model_info(model: ModelRow | None) -> ModelInfo | None:
    if model is None:
        return None
    return {"id": model.id, "source": model.source, "checkpoint_path": model.checkpoint_path,
            "checkpoint_sha256": model.checkpoint_sha256, "hparams": model.hparams,
            "train_summary": _short_train_summary(model.train_summary)}


def _escalation(stages: list[Stage], outcomes: dict[int, list[Outcome]], n: int, labels: Labels,
                escalated: dict[int, str], table: AttackTable) -> Escalation | None:
    """Robust accuracy without and with the stages ``--escalate`` added (``escalated``: stage
    position -> the check it remedies); both are results."""
    if not escalated:
        return None
    before = attack_table([s for s in stages if s.position not in escalated], outcomes, n, labels)
    return {
        "stages": [{"position": p, "check": c, "name": next((s.method for s in stages if s.position == p), None)}
                   for p, c in sorted(escalated.items())],
        "robust_accuracy_before": before["robust_accuracy"],
        "robust_accuracy_after": table["robust_accuracy"],
        "threat_models_before": before["threat_models"],
    }


def _short_train_summary(summary: dict[str, Any] | None) -> TrainSummary | None:
    if not summary:
        return None
    keys = ("epochs", "steps", "seconds", "final_loss", "final_train_accuracy")
    return cast(TrainSummary, {k: summary[k] for k in keys if k in summary})


def example_outcomes(store: Store, run_id: int) -> list[ExampleOutcome]:
    """One record per evaluated example: its label, clean correctness and, per threat model,
    ``broken_by`` (the first attack of the cascade that broke it, ``"clean"`` when the clean
    prediction is already wrong, ``None`` when it stayed robust)."""
    from bench.config import format_eps
    from bench.results.schema import EvalKind

    run = get_run_or_fail(store, run_id)
    stages, outcomes = _stages_and_outcomes(store, run_id)
    by_index = {s.id: {o.index: o for o in outcomes.get(s.id, [])} for s in stages}
    clean = next((s for s in stages if s.kind is EvalKind.CLEAN), None)
    cascades: dict[tuple[str | None, float | None], list[Stage]] = {}
    for stage in sorted(stages, key=lambda s: s.position):
        if stage.kind is EvalKind.ATTACK and stage.finished and not stage.skipped:
            cascades.setdefault((stage.norm, stage.eps), []).append(stage)
    records: list[ExampleOutcome] = []
    for index in run.indices or []:
        row = by_index.get(clean.id, {}).get(index) if clean is not None else None
        clean_ok = bool(row and row.correct)
        broken_by = {f"{norm} {format_eps(eps or 0.0)}": _broken_by(index, clean_ok, cascade, by_index)
                     for (norm, eps), cascade in cascades.items()}
        records.append({"index": index, "label": row.label if row else None, "clean_correct": clean_ok,
                        "broken_by": broken_by, "robust": clean_ok and all(v is None for v in broken_by.values())})
    return records


def _broken_by(index: int, clean_ok: bool, cascade: list[Stage], by_index: dict[int, dict[int, Outcome]]) -> str | None:
    """The first stage of ``cascade`` that broke example ``index`` ("clean" when its clean
    prediction is wrong, None when it stayed robust)."""
    if not clean_ok:
        return "clean"
    for stage in cascade:
        outcome = by_index[stage.id].get(index)
        if outcome is not None and not outcome.correct:
            return stage.method
    return None
