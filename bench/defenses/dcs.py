"""DCS: deformable convolution with stochasticity, trained with GSAT (Ma, Huang, Dong, You & Xu, ICML 2025).

The model (:mod:`bench.models.dcs`): one k x k convolution (default 5 x 5) of the network is a
:class:`~bench.models.dcs.MaskedConv2d` whose learned weight is multiplied by a random binary
mask with n ones (default 2), shared by all channels and the whole batch. The built model draws
a **fresh mask at every forward pass**; the authors' behaviour (the mask changes only when it is
explicitly resampled) is the model's ``freeze_randomness()`` context.

Training, GSAT (gradient-selective adversarial training, the official ``train.py`` with
``--randpos_deform_training --is_n_repeat``): PGD adversarial training (Linf, 7 steps, step
eps / 4, uniform random start) where the attack runs against one frozen mask M1 and the training
step uses a fresh mask M2 whose taps are disjoint from M1's (the "non-repeated" draw).

Evaluation: without ``--protocol`` the harness evaluates adaptively (EOT over masks, every
adversarial example scored with several fresh draws). ``--protocol transfer-draw`` replays the
authors' protocol (attack one frozen mask, score one new mask) for comparison.

See docs/defenses/dcs.md for the deviations from the official code.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from bench.defenses.base import Defense, DefenseInfo, Recipe
from bench.errors import BenchError
from bench.params import Param
from bench.registry import register_defense

if TYPE_CHECKING:
    from pathlib import Path

    import torch

    from bench.config import ThreatModel
    from bench.data.base import DatasetSpec, Split
    from bench.models.defended import DefendedModel
    from bench.training.loop import Perturb, TrainSummary

__all__ = ["DCS", "ARCHS", "gsat_perturb", "official_to_bench"]

ARCHS = ("small", "resnet18", "wrn-34-10")
WRN_LAYOUT_NAMES = ("official", "four-random")  # bench.models.dcs.WRN_LAYOUTS, without importing torch

# Paper (Sec. 5.1) and official train.py: SGD lr 0.1, momentum 0.9, weight decay 5e-4, batch 128,
# 200 epochs, MultiStepLR at epochs 60 and 120 (hard-coded in train.py), gamma 0.1; PGD-7 training.
_PAPER = Recipe(epochs=200, batch_size=128, optimizer="sgd", lr=0.1, momentum=0.9, weight_decay=5e-4,
                schedule="multistep", milestones=(60, 120), gamma=0.1, adv_steps=7, adv_norm="Linf",
                extra=(("validation", 0.1),))
# CPU preset: the pgd-at baseline's (Adam 1e-3, cosine, at most 20 epochs / ~30,000 examples seen),
# so that dcs and pgd-at trained on CPU differ only in the model and GSAT.
_CPU = Recipe(epochs=20, batch_size=64, optimizer="adam", lr=1e-3, momentum=0.0, weight_decay=0.0,
              schedule="cosine", max_examples=30_000, adv_steps=7, adv_norm="Linf", extra=(("validation", 0.1),))
VALIDATION_CAP = 1000  # validation examples scored per epoch for model selection

STEP_FRACTION = 0.25  # the paper's step 2/255 at eps 8/255, kept as a fraction of each dataset's eps


def _resolved(checked: dict[str, Any], image_size: int, recipe: str | None = None) -> dict[str, Any]:
    """Hyperparameters already checked by their specs, with ``arch="auto"`` resolved and the rules
    that relate two of them applied (one-line :class:`BenchError` otherwise)."""
    out = dict(checked)
    if out["arch"] == "auto":
        out["arch"] = "small" if image_size <= 16 or recipe == "cpu" else "resnet18"
    k, n = out["kernel_size"], out["taps"]
    if k % 2 == 0:
        raise BenchError(f"dcs: kernel_size must be odd and >= 1, got {k}")
    if 2 * n > k * k:
        raise BenchError(f"dcs: taps must satisfy 1 <= taps <= kernel_size**2 / 2 (non-repeated draws), got {n}")
    return out


def gsat_perturb(attack: Any, threat: ThreatModel) -> Perturb:
    """The GSAT perturbation for :func:`bench.training.loop.fit`.

    ``attack`` runs inside ``model.freeze_randomness()``: one mask M1 per masked conv, drawn on
    entry, serves every PGD step. Afterwards each masked conv draws M2 among the positions M1
    did not use (``exclude_previous=True``); the training forward pass that ``fit`` runs next
    uses M2 (and the one after draws freely again).
    """

    def perturb(model: Any, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:  # model: a DCSModel
        with model.freeze_randomness():
            x_adv = attack(model, x, y, threat).x_adv
        model.resample_masks(exclude_previous=True)
        return x_adv

    return perturb


_LAYER11 = re.compile(r"^layer11\.(\d+)\.")


def official_to_bench(state: dict[str, Any], model: DefendedModel) -> dict[str, Any]:
    """Rename an official DCS state dict (``ResNet18_1layer`` / ``ResNetPartmask5`` or
    ``ResNetPartmask7``, ``WideResNet34_1layer`` / ``WideResNet6``) to ``model``'s names.

    * a DataParallel ``module.`` prefix is removed;
    * ResNet-18: the official net keeps layer1's second (normal) block apart as ``layer11.0``;
      here it is ``layer1.1``. All other names (``conv1``, ``bn1``, ``layer1.0`` the random block,
      ``layer2``-``layer4``, ``shortcut.0/1``, ``linear``) are the same;
    * WRN: names are the same (``block1.layer.0.conv1.weight`` ...);
    * everything gets the ``net.`` prefix of :class:`~bench.models.defended.DefendedModel`;
    * an official ``normalize.mean``/``normalize.std`` pair (shape (C,), present only when the
      model was saved with its normalization layer) is checked against the dataset's and dropped;
    * the keys the official state dict cannot have are taken from ``model``: its normalization
      buffers and the masks (official masks are plain attributes, not state).

    A state dict already in bench's naming (``net.`` keys) is returned unchanged.
    """
    import torch

    if state and all(str(k).startswith("module.") for k in state):
        state = {str(k)[len("module."):]: v for k, v in state.items()}
    if any(str(k).startswith("net.") for k in state):
        return dict(state)
    target = model.state_dict()
    out: dict[str, Any] = {}
    for key, value in state.items():
        key = str(key)
        if key in ("normalize.mean", "normalize.std") and value.ndim == 1:
            ours = target[key].flatten().to(value.device, value.dtype)
            if value.shape != ours.shape or not torch.allclose(value, ours, atol=2e-3):
                raise RuntimeError(f"checkpoint normalization {key}={value.tolist()} differs from the dataset's "
                                   f"{ours.tolist()}")
            continue
        key = _LAYER11.sub(lambda m: f"layer1.{int(m.group(1)) + 1}.", key)
        out["net." + key] = value
    from bench.models.dcs import MaskedConv2d

    mask_keys = {f"{name}.mask" for name, m in model.named_modules() if isinstance(m, MaskedConv2d)}
    for key, value in target.items():
        if key not in out and (key.startswith("normalize.") or key in mask_keys):
            out[key] = value
    return out


def _mismatch_report(model: DefendedModel, state: dict[str, Any]) -> str | None:
    """None when ``state`` fits ``model`` exactly; else a few lines naming the first mismatches."""

    from bench.training.checkpoints import key_mismatches, listed

    missing, unexpected, shapes = key_mismatches(model.state_dict(), state)
    lines = []
    if shapes:
        lines.append("shape mismatch: " + listed(shapes, 3))
        if any(".conv1.weight" in s or ".conv2.weight" in s for s in shapes):
            lines.append("hint: the masked conv is elsewhere in the checkpoint: try --hparam masked_conv=2 or 3, "
                         "kernel_size, or for WRN wrn_layout=official (official WideResNet6) or four-random")
    if missing:
        lines.append("missing keys: " + listed(missing, 5))
    if unexpected:
        lines.append("unexpected keys: " + listed(unexpected, 5))
    return "\n".join(lines) or None


def robust_accuracy_on(val: Split, recipe: Recipe, spec: DatasetSpec, device: torch.device) -> Any:
    """Model-selection score: accuracy on ``val`` under the training attack (PGD at the training
    threat, ``recipe.adv_steps`` steps, at least 7), with fresh masks at every pass."""
    from bench.defenses.baselines import training_threat
    from bench.registry import ATTACKS

    threat = training_threat(recipe, spec)
    steps = max(7, recipe.adv_steps)
    step = recipe.adv_step_size if recipe.adv_step_size is not None else STEP_FRACTION * threat.eps
    attack = ATTACKS.get("pgd")(steps=steps, step_size=step, random_start=True)

    def score(model: Any) -> float:
        correct = 0
        for begin in range(0, len(val), 256):
            x, y = val.images[begin:begin + 256].to(device), val.labels[begin:begin + 256].to(device)
            correct += int((~attack(model, x, y, threat).success).sum())
        return correct / len(val)

    return score


@register_defense("dcs")
class DCS(Defense):
    """Ma et al. (ICML 2025) deformable convolution with stochasticity, trained with GSAT.

    Model: a k x k conv (default 5) whose weight is multiplied by a random mask with n ones
    (default 2), shared across channels and batch, fresh at every forward pass; in ResNet-18
    ``layer1[0]``'s conv1 (``masked_conv=2``, official code) or conv2 (``masked_conv=3``, paper
    text), in WRN-34-10 random blocks in ``block1`` (``wrn_layout``), one masked conv in the small
    CPU net. Trained: PGD-AT (Linf, 7 steps, step eps/4, random start) attacking a frozen mask M1,
    the training step using a fresh mask M2 disjoint from M1. Evaluated adaptively by default;
    the authors' ``transfer-draw`` protocol for comparison.

    Hyperparameters: ``arch`` (auto | small | resnet18 | wrn-34-10), ``masked_conv`` (2 | 3),
    ``kernel_size`` (5), ``taps`` (2), ``wrn_layout`` (official | four-random).
    """

    info = DefenseInfo(paper="Adversarial Robustness via Deformable Convolution with Stochasticity "
                             "(Ma, Huang, Dong, You, Xu; ICML 2025)",
                       year=2025, kind="randomized", randomized=True, authors_protocol="transfer-draw",
                       default_protocol="quick",
                       url="https://github.com/theSleepyPig/Deformable_Convolution_with_Stochasticity",
                       summary="random k x k conv masks with n taps (fresh per forward pass), GSAT training")
    recipes = {"paper": _PAPER, "cpu": _CPU}
    # masked_conv: 2 (the official code) or 3 (the paper's text); arch and wrn_layout in any case
    parameters = {"arch": Param("auto", str, choices=("auto", *ARCHS)), "masked_conv": Param(2, int, choices=(2, 3)),
                  "kernel_size": Param(5, int, ge=1), "taps": Param(2, int, ge=1),
                  "wrn_layout": Param("official", str, choices=WRN_LAYOUT_NAMES)}

    def resolve_hparams(self, given: dict[str, Any], image_size: int, recipe: str | None = None) -> dict[str, Any]:
        return _resolved(self.check_hparams(given), image_size, recipe)

    def build(self, spec: DatasetSpec, image_size: int, **hparams: Any) -> DefendedModel:
        from bench.models.dcs import DCSModel, SmallDCSNet, dcs_resnet18, dcs_wide_resnet

        h = _resolved(self.check_hparams(hparams, ignore_unknown=True), image_size)
        mask = {"masked_conv": h["masked_conv"], "kernel_size": h["kernel_size"], "taps": h["taps"]}
        if h["arch"] == "resnet18":
            net = dcs_resnet18(spec.channels, spec.num_classes, **mask)
        elif h["arch"] == "wrn-34-10":
            net = dcs_wide_resnet(spec.channels, spec.num_classes, layout=h["wrn_layout"], **mask)
        else:
            net = SmallDCSNet(spec.channels, spec.num_classes, image_size, **mask)
        return DCSModel(net, spec.mean, spec.std, spec.shape(image_size), spec.num_classes, spec.task)

    def fit(self, model: DefendedModel, train: Split, recipe: Recipe, *, spec: DatasetSpec,
            device: torch.device, seed: int = 0, progress: Any = None, resume: Path | None = None) -> TrainSummary:
        """GSAT: PGD-AT against a frozen mask M1, training step on a disjoint fresh mask M2.

        eps is the recipe's, else the dataset's default Linf eps (8/255 on CIFAR); the step is
        the recipe's, else eps / 4 (the paper's 2/255 at 8/255).

        Model selection (the official code keeps the epoch with the best PGD accuracy *on the test
        set*): the recipe's ``validation`` fraction of the training split (default 10 %, grouped
        and stratified, see :func:`bench.data.splits.holdout`) is held out, the model trains on
        the rest, and after every epoch the training attack (PGD, fresh masks per pass) is run on
        up to 1,000 validation images; the epoch with the best robust validation accuracy is kept.
        ``validation`` 0 keeps the last epoch.
        """
        from bench.defenses.baselines import training_threat
        from bench.registry import ATTACKS
        from bench.training.loop import fit

        if not hasattr(model, "freeze_randomness") or not hasattr(model, "resample_masks"):
            raise BenchError("dcs: the model has no masked convolutions to train with GSAT; "
                             "build it with the dcs defense")
        perturb = None
        if recipe.adv_steps > 0:
            threat = training_threat(recipe, spec)
            step = recipe.adv_step_size if recipe.adv_step_size is not None else STEP_FRACTION * threat.eps
            attack = ATTACKS.get("pgd")(steps=recipe.adv_steps, step_size=step, random_start=True)
            perturb = gsat_perturb(attack, threat)
        select = None
        fraction = float(dict(recipe.extra).get("validation", 0.0))
        if fraction > 0:
            import torch

            from bench.data.splits import holdout

            train, val = holdout(train, fraction, seed)
            val = val.subset(torch.randperm(len(val), generator=torch.Generator().manual_seed(seed))[:VALIDATION_CAP])
            select = robust_accuracy_on(val, recipe, spec, device)
        return fit(model, train, recipe, device=device, seed=seed, progress=progress, perturb=perturb,
                   balance_classes=recipe.balances(spec), resume=resume, select=select)

    def load_state_dict(self, model: DefendedModel, state: dict[str, Any]) -> None:
        """Load bench's own checkpoints, or official DCS ones through :func:`official_to_bench`."""
        mapped = official_to_bench(state, model)
        report = _mismatch_report(model, mapped)
        if report is not None:
            raise RuntimeError(report)
        model.load_state_dict(mapped, strict=True)

