"""SmoothAdv (Salman, Yang, Li, Zhang, Zhang, Razenshteyn & Bubeck, NeurIPS 2019): adversarial
training of the base classifier of a smoothed classifier.

Trained, as the official ``code/train_pgd.py`` (``--adv-training --attack PGD
--train-multi-noise``): every image of a minibatch is repeated ``m_train`` times with a fresh
Gaussian draw each (sigma in pixel space); with the model in eval mode, SmoothAdv-PGD
(:func:`bench.attacks.smoothadv.smoothadv_pgd`: ``steps`` L2 steps of 2 eps / steps on the
soft smoothed classifier, those m draws held fixed, no random start) moves each image within
L2 ``eps``; the training inputs are the attacked image plus *the same* m draws, and the loss is
the cross-entropy over all m copies. eps warms up linearly over the first ``warmup`` epochs
(min(eps, (epoch + 1) eps / warmup)).

Certified and evaluated like ``rs``: the defended classifier is the smoothed g (PREDICT for
predictions, the ``smoothing`` certifier at the training sigma); the official checkpoints (the
CIFAR-10 models use InputCenterLayer, ``--hparam input_layer=center``) load the same way.

eps is in pixel units. The official ``--epsilon 64`` means 64/256 = 0.25 (write ``eps=0.25`` or
``eps="64/256"``). See docs/defenses/smoothadv.md.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from bench.capabilities import capability
from bench.defenses.base import DefenseInfo, Recipe
from bench.defenses.smoothing import RandomizedSmoothing, check_sigma
from bench.errors import BenchError
from bench.params import Param
from bench.registry import register_defense

if TYPE_CHECKING:
    from pathlib import Path

    import torch

    from bench.data.base import DatasetSpec, Split
    from bench.models.defended import DefendedModel
    from bench.training.loop import TrainSummary

__all__ = ["SmoothAdvDefense", "SmoothAdvTraining"]

# Paper (README example and train_pgd.py defaults): SGD lr 0.1, momentum 0.9, weight decay 1e-4,
# batch 256, 150 epochs, StepLR(50, 0.1) (= milestones 50, 100 over 150 epochs).
_PAPER = Recipe(epochs=150, batch_size=256, optimizer="sgd", lr=0.1, momentum=0.9, weight_decay=1e-4,
                schedule="multistep", milestones=(50, 100), gamma=0.1)
# CPU preset: rs's (so rs and smoothadv trained on CPU differ only in the adversarial step).
_CPU = RandomizedSmoothing.recipes["cpu"]
# The README example: --num-steps 10 --epsilon 64 --num-noise-vec 2 --warmup 10 --train-multi-noise
_AUTO = {"paper": {"steps": 10, "m_train": 2, "warmup": 10}, "cpu": {"steps": 2, "m_train": 2, "warmup": 4}}
SETTINGS = ("eps", "steps", "m_train", "warmup", "multi_noise")  # what fit() reads from model.smoothadv


class SmoothAdvTraining:
    """The training perturbation: (x, y) -> (m noisy copies of the SmoothAdv example, labels)."""

    def __init__(self, sigma: float, eps: float, steps: int, m: int, warmup: int, multi_noise: bool = True) -> None:
        self.sigma, self.eps, self.steps, self.m, self.warmup = sigma, eps, steps, m, warmup
        self.multi_noise = multi_noise
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def current_eps(self) -> float:
        """min(eps, (epoch + 1) eps / warmup), the official warm-up (no warm-up when 0)."""
        return self.eps if self.warmup <= 0 else min(self.eps, (self.epoch + 1) * self.eps / self.warmup)

    def __call__(self, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        import torch

        from bench.attacks.smoothadv import smoothadv_pgd
        from bench.config import Norm, ThreatModel

        noise = self.sigma * torch.randn((self.m, *x.shape), device=x.device, dtype=x.dtype)
        eps = self.current_eps()
        x_adv = x
        if self.steps > 0 and eps > 0:
            x_adv = smoothadv_pgd(model, x, y, ThreatModel(Norm.L2, eps), self.sigma, self.m, self.steps, noise)
        noisy = x_adv.detach().unsqueeze(0) + noise  # the attack's own draws (official behaviour)
        if not self.multi_noise:
            return noisy[0], y
        return noisy.transpose(0, 1).reshape(self.m * len(x), *x.shape[1:]), y.repeat_interleave(self.m, dim=0)


def _pixel_eps(eps: float) -> float:
    """``eps`` (already checked by its spec) unless it looks like the official 1/256 units."""
    if eps > 16:
        raise BenchError(f"smoothadv: eps {eps:g} is not in pixel units; the official --epsilon {eps:g} is "
                         f"eps={eps:g}/256")
    return eps


@register_defense("smoothadv")
class SmoothAdvDefense(RandomizedSmoothing):
    """SmoothAdv (Salman et al. 2019): base classifier adversarially trained on its smoothed classifier.

    Hyperparameters: ``sigma`` (0.25), ``eps`` (L2, pixel units, 0.25 = the official 64/256),
    ``steps`` (T; auto: 10 paper, 2 cpu), ``m_train`` (noise draws per image; auto: 2),
    ``warmup`` (epochs of linear eps warm-up; auto: 10 paper, 4 cpu), ``multi_noise`` (True: loss
    over all m copies), ``arch`` and ``input_layer`` (as ``rs``).
    """

    info = DefenseInfo(paper="Provably Robust Deep Learning via Adversarially Trained Smoothed Classifiers "
                             "(Salman, Yang, Li, Zhang, Zhang, Razenshteyn, Bubeck)",
                       year=2019, kind="certified", randomized=False, certificates=("smoothing",),
                       default_protocol="quick", smoothed=True, url="https://arxiv.org/abs/1906.04584",
                       summary="base classifier trained on SmoothAdv-PGD examples of its smoothed classifier "
                               "(m noisy copies, fixed draws); certified like rs")
    recipes = {"paper": _PAPER, "cpu": _CPU}
    # eps accepts a fraction ("64/256"); steps, m_train and warmup are "auto" (by recipe) or integers
    parameters = {**RandomizedSmoothing.parameters, "eps": Param(0.25, float, gt=0),
                  "steps": Param("auto", int, ge=0, literals=("auto",)),
                  "m_train": Param("auto", int, ge=1, literals=("auto",)),
                  "warmup": Param("auto", int, ge=0, literals=("auto",)), "multi_noise": Param(True, bool)}

    def resolve_hparams(self, given: dict[str, Any], image_size: int, recipe: str | None = None) -> dict[str, Any]:
        resolved = super().resolve_hparams(given, image_size, recipe)  # every value checked by its spec
        return {**resolved, **self._settings(resolved, recipe)}

    def _settings(self, checked: dict[str, Any], recipe: str | None) -> dict[str, Any]:
        """The SmoothAdv training settings of ``checked`` hyperparameters, ``auto`` resolved by recipe."""
        auto = _AUTO["cpu" if recipe == "cpu" else "paper"]
        out = {k: checked[k] for k in SETTINGS}
        out.update({k: auto[k] for k in auto if out[k] == "auto"})
        out["eps"] = _pixel_eps(out["eps"])
        return out

    def build(self, spec: DatasetSpec, image_size: int, **hparams: Any) -> DefendedModel:
        rs_hparams = {k: v for k, v in hparams.items() if k in RandomizedSmoothing.hparams}
        model = super().build(spec, image_size, **rs_hparams)
        # a plain attribute (read by fit): nn.Module's __setattr__ is typed for tensors and modules only
        model.smoothadv = self._settings(  # type: ignore[assignment]
            self.check_hparams(hparams, ignore_unknown=True), "paper")
        return model

    def fit(self, model: DefendedModel, train: Split, recipe: Recipe, *, spec: DatasetSpec,
            device: torch.device, seed: int = 0, progress: Any = None, resume: Path | None = None) -> TrainSummary:
        """SmoothAdv training of the base classifier at ``model.sigma`` (see the module docstring)."""
        from bench.training.loop import fit

        settings = getattr(model, "smoothadv", None)
        if settings is None or capability(model, "sigma") is None:
            raise BenchError("smoothadv: build the model with the smoothadv defense (it declares sigma and eps)")
        perturb = SmoothAdvTraining(check_sigma(capability(model, "sigma")), float(settings["eps"]),
                                    int(settings["steps"]), int(settings["m_train"]), int(settings["warmup"]),
                                    bool(settings["multi_noise"]))
        return fit(model, train, recipe, device=device, seed=seed, progress=progress, perturb=perturb,
                   balance_classes=recipe.balances(spec), resume=resume)
