"""The defense contract.

A defense is a registry entry (``@register_defense("name")``) subclassing :class:`Defense`:

* ``info``: a frozen :class:`DefenseInfo` (paper, year, kind, randomized?, certificates,
  the authors' evaluation protocol);
* ``recipes``: training recipes by name, at least ``paper`` (paper-scale defaults) and
  ``cpu`` (a small preset chosen automatically when no GPU is present);
* ``build(spec, image_size, **hparams) -> DefendedModel``;
* ``fit(model, train, recipe, device=..., ...)``: trains the model in place;
* ``load_state_dict(model, state)``: adapts checkpoint formats (official releases) if needed.

This module is import-light (no torch at import time) so that the harness can resolve a run's
configuration, and return a stored result, without loading torch.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any, Callable, ClassVar

from bench.errors import BenchError

if TYPE_CHECKING:
    from pathlib import Path

    import torch

    from bench.data.base import DatasetSpec, Split
    from bench.harness.training import TrainSummary
    from bench.models.defended import DefendedModel

__all__ = ["Defense", "DefenseInfo", "Recipe", "lazy_model_class", "number_param"]


@dataclass(frozen=True)
class DefenseInfo:
    """Metadata shown by ``bench list defenses`` and stored with every model."""

    paper: str
    year: int | None
    kind: str  # "baseline", "adversarial-training", "certified", "randomized", ...
    randomized: bool = False
    certificates: tuple[str, ...] = ()  # certifier names that apply
    authors_protocol: str | None = None  # protocol name that replays the authors' evaluation
    default_protocol: str | None = None  # protocol a run gets without --protocol (None: pgd, or adaptive)
    # the defended classifier is the smoothed g of a base classifier (RS, SmoothAdv, DDS): its models
    # declare ``smoothed_evaluation``, predictions are PREDICT, quick@1 attacks it with SmoothAdv
    smoothed: bool = False
    url: str = ""
    summary: str = ""


@dataclass(frozen=True)
class Recipe:
    """A training recipe. ``adv_*`` fields configure adversarial training (off when adv_steps=0).

    ``adv_eps`` None means "the dataset's default eps for ``adv_norm``"; ``adv_step_size``
    None means 2.5 * eps / steps. ``class_weights="auto"`` weights the loss by inverse class
    frequency (positive/negative ratio per label for multilabel) on datasets flagged imbalanced,
    so that a model cannot win by predicting the majority class. ``max_examples`` caps the number of epochs so that at most
    about that many training examples are seen (CPU presets use it so large datasets finish in
    minutes); :meth:`epochs_for` applies it.
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


class Defense:
    """Base class of defense registry entries."""

    name: ClassVar[str] = ""
    info: ClassVar[DefenseInfo]
    recipes: ClassVar[dict[str, Recipe]] = {}
    hparams: ClassVar[dict[str, Any]] = {"arch": "auto"}

    def resolve_hparams(self, given: dict[str, Any], image_size: int, recipe: str | None = None) -> dict[str, Any]:
        """Defaults filled in and ``arch="auto"`` resolved, so stored rows name the real architecture."""
        unknown = sorted(set(given) - set(self.hparams))
        if unknown:
            raise BenchError(
                f"unknown hyperparameter(s) {', '.join(unknown)} for defense '{self.name}'; "
                f"known: {', '.join(sorted(self.hparams)) or '(none)'}"
            )
        resolved = {**self.hparams, **given}
        if "arch" in resolved:
            from bench.models.names import resolve_arch

            resolved["arch"] = resolve_arch(str(resolved["arch"]), image_size, recipe)
        return resolved

    def recipe(self, preset: str) -> Recipe:
        if preset not in self.recipes:
            raise BenchError(f"defense '{self.name}' has no recipe '{preset}'; known: {', '.join(self.recipes)}")
        return self.recipes[preset]

    def build(self, spec: DatasetSpec, image_size: int, **hparams: Any) -> DefendedModel:
        """A fresh, untrained model for ``spec`` at ``image_size``."""
        from bench.models.backbones import build_backbone
        from bench.models.defended import DefendedModel

        net = build_backbone(hparams.get("arch", "auto"), spec.channels, spec.num_classes, image_size)
        return DefendedModel(net, spec.mean, spec.std, spec.shape(image_size), spec.num_classes, spec.task)

    def fit(self, model: DefendedModel, train: Split, recipe: Recipe, *, spec: DatasetSpec,
            device: torch.device, seed: int = 0, progress: Any = None, resume: Path | None = None) -> TrainSummary:
        """Train ``model`` in place with the shared loop; subclasses add a perturbation.

        ``resume`` is a file for per-epoch training state (see :func:`bench.harness.training.fit`);
        pass it on so an interrupted training continues where it stopped.
        """
        from bench.harness.training import fit

        return fit(model, train, recipe, device=device, seed=seed, progress=progress,
                   balance_classes=recipe.balances(spec), resume=resume)

    def load_state_dict(self, model: DefendedModel, state: dict[str, Any]) -> None:
        """Load a state dict into ``model``; override to adapt an official checkpoint layout."""
        model.load_state_dict(state, strict=True)


def lazy_model_class(module: str, name: str, define: Callable[[], type]) -> tuple[Callable[[], type],
                                                                                 Callable[[str], Any]]:
    """A model class that needs torch, defined on first use so the defense module imports without it.

    Returns ``(get, module_getattr)``: ``get()`` defines the class once (named ``name``, in
    ``module``) and returns it; ``module_getattr`` is a PEP 562 module ``__getattr__`` that makes
    ``from module import name`` work.
    """
    cache: list[type] = []

    def get() -> type:
        if not cache:
            cls = define()
            cls.__name__ = cls.__qualname__ = name
            cls.__module__ = module
            cache.append(cls)
        return cache[0]

    def module_getattr(attr: str) -> Any:
        if attr == name:
            return get()
        raise AttributeError(f"module {module!r} has no attribute {attr!r}")

    return get, module_getattr


def number_param(owner: str, name: str, value: Any, *, low: float, inclusive: bool) -> float:
    """``value`` as a finite float above ``low`` (or equal to it when ``inclusive``), else a
    one-line :class:`BenchError` naming ``owner`` (the defense) and the parameter."""
    import math

    relation = ">=" if inclusive else ">"
    if isinstance(value, bool):
        raise BenchError(f"{owner}: {name} must be a number {relation} {low:g}, got {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise BenchError(f"{owner}: {name} must be a number {relation} {low:g}, got {value!r}") from None
    if not math.isfinite(number) or number < low or (number == low and not inclusive):
        raise BenchError(f"{owner}: {name} must be a finite number {relation} {low:g}, got {value!r}")
    return number
