"""The DDS model (Carlini et al. 2023): denoise with a frozen DDPM at t*, then classify.

The smoothing noise is drawn inside the forward pass (see :mod:`bench.defenses.dds` for the
method, the t* rule and what is trained).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from bench.errors import BenchError
from bench.models import ddpm
from bench.models.defended import DefendedModel

__all__ = ["DDSModel"]


class _ClassifierView(nn.Module):
    """The classifier alone (normalization and backbone of a DDS model): for clean training."""

    def __init__(self, model: DefendedModel) -> None:
        super().__init__()
        self.normalize, self.net = model.normalize, model.net
        self.task, self.num_classes = model.task, model.num_classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.normalize(x))

class DDSModel(DefendedModel):
    """Denoise-then-classify: images in [0, 1] -> logits, with the smoothing noise drawn inside.

    Declarations: ``randomized`` and ``randomness_per_example`` (a fresh eps per example per
    pass), ``adds_smoothing_noise`` (certifiers must not add Gaussian noise of their own),
    ``smoothed_evaluation`` (the defended classifier is the smoothed g: runs score it with PREDICT),
    ``sigma`` (the nominal pixel-space sigma, used for certificates), ``t_star`` and
    ``effective_sigma`` (sqrt(1 - abar_t*) / (2 sqrt(abar_t*)) >= sigma, the noise actually
    added). The denoiser (``self.denoiser``) is frozen and always in eval mode.
    """

    randomized = True
    randomness_per_example = True
    adds_smoothing_noise = True
    smoothed_evaluation = True  # the defended classifier is g: a run predicts with PREDICT

    denoiser: nn.Module  # set by __init__: the frozen DDPM UNet (diffusers UNet2DModel)
    alphas_cumprod: torch.Tensor  # non-persistent buffer set by __init__: abar_t, float64, t = 0..T-1

    def __init__(self, net: nn.Module, denoiser: nn.Module, alphas_cumprod: torch.Tensor,
                 mean: Sequence[float], std: Sequence[float], input_shape: Sequence[int], num_classes: int,
                 task: str = "multiclass", *, sigma: float = 0.25, prediction_type: str = "epsilon",
                 denoiser_source: str = "train", classifier_size: int | None = None) -> None:
        super().__init__(net, mean, std, input_shape, num_classes, task)
        if prediction_type not in ddpm.PREDICTION_TYPES:
            raise BenchError(f"dds: unsupported prediction type '{prediction_type}'; "
                             f"known: {', '.join(ddpm.PREDICTION_TYPES)}")
        self.denoiser = denoiser.eval().requires_grad_(False)
        self.register_buffer("alphas_cumprod", alphas_cumprod.detach().double().cpu(), persistent=False)
        self.sigma = float(sigma)
        self.t_star = ddpm.timestep_for_sigma(self.alphas_cumprod, self.sigma)
        self.effective_sigma = ddpm.effective_sigma(self.alphas_cumprod, self.t_star)
        self.abar_t = float(self.alphas_cumprod[self.t_star])
        self.prediction_type = prediction_type
        self.denoiser_source = denoiser_source
        self.classifier_size = int(classifier_size or self.input_shape[-1])
        self.training_options: dict[str, Any] = {"train_on": "denoised", "robust_noise": False}
        self._frozen_seed: int | None = None
        self._pending_noise: torch.Tensor | None = None

    # -- the pieces ------------------------------------------------------------------------
    def diffuse(self, x: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(abar_t*) (2x - 1) + sqrt(1 - abar_t*) eps."""
        return math.sqrt(self.abar_t) * (2.0 * x - 1.0) + math.sqrt(1.0 - self.abar_t) * eps

    def denoise(self, x: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """The one-shot x0 estimate from x_t, clipped, back in [0, 1]."""
        x_t = self.diffuse(x, eps)
        t = torch.full((len(x),), self.t_star, dtype=torch.long, device=x.device)
        out = self.denoiser(x_t, t).sample
        return (ddpm.predict_x0(out.to(x_t.dtype), x_t, self.abar_t, self.prediction_type) + 1.0) / 2.0

    def classify(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[-1] != self.classifier_size or images.shape[-2] != self.classifier_size:
            images = torch.nn.functional.interpolate(images, (self.classifier_size, self.classifier_size),
                                                     mode="bicubic", antialias=True)
        return self.net(self.normalize(images))

    def draw_noise(self, x: torch.Tensor) -> torch.Tensor:
        """eps for this pass: the pending one (training hook), the frozen draw, or a fresh one."""
        if self._pending_noise is not None:
            eps, self._pending_noise = self._pending_noise, None
            if eps.shape != x.shape:
                raise RuntimeError(f"dds: pending noise of shape {tuple(eps.shape)} for input {tuple(x.shape)}")
            return eps.to(device=x.device, dtype=x.dtype)
        if self._frozen_seed is not None:
            generator = torch.Generator(device=x.device).manual_seed(self._frozen_seed)
            return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        return torch.randn_like(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classify(self.denoise(x, self.draw_noise(x)))

    # -- randomness and modes ---------------------------------------------------------------
    def use_noise_once(self, eps: torch.Tensor) -> None:
        """The next forward pass uses ``eps`` instead of a fresh draw (robust-noise training)."""
        self._pending_noise = eps

    @contextmanager
    def freeze_randomness(self) -> Iterator[None]:
        """One eps per input shape (a seed drawn from the global RNG on entry) until exit."""
        previous = self._frozen_seed
        self._frozen_seed = int(torch.randint(0, 2**62, (1,)).item())
        try:
            yield
        finally:
            self._frozen_seed = previous

    def train(self, mode: bool = True) -> DDSModel:
        super().train(mode)
        self.denoiser.eval()  # frozen: never in train mode (dropout)
        return self

    def classifier_view(self) -> nn.Module:
        return _ClassifierView(self)
