"""Training recipes: the input of the shared training loop (:mod:`bench.training.loop`).

Import-light (no torch), so that a run's configuration resolves without loading torch.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any

from bench.errors import BenchError

if TYPE_CHECKING:
    from bench.data.base import DatasetSpec

__all__ = ["Recipe"]


@dataclass(frozen=True)
class Recipe:
    """A training recipe. ``adv_*`` fields configure adversarial training (off when adv_steps=0).

    ``adv_eps`` None means "the dataset's default eps for ``adv_norm``"; ``adv_step_size``
    None means 2.5 * eps / steps. ``class_weights="auto"`` weights the loss by inverse class
    frequency (positive/negative ratio per label for multilabel) on datasets flagged imbalanced,
    so that a model cannot win by predicting the majority class. ``max_examples`` caps the number
    of epochs so that at most about that many training examples are seen (CPU presets use it so
    large datasets finish in minutes); :meth:`epochs_for` applies it.
    """

    epochs: int
    batch_size: int
    optimizer: str = "sgd"  # sgd | adam
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "multistep"  # none | multistep | cosine
    milestones: tuple[int, ...] = ()
    gamma: float = 0.1
    adv_steps: int = 0
    adv_norm: str = "Linf"
    adv_eps: float | None = None
    adv_step_size: float | None = None
    max_examples: int | None = None  # budget of training examples seen; caps epochs on large datasets
    class_weights: str = "auto"  # auto (balanced on imbalanced datasets) | balanced | none
    extra: tuple[tuple[str, Any], ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1:
            raise BenchError("recipe: epochs and batch_size must be >= 1")
        if self.optimizer not in ("sgd", "adam"):
            raise BenchError(f"recipe: unknown optimizer '{self.optimizer}'")
        if self.schedule not in ("none", "multistep", "cosine"):
            raise BenchError(f"recipe: unknown schedule '{self.schedule}'")
        if self.class_weights not in ("auto", "balanced", "none"):
            raise BenchError(f"recipe: unknown class_weights '{self.class_weights}'")

    def balances(self, spec: DatasetSpec) -> bool:
        """Whether the loss weights classes by inverse frequency on ``spec``'s data."""
        return self.class_weights == "balanced" or (self.class_weights == "auto" and spec.imbalanced)

    def epochs_for(self, n_train: int) -> int:
        if self.max_examples is None or n_train <= 0:
            return self.epochs
        return max(1, min(self.epochs, -(-self.max_examples // n_train)))

    def with_overrides(self, **overrides: Any) -> Recipe:
        given = {k: v for k, v in overrides.items() if v is not None}  # "not set" never overrides
        return replace(self, **given) if given else self

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["milestones"] = list(self.milestones)
        out["extra"] = dict(self.extra)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Recipe:
        """The inverse of :meth:`to_dict` (as stored with a run and its model)."""
        return cls(**{**data, "milestones": tuple(data.get("milestones", ())),
                      "extra": tuple(sorted((data.get("extra") or {}).items()))})
