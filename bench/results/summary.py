"""Aggregates computed from per-example rows, as pure functions.

Semantics (docs/protocols.md):

* clean accuracy: correct clean predictions / n;
* attacks sharing a threat model (norm, eps) form a cascade: each runs only on examples still
  robust, and an attack's ``accuracy`` is the robust accuracy *after* it (cumulative);
* a threat model's robust accuracy is the per-example worst case over its attacks;
* ``robust_accuracy`` is the per-example worst case over every attack of the run
  (robust under all threat models at once), or ``None`` when no attack ran;
* certified accuracy at radius r: correct, not abstained, and radius >= r, over n;
* randomized models are scored with R draws per example: ``worst_of_r`` (robust only if every
  draw is correct; this is ``accuracy``), ``mean`` (average fraction of correct draws) and
  ``majority`` (the majority vote is correct), each over the n examples, an example the stage
  did not attack (already broken) counting as wrong;
* medical metrics: balanced accuracy (mean per-class recall over the classes present) and
  per-class recall for single-label tasks; for multilabel tasks, per-label accuracy (label
  correct on the clean input and under every attack so far) and AUROC per label and macro.
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
    label: int | None = None
    multilabel: dict[str, Any] | None = None
    prediction: int | None = None
    draws: int = 1
    correct_draws: int | None = None
    samples_used: int | None = None

    @property
    def draw_fraction(self) -> float:
        """Fraction of the R scoring draws that were correct."""
        if self.correct_draws is None:
            return float(self.correct)
        return self.correct_draws / max(self.draws, 1)

    @property
    def majority_correct(self) -> bool:
        """Whether the majority-vote prediction is correct."""
        if self.multilabel:
            return list(self.multilabel["pred"]) == list(self.multilabel["y"])
        if self.prediction is None or self.label is None:
            return self.correct
        return self.prediction == self.label


def draw_scores(rows: Sequence[Outcome], n: int) -> dict[str, float | None]:
    """Scoring over R draws: ``mean`` (average fraction of correct draws), ``majority`` (the vote
    is correct) and ``worst_of_r`` (all draws correct); examples without a row count as wrong."""
    return {"mean": _fraction_f(sum(o.draw_fraction for o in rows), n),
            "majority": _fraction(sum(1 for o in rows if o.majority_correct), n),
            "worst_of_r": _fraction(sum(1 for o in rows if o.correct), n)}


def _fraction_f(total: float, n: int) -> float | None:
    return total / n if n else None


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
    skipped: str | None = None
    params: dict[str, Any] | None = None


def _fraction(count: int, n: int) -> float | None:
    return count / n if n else None


@dataclass(frozen=True)
class Labels:
    """Ground truth of the evaluated examples, from the clean stage."""

    task: str
    classes: tuple[str, ...]
    single: dict[int, int]  # example -> class (single-label tasks)
    multi: dict[int, list[int]]  # example -> 0/1 per label (multilabel)


def labels_from(stages: Sequence[Stage], outcomes: dict[int, list[Outcome]], task: str,
                classes: Sequence[str]) -> Labels:
    clean = [o for s in stages if s.kind is EvalKind.CLEAN for o in outcomes.get(s.id, [])]
    single = {o.index: o.label for o in clean if o.label is not None}
    multi = {o.index: list(o.multilabel["y"]) for o in clean if o.multilabel}
    return Labels(task, tuple(classes), single, multi)


def class_metrics(robust: set[int], labels: Labels) -> dict[str, Any]:
    """Balanced accuracy and per-class recall of the examples in ``robust`` (single-label tasks)."""
    if labels.task == "multilabel" or not labels.single:
        return {}
    recall: dict[str, float] = {}
    for k, name in enumerate(labels.classes):
        members = [i for i, c in labels.single.items() if c == k]
        if members:
            recall[name] = sum(1 for i in members if i in robust) / len(members)
    return {"balanced_accuracy": sum(recall.values()) / len(recall) if recall else None,
            "per_class_recall": recall}


def label_metrics(per_label_ok: dict[int, list[bool]], scores: dict[int, list[float]], labels: Labels,
                  n: int) -> dict[str, Any]:
    """Per-label accuracy and AUROC (per label and macro over labels with both outcomes present)."""
    if labels.task != "multilabel" or not labels.multi:
        return {}
    names = labels.classes
    accuracy = {name: _fraction(sum(1 for ok in per_label_ok.values() if ok[k]), n) for k, name in enumerate(names)}
    auroc: dict[str, float | None] = {}
    for k, name in enumerate(names):
        pairs = [(labels.multi[i][k], scores[i][k]) for i in scores if i in labels.multi]
        auroc[name] = _auroc([p[0] for p in pairs], [p[1] for p in pairs])
    defined = [v for v in auroc.values() if v is not None]
    return {"per_label_accuracy": accuracy, "auroc": {"macro": sum(defined) / len(defined) if defined else None,
                                                      "per_label": auroc}}


def _auroc(y: list[int], score: list[float]) -> float | None:
    if len(set(y)) < 2:
        return None  # undefined when a label is all positive or all negative
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(y, score))


def attack_table(stages: Sequence[Stage], outcomes: dict[int, list[Outcome]], n: int,
                 labels: Labels | None = None) -> dict[str, Any]:
    """Clean accuracy, cumulative per-attack accuracy, per-threat and overall worst case, and the
    medical metrics of each (when ``labels`` is given)."""
    labels = labels or Labels("multiclass", (), {}, {})
    clean = [s for s in stages if s.kind is EvalKind.CLEAN]
    clean_rows = [o for s in clean for o in outcomes.get(s.id, [])]
    clean_ok = {o.index for o in clean_rows if o.correct}
    clean_labels = {o.index: _label_ok(o) for o in clean_rows if o.multilabel}
    clean_scores = {o.index: list(o.multilabel["score"]) for o in clean_rows if o.multilabel}
    attacks_out: list[dict[str, Any]] = []
    groups: dict[tuple[str | None, float | None], set[int]] = {}
    group_labels: dict[tuple[str | None, float | None], dict[int, list[bool]]] = {}
    attack_stages = sorted((s for s in stages if s.kind is EvalKind.ATTACK), key=lambda s: s.position)
    pending = [{"name": s.method, "norm": s.norm, "eps": s.eps} for s in attack_stages if not s.finished]
    skipped = [{"name": s.method, "norm": s.norm, "eps": s.eps, "reason": s.skipped}
               for s in attack_stages if s.skipped]
    for stage in (s for s in attack_stages if s.finished and not s.skipped):  # neither counts as "broken"
        key = (stage.norm, stage.eps)
        rows = outcomes.get(stage.id, [])
        alive = groups.get(key, clean_ok) & {o.index for o in rows if o.correct}
        groups[key] = alive
        entry: dict[str, Any] = {"name": stage.method, "norm": stage.norm, "eps": stage.eps,
                                 "accuracy": _fraction(len(alive), n), **class_metrics(alive, labels),
                                 "draws": max((o.draws for o in rows), default=1),
                                 **draw_scores(rows, n)}
        if labels.task == "multilabel":
            per_label = dict(group_labels.get(key, clean_labels))
            for o in rows:
                if o.multilabel and o.index in per_label:
                    per_label[o.index] = [a and b for a, b in zip(per_label[o.index], _label_ok(o))]
            group_labels[key] = per_label
            entry.update(label_metrics(per_label, {o.index: list(o.multilabel["score"]) for o in rows if o.multilabel},
                                       labels, n))
        attacks_out.append(entry)
    threats = [{"norm": norm, "eps": eps, "robust_accuracy": _fraction(len(alive), n),
                **class_metrics(alive, labels)} for (norm, eps), alive in groups.items()]
    robust: float | None = None
    robust_set: set[int] = set()
    if groups:
        robust_set = set(clean_ok)
        for alive in groups.values():
            robust_set &= alive
        robust = _fraction(len(robust_set), n)
    clean_metrics = class_metrics(clean_ok, labels)
    out = {
        "clean_accuracy": _fraction(len(clean_ok), n) if clean else None,
        "clean_draws": {"draws": max((o.draws for o in clean_rows), default=1), **draw_scores(clean_rows, n)},
        "attacks": attacks_out,
        "pending_attacks": pending,
        "skipped_attacks": skipped,
        "threat_models": threats,
        "robust_accuracy": robust,
        "balanced_accuracy": clean_metrics.get("balanced_accuracy"),
        "per_class_recall": clean_metrics.get("per_class_recall"),
        "robust_balanced_accuracy": class_metrics(robust_set, labels).get("balanced_accuracy") if groups else None,
    }
    if labels.task == "multilabel":
        out.update(label_metrics(clean_labels, clean_scores, labels, n))
    return out


def _label_ok(o: Outcome) -> list[bool]:
    assert o.multilabel is not None
    return [int(p) == int(t) for p, t in zip(o.multilabel["pred"], o.multilabel["y"])]


def certified_table(stages: Sequence[Stage], outcomes: dict[int, list[Outcome]], n: int,
                    radii: Iterable[float]) -> list[dict[str, Any]]:
    """Certified accuracy at each radius, for each certification stage (a fraction of all ``n``
    examples: while a stage is unfinished, ``certified_examples`` < n and the value is partial)."""
    out: list[dict[str, Any]] = []
    radii = list(radii)
    for stage in sorted((s for s in stages if s.kind is EvalKind.CERTIFY), key=lambda s: s.position):
        rows = outcomes.get(stage.id, [])
        for r in radii:
            hits = sum(1 for o in rows if o.correct and not o.abstained and o.radius is not None and o.radius >= r)
            out.append({"certifier": stage.method, "radius": r, "accuracy": _fraction(hits, n),
                        "position": stage.position, "certified_examples": len(rows)})
    return out


def certificate_table(stages: Sequence[Stage], outcomes: dict[int, list[Outcome]], n: int) -> list[dict[str, Any]]:
    """Per certification stage: its parameters (n0, n, alpha, sigma or L), the average certified
    radius (abstentions and wrong predictions count as radius 0), the abstention rate and the
    mean number of samples per example."""
    out: list[dict[str, Any]] = []
    for stage in sorted((s for s in stages if s.kind is EvalKind.CERTIFY), key=lambda s: s.position):
        rows = outcomes.get(stage.id, [])
        radii = [o.radius or 0.0 for o in rows if o.correct and not o.abstained]
        samples = [o.samples_used for o in rows if o.samples_used is not None]
        out.append({
            "certifier": stage.method, "position": stage.position, "finished": stage.finished,
            **((stage.params or {}).get("certificate") or {}),
            "average_radius": (sum(radii) / n) if n and len(rows) == n else None,
            "abstention_rate": _fraction(sum(1 for o in rows if o.abstained), len(rows)) if rows else None,
            "mean_samples": (sum(samples) / len(samples)) if samples else None,
            "certified_examples": len(rows),
        })
    return out
