"""Baselines: ``standard`` (empirical risk minimisation) and ``pgd-at`` (Madry PGD training)."""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Any

from bench.config import ThreatModel, parse_norm
from bench.defenses.base import Defense, DefenseInfo, Recipe
from bench.registry import register_defense

if TYPE_CHECKING:
    from pathlib import Path

    import torch

    from bench.data.base import DatasetSpec, Split
    from bench.models.defended import DefendedModel
    from bench.training.loop import TrainSummary


# Paper-scale recipe for CIFAR-scale data (Madry et al. 2018 / Rice et al. 2020 practice) and a
# small CPU preset that trains the embedded digits dataset in seconds.
_PAPER = Recipe(epochs=200, batch_size=128, optimizer="sgd", lr=0.1, momentum=0.9, weight_decay=5e-4,
                schedule="multistep", milestones=(100, 150), gamma=0.1)
_CPU = Recipe(epochs=20, batch_size=64, optimizer="adam", lr=1e-3, momentum=0.0, weight_decay=0.0,
              schedule="cosine", max_examples=30_000)


@register_defense("standard")
class Standard(Defense):
    """Empirical risk minimisation: cross-entropy on clean images, no defense."""

    info = DefenseInfo(paper="(baseline)", year=None, kind="baseline",
                       summary="cross-entropy training on clean data")
    recipes = {"paper": _PAPER, "cpu": _CPU}


@register_defense("pgd-at")
class PGDAT(Defense):
    """Madry et al. (ICLR 2018) PGD adversarial training: train on PGD examples with random start.

    Paper setting (CIFAR-10): Linf eps 8/255, step 2/255, 7 steps, random start. The recipe's
    eps defaults to the dataset's first threat model of the recipe's norm.
    """

    info = DefenseInfo(paper="Madry et al., Towards Deep Learning Models Resistant to Adversarial Attacks",
                       year=2018, kind="adversarial-training", url="https://arxiv.org/abs/1706.06083",
                       summary="PGD adversarial training")
    recipes = {
        "paper": replace(_PAPER, adv_steps=7, adv_norm="Linf"),
        "cpu": replace(_CPU, adv_steps=7, adv_norm="Linf"),
    }

    def fit(self, model: DefendedModel, train: Split, recipe: Recipe, *, spec: DatasetSpec,
            device: torch.device, seed: int = 0, progress: Any = None, resume: Path | None = None) -> TrainSummary:
        from bench.registry import ATTACKS
        from bench.training.loop import fit

        threat = training_threat(recipe, spec)
        attack = ATTACKS.get("pgd")(steps=recipe.adv_steps, step_size=recipe.adv_step_size, random_start=True)

        def perturb(m: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return attack(m, x, y, threat).x_adv

        return fit(model, train, recipe, device=device, seed=seed, progress=progress, perturb=perturb,
                   balance_classes=recipe.balances(spec), resume=resume)


def training_threat(recipe: Recipe, spec: DatasetSpec) -> ThreatModel:
    """The threat model adversarial training uses: the recipe's eps, else the dataset default."""
    norm = parse_norm(recipe.adv_norm)
    if recipe.adv_eps is not None:
        return ThreatModel(norm, recipe.adv_eps)
    for threat in spec.threat_models:
        if threat.norm is norm:
            return threat
    raise ValueError(f"dataset '{spec.name}' has no default {norm.value} threat model; set adv_eps in the recipe")
