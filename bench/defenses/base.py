"""The defense contract.

A defense is a registry entry (``@register_defense("name")``) subclassing :class:`Defense`:

* ``info``: a frozen :class:`DefenseInfo` (paper, year, kind, randomized?, certificates,
  the authors' evaluation protocol);
* ``recipes``: training recipes by name, at least ``paper`` (paper-scale defaults) and
  ``cpu`` (a small preset chosen automatically when no GPU is present);
* ``parameters``: the hyperparameters, each a :class:`~bench.params.Param` (default and rule);
  ``hparams``, the defaults, is derived from it;
* ``build(spec, image_size, **hparams) -> DefendedModel``;
* ``fit(model, train, recipe, device=..., ...)``: trains the model in place;
* ``load_state_dict(model, state)``: adapts checkpoint formats (official releases) if needed.

This module is import-light (no torch at import time) so that the harness can resolve a run's
configuration, and return a stored result, without loading torch.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from bench.errors import BenchError
from bench.params import Param, check_params, declared_specs, defaults_of
from bench.training.recipe import Recipe

if TYPE_CHECKING:
    from pathlib import Path

    import torch

    from bench.data.base import DatasetSpec, Split
    from bench.models.defended import DefendedModel
    from bench.training.loop import TrainSummary

__all__ = ["Defense", "DefenseInfo", "Recipe"]


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


class Defense:
    """Base class of defense registry entries."""

    name: ClassVar[str] = ""
    info: ClassVar[DefenseInfo]
    recipes: ClassVar[dict[str, Recipe]] = {}
    trainable: ClassVar[bool] = True  # False: the weights always come from a checkpoint or the caller
    parameters: ClassVar[dict[str, Param]] = {"arch": Param("auto", str)}
    hparams: ClassVar[dict[str, Any]] = {"arch": "auto"}  # derived from ``parameters``: the defaults

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.parameters = declared_specs(cls.__dict__, cls.parameters, "hparams")
        cls.hparams = defaults_of(cls.parameters)

    def check_hparams(self, given: Mapping[str, Any], *, ignore_unknown: bool = False) -> dict[str, Any]:
        """The defaults with ``given`` over them, every value checked and coerced by its spec in
        ``parameters`` (a one-line :class:`BenchError` otherwise). An unknown name is refused, or
        with ``ignore_unknown`` dropped (``build`` accepts what older versions stored)."""
        if ignore_unknown:
            given = {k: v for k, v in given.items() if k in self.parameters}
        return check_params(f"defense '{self.name}'", self.parameters, {**self.hparams, **given},
                            noun="hyperparameter")

    def resolve_hparams(self, given: dict[str, Any], image_size: int, recipe: str | None = None) -> dict[str, Any]:
        """Defaults filled in, every value checked by its spec, and ``arch="auto"`` resolved, so
        stored rows name the real architecture. The one home of a defense's hyperparameter checks:
        overrides add what the specs cannot say (rules relating several values, ``auto``)."""
        resolved = self.check_hparams(given)
        if "arch" in resolved:
            from bench.models.names import resolve_arch

            resolved["arch"] = resolve_arch(str(resolved["arch"]), image_size, recipe)
        return resolved

    def declared(self, hparams: dict[str, Any]) -> DefenseInfo:
        """What a model built with ``hparams`` declares (randomized, certificates, default protocol):
        ``info`` for a defense whose declarations do not depend on its hyperparameters."""
        return self.info

    def label(self, hparams: dict[str, Any]) -> str:
        """The name a run of this defense with ``hparams`` shows on the leaderboard."""
        return self.name

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

        ``resume`` is a file for per-epoch training state (see :func:`bench.training.loop.fit`);
        pass it on so an interrupted training continues where it stopped.
        """
        from bench.training.loop import fit

        return fit(model, train, recipe, device=device, seed=seed, progress=progress,
                   balance_classes=recipe.balances(spec), resume=resume)

    def load_state_dict(self, model: DefendedModel, state: dict[str, Any]) -> None:
        """Load a state dict into ``model``; override to adapt an official checkpoint layout."""
        model.load_state_dict(state, strict=True)
