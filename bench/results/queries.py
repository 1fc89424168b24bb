"""Queries that turn stored rows into the run summary (the ``--json`` object) and leaderboards."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from bench.errors import BenchError
from bench.results.schema import RunRow, RunStatus
from bench.results.store import Store, iso
from bench.results.summary import Outcome, Stage, attack_table, certificate_table, certified_table, labels_from

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


def run_summary(store: Store, run_id: int) -> dict[str, Any]:
    """The run's summary object (stable keys; later versions only add keys)."""
    run = get_run_or_fail(store, run_id)
    stages, outcomes = _stages_and_outcomes(store, run_id)
    n = run.n_examples or 0
    config = run.config or {}
    spec = config.get("dataset_spec") or {}
    labels = labels_from(stages, outcomes, spec.get("task", "multiclass"), spec.get("classes", []))
    table = attack_table(stages, outcomes, n, labels)
    radii = config.get("radii") or []
    model = store.get_model(run.model_id) if run.model_id is not None else None
    return {
        "run_id": run.id,
        "defense": run.defense,
        "dataset": run.dataset,
        "protocol": f"{run.protocol}@{run.protocol_version}",
        "n_examples": n,
        "clean_accuracy": table["clean_accuracy"],
        "attacks": table["attacks"],
        "robust_accuracy": table["robust_accuracy"],
        "certified": certified_table(stages, outcomes, n, radii),
        "certificate": certificate_table(stages, outcomes, n),
        "checks": [{"name": c.name, "triggered": c.triggered, "detail": c.detail} for c in store.checks(run_id)],
        "wall_time_s": run.wall_time_s,
        # additions beyond the stable core
        "clean_draws": table["clean_draws"],
        "pending_attacks": table["pending_attacks"],
        "skipped_attacks": table["skipped_attacks"],
        "task": labels.task,
        "imbalanced": bool(spec.get("imbalanced", False)),
        "balanced_accuracy": table["balanced_accuracy"],
        "per_class_recall": table["per_class_recall"],
        "robust_balanced_accuracy": table["robust_balanced_accuracy"],
        **({k: table[k] for k in ("per_label_accuracy", "auroc") if k in table}),
        "split": config.get("split", "test"),
        "status": run.status.value,
        "complete": run.status is RunStatus.FINISHED,
        "threat_models": table["threat_models"],
        "model": None if model is None else {
            "id": model.id, "source": model.source, "checkpoint_path": model.checkpoint_path,
            "checkpoint_sha256": model.checkpoint_sha256, "hparams": model.hparams,
            "train_summary": _short_train_summary(model.train_summary),
        },
        "forward_passes": run.forward_passes,
        "backward_passes": run.backward_passes,
        "seed": run.seed,
        "indices_hash": run.indices_hash,
        "config": run.config,
        "provenance": run.provenance,
        "created_at": iso(run.created_at),
        "finished_at": iso(run.finished_at),
        "error": run.error,
        "escalation": _escalation(stages, outcomes, n, labels, config, table),
    }


def _escalation(stages: list[Stage], outcomes: dict[int, list[Outcome]], n: int, labels: Any,
                config: dict[str, Any], table: dict[str, Any]) -> dict[str, Any] | None:
    """Robust accuracy without and with the stages ``--escalate`` added (both results)."""
    escalated = {int(e["position"]): e["escalated_for"] for e in config.get("extra_attacks", [])
                 if e.get("escalated_for")}
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


def _short_train_summary(summary: dict[str, Any] | None) -> dict[str, Any] | None:
    if not summary:
        return None
    return {k: summary[k] for k in ("epochs", "steps", "seconds", "final_loss", "final_train_accuracy") if k in summary}


def example_outcomes(store: Store, run_id: int) -> list[dict[str, Any]]:
    """One record per evaluated example: its label, clean correctness and, per threat model,
    ``broken_by`` (the first attack of the cascade that broke it, ``"clean"`` when the clean
    prediction is already wrong, ``None`` when it stayed robust)."""
    from bench.config import format_eps
    from bench.results.schema import EvalKind

    run = get_run_or_fail(store, run_id)
    stages, outcomes = _stages_and_outcomes(store, run_id)
    by_index = {s.id: {o.index: o for o in outcomes.get(s.id, [])} for s in stages}
    clean = next((s for s in stages if s.kind is EvalKind.CLEAN), None)
    attacks = [s for s in sorted(stages, key=lambda s: s.position)
               if s.kind is EvalKind.ATTACK and s.finished and not s.skipped]
    threats = list(dict.fromkeys((s.norm, s.eps) for s in attacks))
    records = []
    for index in run.indices or []:
        row = by_index.get(clean.id, {}).get(index) if clean is not None else None
        clean_ok = bool(row and row.correct)
        record: dict[str, Any] = {"index": index, "label": row.label if row else None, "clean_correct": clean_ok,
                                  "broken_by": {}}
        for norm, eps in threats:
            broken: str | None = None if clean_ok else "clean"
            for stage in (s for s in attacks if (s.norm, s.eps) == (norm, eps)):
                if broken is not None:
                    break
                outcome = by_index[stage.id].get(index)
                if outcome is not None and not outcome.correct:
                    broken = stage.method
            record["broken_by"][f"{norm} {format_eps(eps or 0.0)}"] = broken
        record["robust"] = clean_ok and all(v is None for v in record["broken_by"].values())
        records.append(record)
    return records
