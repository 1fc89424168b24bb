"""DDS: diffusion denoised smoothing (Carlini, Tramèr et al., ICLR 2023), and its covariate-shift-robust
classifier training (Hedayatnia et al., arXiv 2509.10913, 2025) as ``dds-rcs`` / ``robust_noise``.

The base classifier is *denoise, then classify*. For an image x in [0, 1]:

1. map it to diffusion space, 2x - 1 (pixel noise sigma becomes 2 sigma there);
2. take the diffusion step t* = the smallest t with sqrt(1 - abar_t) / sqrt(abar_t) >= 2 sigma;
3. x_t = sqrt(abar_t*) (2x - 1) + sqrt(1 - abar_t*) eps with a fresh eps ~ N(0, I) at every forward
   pass, independently per example: this *is* the smoothing noise, since
   x_t = sqrt(abar_t*) (2 (x + sigma_eff eps) - 1) with sigma_eff = sqrt(1 - abar_t*) / (2 sqrt(abar_t*));
4. one-shot x0 prediction from the epsilon-prediction UNet at t*, clipped to [-1, 1], back to [0, 1],
   resized to the classifier's resolution if it differs, and classified.

So f(x) = h(x + sigma_eff eps) for a deterministic h, and the smoothed classifier of Cohen et al.
at sigma_eff >= sigma is certified with the nominal sigma (a smaller, still valid radius). The model
declares ``adds_smoothing_noise = True``: the ``smoothing`` certifier then adds no noise of its own.
The defended classifier is g (``smoothed``): runs score it with PREDICT and quick@1 attacks it with
SmoothAdv, whose soft classifier uses the model's own draws.

What is trained (no GPU-scale training in the paper: both parts are off the shelf there):

* the denoiser: with ``denoiser=train`` (default), a tiny DDPM (``diffusers`` UNet2DModel, linear
  betas, 1000 steps, epsilon-prediction "simple" loss) on the training split, cached by its own
  configuration hash (``ddpm-<dataset>-<key>.pt`` beside the model cache); or a pretrained
  ``diffusers`` DDPM from a local ``save_pretrained`` directory or a hub id
  (``denoiser=google/ddpm-cifar10-32``), kept frozen;
* the classifier, any bench backbone, with the denoiser frozen: on denoised noisy images
  (``train_on=denoised``, default: exactly the base classifier's inputs at t*), or on clean images
  (``train_on=clean``, Carlini's off-the-shelf setting); with ``robust_noise`` (Hedayatnia et al.)
  the noise of each training batch is first pushed by K sign-gradient steps towards a higher
  classifier loss on the denoised image.

See docs/defenses/dds.md for the deviations from the official code.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, cast

from bench.capabilities import capability
from bench.defenses.base import Defense, DefenseInfo, Recipe
from bench.errors import BenchError, CheckpointError
from bench.params import Param, check_params
from bench.registry import register_defense

if TYPE_CHECKING:
    from pathlib import Path

    import torch
    from torch import nn

    from bench.data.base import DatasetSpec, Split
    from bench.models.dds import DDSModel
    from bench.models.defended import DefendedModel
    from bench.progress import Progress
    from bench.training.loop import Perturb, TrainSummary

__all__ = ["DDS", "DDSRobust", "robust_noise_perturb"]

# The classifier recipes. Hedayatnia et al.'s CIFAR-10 configs: AdamW (lr 1e-3, weight decay 0.05),
# cosine annealing per iteration to 1e-5, 100 epochs, batch 256. The shared loop has Adam with L2
# weight decay (not AdamW's decoupled decay) and a per-epoch cosine to 0, so the paper preset keeps
# the rate, epochs, batch and schedule shape and drops the decay. Its DDPM settings (used only with
# denoiser=train) are Ho et al.'s CIFAR-10 ones: Adam 2e-4, batch 128, 800k steps.
_PAPER = Recipe(epochs=100, batch_size=256, optimizer="adam", lr=1e-3, momentum=0.0, weight_decay=0.0,
                schedule="cosine",
                extra=(("ddpm_batch_size", 128), ("ddpm_lr", 2e-4), ("ddpm_steps", 800_000)))
# CPU preset: the rs defense's classifier preset, and 500 DDPM steps of 128 digits images (about
# 20 s on one core for the 41 k-parameter UNet of width 8).
_CPU = Recipe(epochs=20, batch_size=64, optimizer="adam", lr=1e-3, momentum=0.0, weight_decay=0.0,
              schedule="cosine", max_examples=30_000,
              extra=(("ddpm_batch_size", 128), ("ddpm_lr", 2e-3), ("ddpm_steps", 500)))

TRAIN_ON = ("denoised", "clean")
PARAMETERS = {
    "arch": Param("auto", str), "sigma": Param(0.25, float, gt=0), "denoiser": Param("train", str),
    "denoiser_width": Param("auto", int, ge=1, literals=("auto",)),
    "train_on": Param("denoised", str, choices=TRAIN_ON),
    "robust_noise": Param(False, bool), "robust_steps": Param(2, int, ge=1),
    "robust_step_size": Param(0.1, float, gt=0),
    "robust_eps_max": Param(None, float, gt=0),
}
# the recipe's DDPM settings (``Recipe.extra``), checked by the same mechanism
DDPM_OPTIONS = {"ddpm_steps": Param(500, int, ge=1), "ddpm_batch_size": Param(128, int, ge=1),
                "ddpm_lr": Param(2e-3, float, gt=0)}


def _denoiser(value: Any) -> str:
    """``train``, or an existing local directory (made absolute, so rows and cache keys agree), or
    a hub id ``owner/name``."""
    from pathlib import Path

    if not isinstance(value, str) or not value.strip():
        raise BenchError(f"dds: denoiser must be 'train', a diffusers directory or a hub id, got {value!r}")
    value = value.strip()
    if value == "train":
        return value
    path = Path(value).expanduser()
    if path.is_dir():
        return str(path.resolve())
    if path.exists() or value.startswith((".", "/", "~")) or value.count("/") != 1:
        raise BenchError(f"dds: denoiser '{value}' is not a directory (and not a hub id owner/name)")
    return value


def _denoiser_width(value: int | str, image_size: int, recipe: str | None = None) -> int:
    """``auto``: 8 channels for images up to 16 px or the ``cpu`` recipe (a 41 k-parameter UNet whose
    one-shot denoising costs about as much as the small CNN classifier), else 32 (``value``
    already checked by its spec)."""
    if value == "auto":
        return 8 if image_size <= 16 or recipe == "cpu" else 32
    return int(value)


def _training_options(p: dict[str, Any]) -> dict[str, Any]:
    """The classifier-training hyperparameters of ``p`` (already checked by their specs), with the
    rule that relates two of them (one-line BenchError)."""
    out = {k: p[k] for k in ("train_on", "robust_noise", "robust_steps", "robust_step_size", "robust_eps_max")}
    if out["robust_noise"] and out["train_on"] != "denoised":
        raise BenchError("dds: robust_noise perturbs the denoiser's noise, so it needs train_on=denoised")
    return out


@register_defense("dds")
class DDS(Defense):
    """Diffusion denoised smoothing (Carlini et al. 2023): one-shot DDPM denoising at the step t* whose
    noise matches 2 sigma in [-1, 1] space, then a classifier; certified by randomized smoothing.

    Trained: the DDPM denoiser when ``denoiser=train`` (small datasets; cached separately), then the
    classifier with the denoiser frozen, on denoised noisy images (``train_on=denoised``) or clean
    ones (``train_on=clean``); ``robust_noise`` adds Hedayatnia et al.'s adversarial noise steps.
    Certified: ``smoothing`` at the nominal ``sigma``; the noise is added inside the model
    (``adds_smoothing_noise``), so the certifier adds none and refuses another ``--sigma``.
    Evaluated as the smoothed classifier (``smoothed``: PREDICT scoring, SmoothAdv under quick@1).

    Hyperparameters: ``sigma`` (0.25, pixel space), ``arch`` (the classifier backbone),
    ``denoiser`` (``train``, a ``diffusers`` save_pretrained directory, or a hub id such as
    ``google/ddpm-cifar10-32``), ``denoiser_width`` (auto: 8 up to 16 px or on the cpu recipe, else 32;
    the small DDPM's channels at full resolution),
    ``train_on`` (denoised | clean), ``robust_noise`` (false), ``robust_steps`` (K = 2),
    ``robust_step_size`` (eta = 0.1), ``robust_eps_max`` (none: no projection).
    """

    info = DefenseInfo(paper="(Certified!!) Adversarial Robustness for Free! (Carlini, Tramèr, Dvijotham, Rice, "
                             "Sun, Kolter)",
                       year=2023, kind="certified", randomized=True, certificates=("smoothing",),
                       authors_protocol="certify", default_protocol="quick", smoothed=True,
                       url="https://arxiv.org/abs/2206.10550",
                       summary="one-shot DDPM denoising at the step matching 2 sigma, then a classifier; "
                               "randomized smoothing certificate")
    recipes = {"paper": _PAPER, "cpu": _CPU}
    parameters = PARAMETERS

    def resolve_hparams(self, given: dict[str, Any], image_size: int, recipe: str | None = None) -> dict[str, Any]:
        r = super().resolve_hparams(given, image_size, recipe)  # every value checked by its spec
        r["denoiser"] = _denoiser(r["denoiser"])
        r["denoiser_width"] = _denoiser_width(r["denoiser_width"], image_size, recipe)
        r.update(_training_options(r))
        return r

    def build(self, spec: DatasetSpec, image_size: int, **hparams: Any) -> DefendedModel:
        from bench.models import ddpm
        from bench.models.backbones import build_backbone
        from bench.models.dds import DDSModel
        from bench.models.names import resolve_arch

        p = self.check_hparams(hparams, ignore_unknown=True)  # resolved values pass; a direct caller's may not
        source = _denoiser(p["denoiser"])
        if source == "train":
            unet = ddpm.tiny_unet(spec.channels, image_size, _denoiser_width(p["denoiser_width"], image_size))
            schedule = ddpm.linear_schedule_config()
        else:
            unet, schedule = ddpm.load_denoiser(source)
            unet_config: Any = unet.config  # diffusers' config of the UNet2DModel (diffusers has no stubs)
            channels = int(unet_config.in_channels)
            if channels != spec.channels:
                raise BenchError(f"dds: the denoiser '{source}' takes {channels}-channel images, dataset "
                                 f"'{spec.name}' has {spec.channels}")
            factor = 2 ** (len(unet_config.down_block_types) - 1)
            if image_size % factor:
                raise BenchError(f"dds: the denoiser '{source}' needs an image size divisible by {factor}, "
                                 f"got {image_size}")
        net = build_backbone(resolve_arch(str(p["arch"]), image_size), spec.channels, spec.num_classes, image_size)
        model = DDSModel(net, unet, ddpm.alphas_cumprod_of(schedule), spec.mean, spec.std,
                         spec.shape(image_size), spec.num_classes, spec.task, sigma=p["sigma"],
                         prediction_type=str(schedule.get("prediction_type", "epsilon")),
                         denoiser_source=source)
        model.training_options = _training_options(p)  # read by fit()
        return model

    def fit(self, model: DefendedModel, train: Split, recipe: Recipe, *, spec: DatasetSpec,
            device: torch.device, seed: int = 0, progress: Any = None, resume: Path | None = None) -> TrainSummary:
        """Train (or load the cached) DDPM when ``denoiser=train``, then the classifier, denoiser frozen."""
        from bench.progress import Progress
        from bench.training.loop import fit

        progress = progress or Progress()
        if not capability(model, "adds_smoothing_noise"):
            raise BenchError("dds: the model is not a DDS model; build it with the dds defense")
        dds = cast("DDSModel", model)  # built by build(): the model that adds its own smoothing noise
        extra_seconds = 0.0
        if dds.denoiser_source == "train":
            extra_seconds = fit_denoiser(dds, train, recipe, spec=spec, device=device, seed=seed, progress=progress)
        dds.denoiser.requires_grad_(False)
        p = dds.training_options
        if p["train_on"] == "clean":
            target: nn.Module = dds.classifier_view()
            perturb = None
        else:
            target = dds
            perturb = (robust_noise_perturb(p["robust_steps"], p["robust_step_size"], p["robust_eps_max"])
                       if p["robust_noise"] else None)
        summary = fit(target, train, recipe, device=device, seed=seed, progress=progress, perturb=perturb,
                      balance_classes=recipe.balances(spec), resume=resume)
        summary.seconds += extra_seconds
        model.eval()
        return summary

    def load_state_dict(self, model: DefendedModel, state: dict[str, Any]) -> None:
        """A full DDS state dict, or (with a pretrained denoiser) the classifier's keys alone."""
        if any(key.startswith("denoiser.") for key in state):
            model.load_state_dict(state, strict=True)
            return
        if getattr(model, "denoiser_source", "train") == "train":
            raise CheckpointError("dds: the checkpoint holds no denoiser weights; give the denoiser with "
                                  "--hparam denoiser=DIR (a diffusers save_pretrained directory or a hub id)")
        missing, unexpected = model.load_state_dict(state, strict=False)
        bad = [k for k in missing if not k.startswith("denoiser.")]
        if bad or unexpected:
            raise RuntimeError(f"Missing key(s): {', '.join(bad[:5])}; unexpected key(s): {', '.join(unexpected[:5])}")


@register_defense("dds-rcs")
class DDSRobust(DDS):
    """DDS with the covariate-shift-robust classifier (Hedayatnia et al. 2025): the same model as
    ``dds``, trained with ``robust_noise=true`` (K = 2 sign steps of eta = 0.1 on the diffusion
    noise, no projection: the official CIFAR-10 configuration) on denoised images.

    Trained: the DDPM (``denoiser=train``) as ``dds``, then the classifier on denoised images whose
    noise maximises its loss. Certified: ``smoothing`` at the nominal sigma, with ordinary Gaussian
    noise (the adversarial noise is a training augmentation only).
    """

    info = DefenseInfo(paper="Robustifying Diffusion-Denoised Smoothing Against Covariate Shift (Hedayatnia, "
                             "Tavassolipour, Araabi, Vahabie)",
                       year=2025, kind="certified", randomized=True, certificates=("smoothing",),
                       authors_protocol="certify", default_protocol="quick", smoothed=True,
                       url="https://arxiv.org/abs/2509.10913",
                       summary="DDS with the classifier trained on adversarially perturbed diffusion noise")
    parameters = {**PARAMETERS, "robust_noise": Param(True, bool)}


def fit_denoiser(model: DDSModel, train: Split, recipe: Recipe, *, spec: DatasetSpec, device: torch.device,
                 seed: int, progress: Progress) -> float:
    """Load the cached small DDPM for this configuration, or train it and cache it; seconds spent.

    The cache key covers what determines the weights: the dataset and training indices, image
    size, UNet configuration, schedule, DDPM steps / batch / rate, seed, device kind and
    :data:`bench.models.ddpm.DDPM_VERSION`, so ``dds`` and ``dds-rcs`` (and any classifier
    setting) share one denoiser.
    """
    import time

    import torch

    from bench.config import stable_hash
    from bench.data.base import indices_hash
    from bench.models import ddpm
    from bench.training.checkpoints import checkpoint_dir, read_checkpoint, save_checkpoint

    started = time.perf_counter()
    extra = dict(recipe.extra)
    options = check_params("dds recipe", DDPM_OPTIONS, {k: extra.get(k, p.default) for k, p in DDPM_OPTIONS.items()})
    steps, batch, lr = options["ddpm_steps"], options["ddpm_batch_size"], options["ddpm_lr"]
    assert train.indices is not None
    denoiser_config: Any = model.denoiser.config  # diffusers' config of the UNet2DModel (no stubs)
    unet_config = {k: v for k, v in dict(denoiser_config).items() if not k.startswith("_")}
    key = stable_hash({"what": "ddpm", "version": ddpm.DDPM_VERSION, "dataset": spec.name,
                       "train_indices": indices_hash(train.indices.numpy()), "n_train": len(train),
                       "image_shape": list(train.images.shape[1:]), "unet": unet_config,
                       "alphas_cumprod": stable_hash([round(float(a), 12) for a in model.alphas_cumprod.tolist()]),
                       "steps": steps, "batch_size": batch, "lr": lr, "seed": seed, "device_kind": device.type}, 32)
    path = checkpoint_dir() / f"ddpm-{spec.name}-{key[:16]}.pt"
    if path.exists():
        try:
            state, meta = read_checkpoint(path)
            model.denoiser.load_state_dict(state, strict=True)
            progress.log(f"using cached DDPM denoiser {path}")
            return time.perf_counter() - started
        except Exception as exc:  # noqa: BLE001 - a broken cache entry is retrained, never trusted
            progress.log(f"cached DDPM denoiser {path} is unusable ({exc}); retraining")
    progress.log(f"training the DDPM denoiser on {spec.name} ({steps} steps of {batch}, {device})")
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        summary = ddpm.train_ddpm(model.denoiser, model.alphas_cumprod, train.images, steps=steps, batch_size=batch,
                                  lr=lr, seed=seed, device=device, progress=progress)
    state = {k: v.detach().cpu() for k, v in model.denoiser.state_dict().items()}
    save_checkpoint(path, state, {"train_summary": summary, "key": key, "what": "ddpm", "dataset": spec.name})
    return time.perf_counter() - started


def robust_noise_perturb(steps: int, step_size: float, eps_max: float | None) -> Perturb:
    """Hedayatnia et al.'s training augmentation as a :data:`~bench.training.loop.Perturb` hook.

    For a batch (x, y): eps0 ~ N(0, I); K times, eps <- eps + eta * sign(grad_eps CE(f(D(x, eps)), y)),
    where D is the frozen one-shot denoiser at t*, then (with ``eps_max``) eps - eps0 is clamped to
    [-eps_max, eps_max]. The final eps is handed to the model's next forward pass (the training
    step) through :meth:`DDSModel.use_noise_once`; the images are returned unchanged. The
    gradient is taken with respect to eps only (the classifier's parameters get no gradient here).
    """
    checked = check_params("defense 'dds'", PARAMETERS, {"robust_steps": steps, "robust_step_size": step_size,
                                                         "robust_eps_max": eps_max})
    steps, step_size, eps_max = checked["robust_steps"], checked["robust_step_size"], checked["robust_eps_max"]

    def perturb(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        import torch

        from bench import tasks

        dds = cast("DDSModel", model)  # fit() hands this hook its DDS model (train_on=denoised)
        eps0 = torch.randn_like(x)
        eps = eps0.clone()
        task = capability(dds, "task")
        for _ in range(steps):
            eps.requires_grad_(True)
            with torch.enable_grad():
                loss = tasks.loss(dds.classify(dds.denoise(x, eps)), y, task, reduction="sum")
                (grad,) = torch.autograd.grad(loss, eps)
            eps = eps.detach() + step_size * grad.sign()
            if eps_max is not None:
                eps = eps0 + (eps - eps0).clamp(-eps_max, eps_max)
        dds.use_noise_once(eps.detach())
        return x

    return perturb

