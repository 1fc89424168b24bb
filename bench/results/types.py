"""The typed shape of the run summary (:func:`bench.results.queries.run_summary`, the ``--json``
object) and of each record in it.

These are ``TypedDict`` classes, not dataclasses: a summary is a plain dict, printed by ``--json``
exactly as it is built (its keys, their order and their values are the stable interface; later
versions only add keys), while mypy checks every key a producer writes and a reader uses, so a
misspelled or missing key is a type error instead of a silent ``KeyError`` or ``None``.

Keys that only some records have (medical metrics, what a certifier describes) are in the
``total=False`` parts; Python 3.10 has no ``typing.NotRequired``. Key order at runtime is the
order in which the producers (:mod:`bench.results.summary`, :mod:`bench.results.queries`) build
the dicts, not the order of the fields below.
"""

from __future__ import annotations

from typing import Any, TypedDict

__all__ = [
    "AttackRow", "AttackTable", "Auroc", "CertificateRow", "CertifiedRow", "CheckRecord", "ClassMetrics",
    "CleanDraws", "DrawScores", "EscalatedStage", "Escalation", "ExampleOutcome", "LabelMetrics", "ModelInfo",
    "RunSummary", "SingleDraw", "SkippedStage", "StageRef", "ThreatRow", "TrainSummary",
]


class DrawScores(TypedDict):
    """Scoring over R draws, each a fraction of all n examples (``None`` when n is 0)."""

    mean: float | None  # average fraction of correct draws
    majority: float | None  # the majority vote is correct
    worst_of_r: float | None  # every draw is correct


class SingleDraw(TypedDict):
    """Single-draw accuracy: the mean over the n examples of the fraction of correct draws
    (cumulative over a cascade: per example the minimum over its stages; an example a stage did
    not attack counts 0), the probability that one forward pass is correct. The headline of a
    randomized run (docs/evaluation.md#2-scoring-randomized-defenses)."""

    accuracy: float | None  # None when n is 0 or the stage is absent
    interval: list[float] | None  # 95%: Clopper-Pearson when every row has one draw, else Student-t
    draws: int  # R: the largest number of draws of the rows behind the value


class CleanDraws(DrawScores):
    """The clean stage's draw scores and its number of draws R."""

    draws: int


class ClassMetrics(TypedDict, total=False):
    """Single-label tasks with labels only: both keys present, or neither."""

    balanced_accuracy: float | None  # mean per-class recall over the classes present
    per_class_recall: dict[str, float]


class Auroc(TypedDict):
    macro: float | None  # over the labels with both outcomes present
    per_label: dict[str, float | None]


class LabelMetrics(TypedDict, total=False):
    """Multilabel tasks only: both keys present, or neither."""

    per_label_accuracy: dict[str, float | None]
    auroc: Auroc


class StageRef(TypedDict):
    """An attack stage's method and threat model (``pending_attacks``: not finished yet)."""

    name: str
    norm: str
    eps: float


class SkippedStage(StageRef):
    reason: str | None  # why the attack could not run on this model


class AttackRow(StageRef, DrawScores, ClassMetrics, LabelMetrics):
    """A finished attack stage: ``accuracy`` is its threat model's robust accuracy *after* it
    (cumulative over the cascade); the draw scores count this stage's rows only."""

    accuracy: float | None
    draws: int
    single_draw: SingleDraw  # cumulative over the cascade, like ``accuracy``
    cumulative_majority: float | None  # majority vote correct at every stage so far (0/1 per example)


class ThreatRow(ClassMetrics):
    """A threat model: the per-example worst case over its attacks."""

    norm: str
    eps: float
    robust_accuracy: float | None
    robust_single_draw: SingleDraw
    robust_majority: float | None


class CertifiedRow(TypedDict):
    """Certified accuracy of one certification stage at one radius (over all n examples)."""

    certifier: str
    radius: float
    accuracy: float | None
    position: int
    certified_examples: int  # < n while the stage is unfinished: the value is partial


class _CertificateCore(TypedDict):
    certifier: str
    position: int
    finished: bool
    average_radius: float | None
    abstention_rate: float | None
    mean_samples: float | None
    certified_examples: int


class CertificateRow(_CertificateCore, total=False):
    """One certification stage: what its certifier describes (the ``certificate`` block it stored,
    between ``finished`` and ``average_radius``), ACR, abstention rate and samples per example.

    The optional keys are those the built-in certifiers describe; a certifier plugin may add its
    own, which the summary passes through unchanged."""

    sigma: float  # smoothing
    n0: int
    n: int
    alpha: float
    sequential: bool
    amp: bool
    L: float  # lipschitz
    guarantee: str
    randomized: bool
    clip: float
    bound: str


class CheckRecord(TypedDict):
    name: str
    triggered: bool  # the number may be wrong (docs/checks.md)
    detail: str


class TrainSummary(TypedDict, total=False):
    """The short training summary: the keys the stored one has, among these."""

    epochs: int
    steps: int
    seconds: float
    final_loss: float
    final_train_accuracy: float


class ModelInfo(TypedDict):
    id: int
    source: str  # trained | file
    checkpoint_path: str | None
    checkpoint_sha256: str | None
    hparams: dict[str, Any]
    train_summary: TrainSummary | None


class EscalatedStage(TypedDict):
    position: int
    check: str  # the sanity check whose remedy the stage is
    name: str | None  # the attack


class Escalation(TypedDict):
    """Robust accuracy without and with the stages ``--escalate`` added."""

    stages: list[EscalatedStage]
    robust_accuracy_before: float | None
    robust_accuracy_after: float | None
    threat_models_before: list[ThreatRow]


class AttackTable(LabelMetrics):
    """What :func:`bench.results.summary.attack_table` computes from the clean and attack stages."""

    clean_accuracy: float | None
    clean_draws: CleanDraws
    attacks: list[AttackRow]
    pending_attacks: list[StageRef]
    skipped_attacks: list[SkippedStage]
    threat_models: list[ThreatRow]
    robust_accuracy: float | None  # worst case over every attack of the run; None when none ran
    balanced_accuracy: float | None
    per_class_recall: dict[str, float] | None
    robust_balanced_accuracy: float | None
    clean_single_draw: SingleDraw
    robust_single_draw: SingleDraw | None  # None when no attack ran
    robust_majority: float | None  # None when no attack ran


class RunSummary(LabelMetrics):
    """The run summary (``bench run/show/attack --json``); docs/protocols.md gives the semantics."""

    run_id: int
    defense: str
    dataset: str
    protocol: str  # name@version
    n_examples: int
    clean_accuracy: float | None
    attacks: list[AttackRow]
    robust_accuracy: float | None
    certified: list[CertifiedRow]
    certificate: list[CertificateRow]
    checks: list[CheckRecord]
    wall_time_s: float
    clean_draws: CleanDraws
    pending_attacks: list[StageRef]
    skipped_attacks: list[SkippedStage]
    task: str
    imbalanced: bool
    balanced_accuracy: float | None
    per_class_recall: dict[str, float] | None
    robust_balanced_accuracy: float | None
    split: str
    status: str
    complete: bool
    threat_models: list[ThreatRow]
    model: ModelInfo | None
    forward_passes: int
    backward_passes: int
    seed: int
    indices_hash: str | None
    config: dict[str, Any]  # the stored runs.config, verbatim
    provenance: dict[str, Any]
    created_at: str | None
    finished_at: str | None
    error: str | None
    escalation: Escalation | None
    clean_single_draw: SingleDraw  # the headline of a randomized run, beside clean_accuracy (worst of R)
    robust_single_draw: SingleDraw | None  # the headline of a randomized run, beside robust_accuracy
    robust_majority: float | None


class ExampleOutcome(TypedDict):
    """One evaluated example (``bench show --examples``)."""

    index: int
    label: int | None
    clean_correct: bool
    broken_by: dict[str, str | None]  # threat model -> first attack that broke it, "clean", or None
    robust: bool
