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
* single-draw accuracy (the headline of a randomized run, ``*single_draw``): per example
  ``v = correct_draws / draws`` (0 where a stage has no row for it); along a cascade
  ``c_k = min(c_{k-1}, v_k)`` with ``c_0`` the clean value; a threat model's value is ``c``
  after its last finished stage, the robust value the minimum over threat models; each figure
  is the mean over the n examples with a 95% interval (:func:`bench.results.intervals.single_draw_interval`);
  the same rule over ``majority_correct`` (0/1) gives the cumulative majority-of-R figures;
* medical metrics: balanced accuracy (mean per-class recall over the classes present) and
  per-class recall for single-label tasks; for multilabel tasks, per-label accuracy (label
  correct on the clean input and under every attack so far) and AUROC per label and macro.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, cast

from bench.results.intervals import single_draw_interval
from bench.results.schema import EvalKind
from bench.results.types import (
    AttackRow,
    AttackTable,
    CertificateRow,
    CertifiedRow,
    ClassMetrics,
    DrawScores,
    LabelMetrics,
    RunSummary,
    SingleDraw,
    StageRef,
    ThreatRow,
)

Threat = tuple[str, float]  # (norm, eps) of an attack stage


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


def draw_scores(rows: Sequence[Outcome], n: int) -> DrawScores:
    """Scoring over R draws: ``mean`` (average fraction of correct draws), ``majority`` (the vote
    is correct) and ``worst_of_r`` (all draws correct); examples without a row count as wrong."""
    return {"mean": _fraction(sum(o.draw_fraction for o in rows), n),
            "majority": _fraction(sum(1 for o in rows if o.majority_correct), n),
            "worst_of_r": _fraction(sum(1 for o in rows if o.correct), n)}


def scoring_draws(summary: RunSummary) -> int:
    """R of a run summary: the largest number of draws behind its single-draw figures (1 for a
    deterministic run, or a summary written before they existed)."""
    blocks = [summary.get("clean_single_draw"), summary.get("robust_single_draw"),
              *(a.get("single_draw") for a in summary["attacks"])]
    return max((b["draws"] for b in blocks if b), default=1)


def scoring_exact(summary: RunSummary) -> bool:
    """Whether the run scored its randomized model with every draw of its declared draw space
    (``--exact-draws``, stored in its protocol): its single-draw figures then have no draw noise,
    and "all R draws" (R = the whole space) is not the worst-of-R figure of a sampled run."""
    protocol = (summary.get("config") or {}).get("protocol") or {}
    return bool(protocol.get("exact_draws"))


def _max_draws(rows: Sequence[Outcome]) -> int:
    return max((o.draws for o in rows), default=1)


@dataclass(frozen=True)
class Track:
    """Per-example cumulative values of one scoring along a cascade (examples of the clean stage;
    every other example is 0), with the largest R and whether every row behind them had one draw."""

    values: dict[int, float]
    draws: int = 1
    one_draw: bool = True

    @classmethod
    def start(cls, clean_rows: Sequence[Outcome], value: Callable[[Outcome], float]) -> Track:
        """The clean values ``c_0``."""
        return cls({o.index: value(o) for o in clean_rows}, _max_draws(clean_rows),
                   all(o.draws == 1 for o in clean_rows))

    def step(self, rows: Sequence[Outcome], value: Callable[[Outcome], float]) -> Track:
        """``c_k = min(c_{k-1}, v_k)``, ``v_k`` 0 for an example without a row in this stage."""
        v = {o.index: value(o) for o in rows}
        return Track({i: min(c, v.get(i, 0.0)) for i, c in self.values.items()}, max(self.draws, _max_draws(rows)),
                     self.one_draw and all(o.draws == 1 for o in rows))

    @staticmethod
    def worst(tracks: Iterable[Track]) -> Track:
        """The per-example minimum over ``tracks`` (all over the same clean examples)."""
        tracks = list(tracks)
        return Track({i: min(t.values[i] for t in tracks) for i in tracks[0].values},
                     max(t.draws for t in tracks), all(t.one_draw for t in tracks))

    def mean(self, n: int) -> float | None:
        """The mean over the n examples (examples outside ``values`` count 0)."""
        return _fraction(sum(self.values.values()), n)

    def single_draw(self, n: int) -> SingleDraw:
        """The mean with its 95% interval (over the n examples, padded with zeros)."""
        padded = list(self.values.values()) + [0.0] * max(n - len(self.values), 0)
        ci = single_draw_interval(padded, self.one_draw) if n else None
        return {"accuracy": self.mean(n), "interval": list(ci) if ci is not None else None, "draws": self.draws}


def single_draw_value(o: Outcome) -> float:
    """An example's single-draw value in one stage: the fraction of its R draws that were correct."""
    return o.draw_fraction


def majority_value(o: Outcome) -> float:
    """1.0 when the example's majority vote is correct, else 0.0."""
    return float(o.majority_correct)


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


def _fraction(part: float, n: int) -> float | None:
    """``part / n``, or ``None`` when there are no examples."""
    return part / n if n else None


def _threat(stage: Stage) -> Threat:
    """An attack stage's threat model (attack stages always store their norm and eps)."""
    return cast(Threat, (stage.norm, stage.eps))


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


def class_metrics(robust: set[int], labels: Labels) -> ClassMetrics:
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
                  n: int) -> LabelMetrics:
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
                 labels: Labels | None = None) -> AttackTable:
    """Clean accuracy, cumulative per-attack accuracy, per-threat and overall worst case, and the
    medical metrics of each (when ``labels`` is given); beside each, the single-draw accuracy
    with its interval and the cumulative majority of R (module docstring)."""
    labels = labels or Labels("multiclass", (), {}, {})
    clean = [s for s in stages if s.kind is EvalKind.CLEAN]
    clean_rows = [o for s in clean for o in outcomes.get(s.id, [])]
    clean_ok = {o.index for o in clean_rows if o.correct}
    clean_labels = {o.index: _label_ok(o) for o in clean_rows if o.multilabel}
    attack_stages = sorted((s for s in stages if s.kind is EvalKind.ATTACK), key=lambda s: s.position)
    start = Scorings(Track.start(clean_rows, single_draw_value), Track.start(clean_rows, majority_value))
    attacks, groups, scorings = _cascades(attack_stages, outcomes, n, labels, clean_ok, clean_labels, start)
    robust_set: set[int] = set()
    if groups:
        robust_set = set(clean_ok)
        for alive in groups.values():
            robust_set &= alive
    robust = Scorings(Track.worst(s.single for s in scorings.values()),
                      Track.worst(s.majority for s in scorings.values())) if groups else None
    clean_metrics = class_metrics(clean_ok, labels)
    clean_single = start.single.single_draw(n)
    if not clean:
        clean_single["accuracy"] = clean_single["interval"] = None
    out: AttackTable = {
        "clean_accuracy": _fraction(len(clean_ok), n) if clean else None,
        "clean_draws": {"draws": _max_draws(clean_rows), **draw_scores(clean_rows, n)},
        "attacks": attacks,
        "pending_attacks": [_stage_ref(s) for s in attack_stages if not s.finished],
        "skipped_attacks": [{**_stage_ref(s), "reason": s.skipped} for s in attack_stages if s.skipped],
        "threat_models": [_threat_row(threat, alive, labels, n, scorings[threat]) for threat, alive in groups.items()],
        "robust_accuracy": _fraction(len(robust_set), n) if groups else None,
        "balanced_accuracy": clean_metrics.get("balanced_accuracy"),
        "per_class_recall": clean_metrics.get("per_class_recall"),
        "robust_balanced_accuracy": class_metrics(robust_set, labels).get("balanced_accuracy") if groups else None,
        "clean_single_draw": clean_single,
        "robust_single_draw": robust.single.single_draw(n) if robust else None,
        "robust_majority": robust.majority.mean(n) if robust else None,
    }
    if labels.task == "multilabel":
        clean_scores = {o.index: list(o.multilabel["score"]) for o in clean_rows if o.multilabel}
        out.update(label_metrics(clean_labels, clean_scores, labels, n))
    return out


@dataclass(frozen=True)
class Scorings:
    """The single-draw and the majority-of-R tracks of one cascade."""

    single: Track
    majority: Track

    def step(self, rows: Sequence[Outcome]) -> Scorings:
        return Scorings(self.single.step(rows, single_draw_value), self.majority.step(rows, majority_value))


def _cascades(attack_stages: Sequence[Stage], outcomes: dict[int, list[Outcome]], n: int, labels: Labels,
              clean_ok: set[int], clean_labels: dict[int, list[bool]], start: Scorings,
              ) -> tuple[list[AttackRow], dict[Threat, set[int]], dict[Threat, Scorings]]:
    """The finished, not skipped attack stages (neither counts as "broken"), in position order,
    each as a row of its threat model's cascade, the examples each threat model leaves robust
    (in the order the threat models first appear) and each threat model's scorings after its
    last stage (``start``: the clean ones)."""
    rows_out: list[AttackRow] = []
    groups: dict[Threat, set[int]] = {}
    scorings: dict[Threat, Scorings] = {}
    group_labels: dict[Threat, dict[int, list[bool]]] = {}
    for stage in (s for s in attack_stages if s.finished and not s.skipped):
        threat = _threat(stage)
        rows = outcomes.get(stage.id, [])
        alive = groups.get(threat, clean_ok) & {o.index for o in rows if o.correct}
        groups[threat] = alive
        scorings[threat] = scorings.get(threat, start).step(rows)
        entry: AttackRow = {"name": stage.method, "norm": threat[0], "eps": threat[1],
                            "accuracy": _fraction(len(alive), n), **class_metrics(alive, labels),
                            "draws": _max_draws(rows), **draw_scores(rows, n),
                            "single_draw": scorings[threat].single.single_draw(n),
                            "cumulative_majority": scorings[threat].majority.mean(n)}
        if labels.task == "multilabel":
            group_labels[threat] = _labels_still_ok(group_labels.get(threat, clean_labels), rows)
            scores = {o.index: list(o.multilabel["score"]) for o in rows if o.multilabel}
            entry.update(label_metrics(group_labels[threat], scores, labels, n))
        rows_out.append(entry)
    return rows_out, groups, scorings


def _stage_ref(stage: Stage) -> StageRef:
    norm, eps = _threat(stage)
    return {"name": stage.method, "norm": norm, "eps": eps}


def _threat_row(threat: Threat, alive: set[int], labels: Labels, n: int, scorings: Scorings) -> ThreatRow:
    return {"norm": threat[0], "eps": threat[1], "robust_accuracy": _fraction(len(alive), n),
            **class_metrics(alive, labels), "robust_single_draw": scorings.single.single_draw(n),
            "robust_majority": scorings.majority.mean(n)}


def _labels_still_ok(before: dict[int, list[bool]], rows: Sequence[Outcome]) -> dict[int, list[bool]]:
    """Per example, per label: correct before and on this stage's row (multilabel cascades)."""
    per_label = dict(before)
    for o in rows:
        if o.multilabel and o.index in per_label:
            per_label[o.index] = [a and b for a, b in zip(per_label[o.index], _label_ok(o))]
    return per_label


def _label_ok(o: Outcome) -> list[bool]:
    assert o.multilabel is not None
    return [int(p) == int(t) for p, t in zip(o.multilabel["pred"], o.multilabel["y"])]


def certified_table(stages: Sequence[Stage], outcomes: dict[int, list[Outcome]], n: int,
                    radii: Iterable[float]) -> list[CertifiedRow]:
    """Certified accuracy at each radius, for each certification stage (a fraction of all ``n``
    examples: while a stage is unfinished, ``certified_examples`` < n and the value is partial)."""
    out: list[CertifiedRow] = []
    radii = list(radii)
    for stage in sorted((s for s in stages if s.kind is EvalKind.CERTIFY), key=lambda s: s.position):
        rows = outcomes.get(stage.id, [])
        for r in radii:
            hits = sum(1 for o in rows if o.correct and not o.abstained and o.radius is not None and o.radius >= r)
            out.append({"certifier": stage.method, "radius": r, "accuracy": _fraction(hits, n),
                        "position": stage.position, "certified_examples": len(rows)})
    return out


def certificate_table(stages: Sequence[Stage], outcomes: dict[int, list[Outcome]], n: int) -> list[CertificateRow]:
    """Per certification stage: its parameters (n0, n, alpha, sigma or L), the average certified
    radius (abstentions and wrong predictions count as radius 0), the abstention rate and the
    mean number of samples per example."""
    out: list[CertificateRow] = []
    for stage in sorted((s for s in stages if s.kind is EvalKind.CERTIFY), key=lambda s: s.position):
        rows = outcomes.get(stage.id, [])
        radii = [o.radius or 0.0 for o in rows if o.correct and not o.abstained]
        samples = [o.samples_used for o in rows if o.samples_used is not None]
        described: dict[str, Any] = (stage.params or {}).get("certificate") or {}  # a plugin may add keys
        out.append(cast(CertificateRow, {
            "certifier": stage.method, "position": stage.position, "finished": stage.finished,
            **described,
            "average_radius": (sum(radii) / n) if n and len(rows) == n else None,
            "abstention_rate": _fraction(sum(1 for o in rows if o.abstained), len(rows)) if rows else None,
            "mean_samples": (sum(samples) / len(samples)) if samples else None,
            "certified_examples": len(rows),
        }))
    return out
