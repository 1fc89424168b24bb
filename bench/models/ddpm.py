"""DDPM helpers for diffusion denoised smoothing: the sigma -> t rule, one-shot x0 prediction,
loading a ``diffusers`` DDPM, and training a tiny one on small datasets.

Conventions (Ho et al. 2020, as in ``diffusers``' ``DDPMScheduler``): timesteps are 0-indexed,
``alphas_cumprod[t] = prod_{s <= t} (1 - beta_s)``, the forward process is
``x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps`` on images in [-1, 1], and the UNet is called
with the integer timestep ``t``. ``diffusers`` is imported lazily (``pip install 'bench[dds]'``).
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from bench.errors import BenchError

if TYPE_CHECKING:
    from bench.progress import Progress

__all__ = ["DDPM_VERSION", "denoiser_ratio", "effective_sigma", "linear_alphas_cumprod", "load_denoiser",
           "predict_x0", "require_diffusers", "timestep_for_sigma", "tiny_unet", "train_ddpm"]

# Bump when a change to train_ddpm or tiny_unet makes cached denoisers stale.
DDPM_VERSION = 1

PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")


def require_diffusers() -> Any:
    """The ``diffusers`` module, or a one-line :class:`BenchError` saying how to install it."""
    try:
        import diffusers
    except ImportError:
        raise BenchError("dds: the diffusion denoiser needs the 'diffusers' package; "
                         "install it with: pip install 'bench[dds]'") from None
    return diffusers


# -- the noise schedule and the sigma -> t rule ----------------------------------------------------
def linear_alphas_cumprod(steps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """``abar_t`` of DDPM's linear beta schedule (float64), without diffusers."""
    betas = torch.linspace(beta_start, beta_end, steps, dtype=torch.float64)
    return torch.cumprod(1.0 - betas, dim=0)


def denoiser_ratio(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """``sqrt(1 - abar_t) / sqrt(abar_t)``: the noise std of ``x_t / sqrt(abar_t)`` in [-1, 1] space."""
    a = alphas_cumprod.double()
    return torch.sqrt(1.0 - a) / torch.sqrt(a)


def timestep_for_sigma(alphas_cumprod: torch.Tensor, sigma: float) -> int:
    """The smallest t with ``sqrt(1 - abar_t) / sqrt(abar_t) >= 2 sigma`` (Carlini et al. 2023).

    Pixel noise of std ``sigma`` on x in [0, 1] is noise of std ``2 sigma`` on 2x - 1, and
    ``x_t / sqrt(abar_t) = (2x - 1) + ratio_t * eps``; the first t whose ratio reaches 2 sigma
    smooths with an effective sigma >= sigma, so certifying with ``sigma`` stays valid.
    """
    if not sigma > 0 or not math.isfinite(sigma):
        raise BenchError(f"dds: sigma must be a finite number > 0, got {sigma!r}")
    ratio = denoiser_ratio(alphas_cumprod)
    reached = torch.nonzero(ratio >= 2.0 * sigma)
    if len(reached) == 0:
        largest = float(ratio[-1]) / 2
        raise BenchError(f"dds: sigma {sigma:g} is beyond the diffusion schedule (its last step has "
                         f"noise {largest:.4g} in pixel units); choose a smaller sigma")
    return int(reached[0])


def effective_sigma(alphas_cumprod: torch.Tensor, t: int) -> float:
    """The pixel-space smoothing noise at step t: ``sqrt(1 - abar_t) / (2 sqrt(abar_t))``."""
    return float(denoiser_ratio(alphas_cumprod)[t]) / 2.0


def predict_x0(output: torch.Tensor, x_t: torch.Tensor, abar_t: float,
               prediction_type: str = "epsilon") -> torch.Tensor:
    """One-shot x0 estimate from the UNet output at step t, clipped to [-1, 1].

    ``epsilon``: ``(x_t - sqrt(1 - abar) eps_hat) / sqrt(abar)``; ``sample``: the output itself;
    ``v_prediction``: ``sqrt(abar) x_t - sqrt(1 - abar) v_hat``. A UNet that also learns the
    variance (twice the input channels) contributes its first half.
    """
    if output.shape[1] == 2 * x_t.shape[1]:
        output = output[:, : x_t.shape[1]]
    a, b = math.sqrt(abar_t), math.sqrt(1.0 - abar_t)
    if prediction_type == "epsilon":
        x0 = (x_t - b * output) / a
    elif prediction_type == "sample":
        x0 = output
    elif prediction_type == "v_prediction":
        x0 = a * x_t - b * output
    else:
        raise BenchError(f"dds: unsupported prediction type '{prediction_type}'; known: {', '.join(PREDICTION_TYPES)}")
    return x0.clamp(-1.0, 1.0)


# -- denoisers ---------------------------------------------------------------------------------------
def tiny_unet(channels: int, image_size: int, width: int = 8) -> nn.Module:
    """A small ``UNet2DModel`` for small images: one ResNet block per level, ``width`` channels at
    full resolution and ``2 * width`` below, halving until the coarsest level is at most 4 px,
    self-attention only in the middle block (8 px images: two levels; width 8: 41 k parameters,
    width 16: 0.16 M)."""
    diffusers = require_diffusers()
    levels, size = 1, int(image_size)
    while size > 4 and size % 2 == 0:
        levels, size = levels + 1, size // 2
    if levels < 2:
        raise BenchError(f"dds: the small denoiser needs an image size divisible by 2 and above 4 px, got {image_size}")
    widths = tuple([width] + [2 * width] * (levels - 1))
    return diffusers.UNet2DModel(sample_size=int(image_size), in_channels=channels, out_channels=channels,
                                 block_out_channels=widths, layers_per_block=1,
                                 down_block_types=("DownBlock2D",) * levels, up_block_types=("UpBlock2D",) * levels,
                                 norm_num_groups=math.gcd(8, int(width)))


def linear_schedule_config() -> dict[str, Any]:
    """DDPM's schedule (Ho et al. 2020): 1000 steps, betas linear from 1e-4 to 0.02, epsilon prediction."""
    return {"num_train_timesteps": 1000, "beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02,
            "prediction_type": "epsilon"}


def _local_part(path: Path, subfolder: str, filename: str, missing: str) -> dict[str, Any]:
    """``from_pretrained`` keyword arguments for one part saved in ``path/subfolder`` (pipeline
    layout) or directly in ``path`` (flat layout); ``missing`` is the error when it is in neither."""
    if (path / subfolder / filename).is_file():
        return {"pretrained_model_name_or_path": str(path), "subfolder": subfolder}
    if (path / filename).is_file():
        return {"pretrained_model_name_or_path": str(path)}
    raise BenchError(missing)


def _pretrained_parts(source: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """``from_pretrained`` keyword arguments for the UNet and the scheduler of ``source``: a
    ``DDPMPipeline`` layout (``unet/``, ``scheduler/``) or a flat one (``config.json`` and
    ``scheduler_config.json`` side by side)."""
    path = Path(source).expanduser()
    if path.is_dir():
        unet = _local_part(path, "unet", "config.json",
                           f"dds: no UNet in {path}: expected unet/config.json or config.json "
                           "(a diffusers save_pretrained directory)")
        sched = _local_part(path, "scheduler", "scheduler_config.json",
                            f"dds: no noise schedule in {path}: expected scheduler/scheduler_config.json or "
                            "scheduler_config.json (save the DDPMScheduler with save_pretrained)")
        return unet, sched
    if path.exists() or source.startswith((".", "/", "~")) or source.count("/") != 1:
        raise BenchError(f"dds: denoiser '{source}' is neither a directory nor a hub id (owner/name)")
    return ({"pretrained_model_name_or_path": source, "subfolder": "unet"},
            {"pretrained_model_name_or_path": source, "subfolder": "scheduler"})


def load_denoiser(source: str) -> tuple[nn.Module, dict[str, Any]]:
    """A pretrained ``UNet2DModel`` and its scheduler config from a local directory or a hub id."""
    diffusers = require_diffusers()
    unet_kw, sched_kw = _pretrained_parts(source)
    try:
        unet = diffusers.UNet2DModel.from_pretrained(**unet_kw)
        scheduler = diffusers.DDPMScheduler.from_pretrained(**sched_kw)
    except (OSError, ValueError, EnvironmentError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise BenchError(f"dds: cannot load the denoiser '{source}': {first}") from None
    return unet, dict(scheduler.config)


def alphas_cumprod_of(config: dict[str, Any]) -> torch.Tensor:
    """``abar_t`` of a ``DDPMScheduler`` config (float64, as diffusers computes it in float32)."""
    diffusers = require_diffusers()
    keep = {k: v for k, v in config.items() if not k.startswith("_")}
    scheduler = diffusers.DDPMScheduler.from_config(keep)
    return scheduler.alphas_cumprod.double()


def train_ddpm(unet: nn.Module, alphas_cumprod: torch.Tensor, images: torch.Tensor, *, steps: int,
               batch_size: int, lr: float, seed: int, device: torch.device,
               progress: Progress | None = None) -> dict[str, Any]:
    """The DDPM objective (Ho et al. 2020, "simple" loss): t ~ U{0..T-1}, eps ~ N(0, I),
    minimise ``|| eps - unet(sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, t) ||^2`` over images in
    [-1, 1]. Adam, constant rate ``lr``, ``steps`` updates of ``batch_size`` random images (with
    horizontal flips off: digits are not mirror-symmetric). Seeded; returns a training summary."""
    from bench.progress import Progress

    progress = progress or Progress()
    generator = torch.Generator().manual_seed(seed)
    unet.to(device).train().requires_grad_(True)
    optimizer = torch.optim.Adam(unet.parameters(), lr=lr)
    abar = alphas_cumprod.float().to(device)
    data = (images.float() * 2.0 - 1.0)
    n, total_t = len(data), len(abar)
    losses: list[float] = []
    shown = 0
    started = time.perf_counter()
    with progress.task(f"training the DDPM denoiser ({n} images)", total=steps) as bar:
        for step in range(steps):
            idx = torch.randint(0, n, (min(batch_size, n),), generator=generator)
            x0 = data[idx].to(device)
            t = torch.randint(0, total_t, (len(idx),), generator=generator).to(device)
            eps = torch.randn(x0.shape, generator=generator).to(device)
            a = abar[t].view(-1, 1, 1, 1)
            x_t = a.sqrt() * x0 + (1.0 - a).sqrt() * eps
            loss = torch.nn.functional.mse_loss(unet(x_t, t).sample, eps)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
            if (step + 1) % 50 == 0 or step + 1 == steps:
                bar.advance(step + 1 - shown, loss=f"{sum(losses[-50:]) / len(losses[-50:]):.4f}")
                shown = step + 1
    unet.eval().requires_grad_(False)
    tail = losses[-min(100, len(losses)):]
    return {"steps": steps, "batch_size": batch_size, "lr": lr, "seconds": time.perf_counter() - started,
            "final_loss": sum(tail) / len(tail)}
