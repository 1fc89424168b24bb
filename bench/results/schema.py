"""The SQLAlchemy 2.0 schema of the result store.

Per-example rows (``example_results``) are the source of truth; every aggregate is computed
from them. Floats are stored at full precision; rounding happens only in renderers.
"""

from __future__ import annotations

import enum
from datetime import datetime, timezone
from typing import Any, Optional

from sqlalchemy import JSON, Boolean, DateTime, Enum, Float, ForeignKey, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

SCHEMA_VERSION = 2


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class RunStatus(str, enum.Enum):
    RUNNING = "running"
    FINISHED = "finished"
    FAILED = "failed"


class EvalKind(str, enum.Enum):
    CLEAN = "clean"
    ATTACK = "attack"
    CERTIFY = "certify"


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON}


class MetaRow(Base):
    """Key/value facts about the database itself (``schema_version``)."""

    __tablename__ = "bench_meta"
    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text)


class ModelRow(Base):
    """A trained or loaded model: defense, dataset, hyperparameters, checkpoint and its hash."""

    __tablename__ = "models"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    key: Mapped[str] = mapped_column(String(64), unique=True)
    defense: Mapped[str] = mapped_column(String(128), index=True)
    dataset: Mapped[str] = mapped_column(String(128), index=True)
    arch: Mapped[Optional[str]] = mapped_column(String(128))
    hparams: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    recipe: Mapped[Optional[dict[str, Any]]] = mapped_column(JSON)
    source: Mapped[str] = mapped_column(String(32))  # trained | file
    checkpoint_path: Mapped[Optional[str]] = mapped_column(Text)
    checkpoint_sha256: Mapped[Optional[str]] = mapped_column(String(64))
    train_summary: Mapped[Optional[dict[str, Any]]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    runs: Mapped[list[RunRow]] = relationship(back_populates="model")


class RunRow(Base):
    """One evaluation of one model under one protocol, with its full resolved config."""

    __tablename__ = "runs"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    key: Mapped[str] = mapped_column(String(64), unique=True)
    model_id: Mapped[Optional[int]] = mapped_column(ForeignKey("models.id"), index=True)
    defense: Mapped[str] = mapped_column(String(128), index=True)
    dataset: Mapped[str] = mapped_column(String(128), index=True)
    protocol: Mapped[str] = mapped_column(String(128), index=True)
    protocol_version: Mapped[int] = mapped_column(Integer)
    config: Mapped[dict[str, Any]] = mapped_column(JSON)
    seed: Mapped[int] = mapped_column(Integer)
    status: Mapped[RunStatus] = mapped_column(Enum(RunStatus, native_enum=False, length=16), index=True)
    n_examples: Mapped[Optional[int]] = mapped_column(Integer)
    indices_hash: Mapped[Optional[str]] = mapped_column(String(64))
    indices: Mapped[Optional[list[Any]]] = mapped_column(JSON)
    provenance: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    wall_time_s: Mapped[float] = mapped_column(Float, default=0.0)
    forward_passes: Mapped[int] = mapped_column(Integer, default=0)
    backward_passes: Mapped[int] = mapped_column(Integer, default=0)
    error: Mapped[Optional[str]] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    finished_at: Mapped[Optional[datetime]] = mapped_column(DateTime(timezone=True))

    model: Mapped[Optional[ModelRow]] = relationship(back_populates="runs")
    evaluations: Mapped[list[EvaluationRow]] = relationship(back_populates="run", order_by="EvaluationRow.position")
    checks: Mapped[list[CheckRow]] = relationship(back_populates="run", order_by="CheckRow.id")


class EvaluationRow(Base):
    """One stage of a run: the clean pass, one attack, or one certifier."""

    __tablename__ = "evaluations"
    __table_args__ = (UniqueConstraint("run_id", "position"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), index=True)
    position: Mapped[int] = mapped_column(Integer)
    kind: Mapped[EvalKind] = mapped_column(Enum(EvalKind, native_enum=False, length=16))
    method: Mapped[str] = mapped_column(String(128))
    norm: Mapped[Optional[str]] = mapped_column(String(8))
    eps: Mapped[Optional[float]] = mapped_column(Float)
    sigma: Mapped[Optional[float]] = mapped_column(Float)
    params: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    finished: Mapped[bool] = mapped_column(Boolean, default=False)
    skipped: Mapped[Optional[str]] = mapped_column(Text)  # why the attack could not run on this model
    forward_passes: Mapped[int] = mapped_column(Integer, default=0)
    backward_passes: Mapped[int] = mapped_column(Integer, default=0)

    run: Mapped[RunRow] = relationship(back_populates="evaluations")


class ExampleResultRow(Base):
    """The outcome of one evaluation on one example. Attack rows exist only for the examples
    the attack was run on (those still robust); a missing row means "not robust"."""

    __tablename__ = "example_results"
    __table_args__ = (UniqueConstraint("evaluation_id", "example_index"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    evaluation_id: Mapped[int] = mapped_column(ForeignKey("evaluations.id", ondelete="CASCADE"), index=True)
    example_index: Mapped[int] = mapped_column(Integer)
    label: Mapped[Optional[int]] = mapped_column(Integer)  # class index (None for multilabel)
    prediction: Mapped[Optional[int]] = mapped_column(Integer)
    correct: Mapped[bool] = mapped_column(Boolean)
    radius: Mapped[Optional[float]] = mapped_column(Float)
    abstained: Mapped[bool] = mapped_column(Boolean, default=False)
    samples_used: Mapped[Optional[int]] = mapped_column(Integer)
    count_a: Mapped[Optional[int]] = mapped_column(Integer)  # certification: votes for the predicted class
    bound: Mapped[Optional[float]] = mapped_column(Float)  # certification: p_A lower bound or margin lower bound
    seconds: Mapped[Optional[float]] = mapped_column(Float)  # certification: time spent on the example
    draws: Mapped[int] = mapped_column(Integer, default=1)
    correct_draws: Mapped[Optional[int]] = mapped_column(Integer)
    perturbation_norm: Mapped[Optional[float]] = mapped_column(Float)
    # multilabel tasks: {"y": [0/1 per label], "pred": [0/1 per label], "score": [mean sigmoid per label]}
    multilabel: Mapped[Optional[dict[str, Any]]] = mapped_column(JSON)


class CheckRow(Base):
    """A sanity check's outcome for a run."""

    __tablename__ = "checks"
    __table_args__ = (UniqueConstraint("run_id", "name"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(64))
    triggered: Mapped[bool] = mapped_column(Boolean)
    detail: Mapped[str] = mapped_column(Text, default="")

    run: Mapped[RunRow] = relationship(back_populates="checks")


class ReferenceRow(Base):
    """A published number, shown beside the measured ones."""

    __tablename__ = "references"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    defense: Mapped[str] = mapped_column(String(128), index=True)
    dataset: Mapped[str] = mapped_column(String(128), index=True)
    metric: Mapped[str] = mapped_column(String(64))  # clean | robust | certified
    norm: Mapped[Optional[str]] = mapped_column(String(8))
    eps: Mapped[Optional[float]] = mapped_column(Float)
    radius: Mapped[Optional[float]] = mapped_column(Float)
    value: Mapped[float] = mapped_column(Float)
    source: Mapped[str] = mapped_column(Text)
    note: Mapped[Optional[str]] = mapped_column(Text)
