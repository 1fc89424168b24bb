"""Randomized smoothing (Cohen, Rosenfeld & Kolter, ICML 2019): the base classifier and its training.

What is trained: the *base classifier* f, an ordinary deterministic network (normalization inside
the model, so images and noise live in [0, 1] pixel space), trained with Gaussian data
augmentation: every training image gets a fresh draw of N(0, sigma^2 I) noise at every step,
added to the raw image before the model's normalization and *not* clipped back to [0, 1]
(as in the official ``code/train.py``), then plain cross-entropy.

What is certified: the *smoothed classifier* g(x) = argmax_c P_{eps ~ N(0, sigma^2 I)}[f(x + eps) = c].
A smoothing certifier samples g through f (Monte Carlo, Clopper-Pearson lower bound p_A) and
certifies an L2 radius sigma * Phi^-1(p_A). It reads the noise level from ``model.sigma``, which
this defense sets to the training sigma, since the guarantee is meant for the sigma f was trained at.
The noise belongs to g, not to f: the built model is deterministic (``randomized = False``), so
attacks run against it evaluate the base classifier.

Official checkpoints: ``arch`` may also be one of the official code's networks (``cifar_resnet20``,
``cifar_resnet110``, ``resnet50``; :mod:`bench.models.cohen`) with their official input layer
(``input_layer``: ``normalize`` = NormalizeLayer, the default and what all of Cohen et al.'s
released models use, or ``center`` = SmoothAdv's InputCenterLayer); the released
``checkpoint.pth.tar`` files then load with ``--checkpoint`` (see docs/defenses/rs.md).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from bench.capabilities import capability
from bench.defenses.base import Defense, DefenseInfo, Recipe
from bench.errors import BenchError, CheckpointError
from bench.models.names import ARCH_NAMES, COHEN_ARCH_NAMES, INPUT_LAYERS
from bench.params import Param
from bench.registry import register_defense

if TYPE_CHECKING:
    from pathlib import Path

    import torch

    from bench.data.base import DatasetSpec, Split
    from bench.models.defended import DefendedModel
    from bench.training.loop import Perturb, TrainSummary

__all__ = ["RandomizedSmoothing", "check_input_layer", "check_sigma", "gaussian_noise", "resolve_official_hparams"]

# Paper defaults (locuslab/smoothing code/train.py and experiments.MD): SGD lr 0.1, momentum 0.9,
# weight decay 1e-4, 90 epochs, batch 400, StepLR(step_size=30, gamma=0.1). The shared training
# loop has no "step" schedule (none | multistep | cosine), so StepLR(30, 0.1) is written as
# MultiStepLR with milestones (30, 60): over the 90 paper epochs the two give the same learning
# rate at every epoch (0.1, then 0.01 from epoch 30, then 0.001 from epoch 60). They differ only if
# the number of epochs is raised beyond 90 (StepLR would decay again at 90, 120, ...).
_PAPER = Recipe(epochs=90, batch_size=400, optimizer="sgd", lr=0.1, momentum=0.9, weight_decay=1e-4,
                schedule="multistep", milestones=(30, 60), gamma=0.1)
# A small CPU preset, the same as the standard baseline's: Adam, cosine schedule, at most 20 epochs
# and about 30,000 training examples seen, so the embedded digits dataset trains in seconds.
_CPU = Recipe(epochs=20, batch_size=64, optimizer="adam", lr=1e-3, momentum=0.0, weight_decay=0.0,
              schedule="cosine", max_examples=30_000)


SIGMA = Param(0.25, float, gt=0)  # the Gaussian noise level, pixel space


def check_sigma(value: Any, owner: str = "defense 'rs'") -> float:
    """``value`` checked by the ``sigma`` spec: a finite float > 0, else a one-line :class:`BenchError`."""
    sigma: float = SIGMA.check(owner, "sigma", value)
    return sigma


_INPUT_LAYER_ALIASES = {"normalize": "normalize", "normalizelayer": "normalize",
                        "center": "center", "inputcenterlayer": "center", "centre": "center"}


def check_input_layer(value: Any, name: str = "rs") -> str:
    """``normalize`` or ``center`` (the official class names NormalizeLayer / InputCenterLayer are
    accepted too), else a one-line :class:`BenchError`."""
    kind = _INPUT_LAYER_ALIASES.get(str(value).strip().lower()) if isinstance(value, str) else None
    if kind is None:
        raise BenchError(f"{name}: input_layer must be one of {', '.join(INPUT_LAYERS)} "
                         f"(official NormalizeLayer / InputCenterLayer), got {value!r}")
    return kind


def resolve_official_hparams(defense: Defense, given: dict[str, Any], image_size: int,
                             recipe: str | None = None) -> dict[str, Any]:
    """``Defense.resolve_hparams`` for a smoothing defense that also offers the official networks.

    ``defense.hparams`` must hold ``arch`` and ``input_layer``. With ``arch`` one of
    ``COHEN_ARCH_NAMES`` the result keeps it and a checked ``input_layer`` (default: the
    defense's); with any other ``arch`` (bench's own backbones, ``auto``) ``input_layer`` is left
    out of the result, so those models' stored hyperparameters and cache keys do not change,
    and giving it is an error.
    """
    arch = str(given.get("arch", defense.hparams["arch"]))
    official = arch in COHEN_ARCH_NAMES
    if not official and arch != "auto" and arch not in ARCH_NAMES:
        raise BenchError(f"{defense.name}: unknown architecture '{arch}'; known: auto, "
                         f"{', '.join(ARCH_NAMES + COHEN_ARCH_NAMES)}")
    if "input_layer" in given and not official:
        raise BenchError(f"{defense.name}: input_layer applies only to the official architectures "
                         f"({', '.join(COHEN_ARCH_NAMES)}), not to arch={arch}")
    plain = {k: v for k, v in given.items() if k != "input_layer" and not (k == "arch" and official)}
    resolved = Defense.resolve_hparams(defense, plain, image_size, recipe)
    layer = resolved.pop("input_layer", "normalize")
    if official:
        resolved["arch"] = arch
        resolved["input_layer"] = check_input_layer(given.get("input_layer", layer), defense.name)
    return resolved


def gaussian_noise(sigma: float) -> Perturb:
    """The training perturbation: ``x + sigma * randn_like(x)``, fresh noise per image and call.

    Noise is in pixel space (``x`` is the raw [0, 1] image; the model normalizes internally) and
    the result is not clipped, as in the official training code. It draws from the global torch
    RNG, which :func:`bench.training.loop.fit` seeds and saves for resumption.
    """
    sigma = check_sigma(sigma)

    def perturb(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        import torch

        return x + sigma * torch.randn_like(x)

    return perturb


@register_defense("rs")
class RandomizedSmoothing(Defense):
    """Cohen et al. (2019) randomized smoothing: a base classifier trained with Gaussian noise at sigma.

    Trained: the deterministic base classifier f, with N(0, sigma^2 I) pixel-space noise added to
    every training image (fresh per image per step, unclipped, before normalization).
    Certified: the smoothed classifier g(x) = argmax_c P[f(x + eps) = c], eps ~ N(0, sigma^2 I),
    by a smoothing certifier reading ``model.sigma`` (L2 radius sigma * Phi^-1(p_A)).

    Hyperparameters: ``sigma`` (default 0.25, pixel space), ``arch`` (bench's backbones, or the
    official ``cifar_resnet20`` / ``cifar_resnet110`` / ``resnet50``) and, for the official
    networks only, ``input_layer`` (``normalize``, the default, or ``center``). Official
    ``checkpoint.pth.tar`` files load through :meth:`load_state_dict`.
    """

    info = DefenseInfo(paper="Certified Adversarial Robustness via Randomized Smoothing (Cohen, Rosenfeld, Kolter)",
                       year=2019, kind="certified", randomized=False, certificates=("smoothing",),
                       default_protocol="quick", smoothed=True,
                       url="https://arxiv.org/abs/1902.02918",
                       summary="base classifier trained with Gaussian noise; smoothed classifier certified in L2")
    recipes = {"paper": _PAPER, "cpu": _CPU}
    # input_layer: Cohen et al. released only NormalizeLayer models; it applies to the official archs only
    # sigma is a float once checked, so stored rows and cache keys do not depend on how it was written
    parameters = {"arch": Param("auto", str), "sigma": SIGMA, "input_layer": Param("normalize", str)}

    def resolve_hparams(self, given: dict[str, Any], image_size: int, recipe: str | None = None) -> dict[str, Any]:
        return resolve_official_hparams(self, given, image_size, recipe)

    def build(self, spec: DatasetSpec, image_size: int, **hparams: Any) -> DefendedModel:
        h = self.check_hparams(hparams, ignore_unknown=True)
        sigma, arch = h["sigma"], h["arch"]
        if arch in COHEN_ARCH_NAMES:
            from bench.models.cohen import build_cohen_model

            layer = check_input_layer(h["input_layer"], self.name)
            model = build_cohen_model(spec, image_size, arch, layer)
        else:
            model = super().build(spec, image_size, **hparams)
        model.sigma = sigma  # the noise level of the smoothed classifier, read by the certifier
        # the defended classifier is g (predictions are PREDICT), as info.smoothed says
        model.smoothed_evaluation = self.info.smoothed
        return model

    def load_state_dict(self, model: DefendedModel, state: dict[str, Any]) -> None:
        """Bench's own checkpoints, or (official architectures) an official ``checkpoint.pth.tar``
        state dict through :func:`bench.models.cohen.load_cohen_state_dict`."""
        from bench.models.cohen import load_cohen_state_dict, looks_official

        if getattr(model, "cohen_arch", None) is not None:
            load_cohen_state_dict(model, state, name=self.name)
            return
        found = looks_official(state)
        if found is not None:
            hint = (f"build that network with --hparam arch={found}" if found in COHEN_ARCH_NAMES
                    else f"bench builds {', '.join(COHEN_ARCH_NAMES)}")
            raise CheckpointError(f"{self.name}: this is an official randomized-smoothing checkpoint of {found}, "
                                  f"not of bench's backbone; {hint}")
        super().load_state_dict(model, state)

    def fit(self, model: DefendedModel, train: Split, recipe: Recipe, *, spec: DatasetSpec,
            device: torch.device, seed: int = 0, progress: Any = None, resume: Path | None = None) -> TrainSummary:
        """Train the base classifier with Gaussian noise at ``model.sigma`` (set by :meth:`build`)."""
        from bench.training.loop import fit

        sigma = capability(model, "sigma")
        if sigma is None:
            raise BenchError("rs: the model declares no sigma; build it with the rs defense (hparam sigma)")
        return fit(model, train, recipe, device=device, seed=seed, progress=progress, perturb=gaussian_noise(sigma),
                   balance_classes=recipe.balances(spec), resume=resume)
