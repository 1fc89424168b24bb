"""SmoothAdv-PGD (Salman et al., 2019): PGD on the soft smoothed classifier.

The smoothed classifier of a base classifier f at noise level sigma is attacked through its soft
version G(x) = E_d[softmax(f(x + d))], d ~ N(0, sigma^2 I), estimated with ``m`` noise draws:

    x' = argmax_{||x' - x|| <= eps}  -log( (1/m) sum_i softmax(f(x' + d_i))_y )

As in the official ``PGD_L2`` (``_attack_mutlinoise``): the m draws are sampled once, before the
attack, and held fixed for all T steps (``resample=True`` redraws them at every step instead);
the average softmax is clamped at 1e-20 before the log; there is no random start; an L2 step is
the gradient normalised per example (a random direction when the gradient is exactly zero) times
2 eps / T; the image is clamped to [0, 1] and projected to the eps ball after every step. An
Linf threat takes signed steps of the same size (a bench extension; the paper is L2 only).

eps is in pixel units of [0, 1] images, like every bench threat model. The official code gives
eps in units of 1/256 (``--epsilon 64`` is 0.25): write it explicitly as a fraction,
``--eps 64/256``. An L2 eps larger than the diameter of the image cube (a bare ``64``) is refused
with that hint.

The attack returns x'; a run scores the smoothed classifier on it with PREDICT (the model
declares ``smoothed_evaluation``), abstentions counting as wrong. See docs/defenses/smoothadv.md.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from bench.attacks.base import Attack, AttackInfo
from bench.attacks.pgd import pgd_loss_ascent
from bench.capabilities import capability
from bench.config import Norm, ThreatModel
from bench.errors import BenchError
from bench.params import Param
from bench.registry import register_attack

__all__ = ["SmoothAdv", "SoftSmoothed", "smoothadv_pgd"]

MAX_ROWS = 4096  # noisy copies per forward pass (m * batch is split into chunks of at most this)


class SoftSmoothed(nn.Module):
    """log G(x): the log of the mean softmax of ``model`` over the noise draws ``noise`` (m, N, ...).

    ``noise`` None (or ``resample``) draws m fresh vectors at every call. A model that adds the
    smoothing noise itself (``adds_smoothing_noise``, e.g. DDS) gets no extra noise: its own
    draws are fresh at every pass and cannot be held fixed.
    """

    def __init__(self, model: nn.Module, sigma: float, m: int, noise: torch.Tensor | None = None) -> None:
        super().__init__()
        from bench.certifiers.smoothing import input_noise_sigma

        # 0 when the model adds the noise itself (not named sigma: that is a model declaration)
        self.noise_sigma = input_noise_sigma(model, sigma)
        if noise is not None and self.noise_sigma == 0:
            noise = torch.zeros_like(noise)
        self.model, self.m, self.noise = model, m, noise

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = len(x)
        noise = self.noise if self.noise is not None else \
            self.noise_sigma * torch.randn((self.m, *x.shape), device=x.device, dtype=x.dtype)
        noisy = (x.unsqueeze(0) + noise).reshape(self.m * n, *x.shape[1:])
        chunk = max(n, (MAX_ROWS // max(n, 1)) * n)  # whole copies of the batch per pass
        probs = torch.cat([torch.softmax(self.model(noisy[i:i + chunk]), dim=1)
                           for i in range(0, len(noisy), chunk)])
        return torch.log(probs.view(self.m, n, -1).mean(dim=0).clamp_min(1e-20))


@register_attack("smoothadv")
class SmoothAdv(Attack):
    """SmoothAdv-PGD on the soft smoothed classifier (see the module docstring).

    Parameters: ``m`` (noise draws, default 32, the paper's m_test), ``steps`` (T, default 20),
    ``step_size`` (default 2 eps / T, the official rule), ``resample`` (default False: the m
    draws are fixed for the whole attack, as in the official code), ``sigma`` (default: the
    model's declared ``sigma``).
    """

    info = AttackInfo(norms=(Norm.L2, Norm.LINF), stochastic=True, source="bench")
    parameters = {"m": Param(32, int, ge=1), "steps": Param(20, int, ge=1), "step_size": Param(None, float, gt=0),
                  "resample": Param(False, bool), "sigma": Param(None, float, gt=0)}

    def sigma_of(self, model: nn.Module) -> float:
        sigma = self.params["sigma"] if self.params["sigma"] is not None else capability(model, "sigma")
        if sigma is None:
            raise BenchError("smoothadv: the model declares no sigma (not a smoothing defense); "
                             "give one with --attack-param sigma=0.25")
        return float(sigma)

    def run(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, threat: ThreatModel) -> torch.Tensor:
        if threat.norm is Norm.L2 and threat.eps > math.sqrt(x[0].numel()):
            raise BenchError(f"smoothadv: L2 eps {threat.eps:g} exceeds the diameter of the image cube "
                             f"({math.sqrt(x[0].numel()):.1f}); bench eps are in pixel units: the official "
                             f"1/256 convention is written as a fraction, e.g. --eps {threat.eps:g}/256")
        m, steps = int(self.params["m"]), int(self.params["steps"])
        sigma = self.sigma_of(model)
        noise = None if self.params["resample"] else sigma * torch.randn((m, *x.shape), device=x.device,
                                                                         dtype=x.dtype)
        step = float(self.params["step_size"]) if self.params["step_size"] is not None else None
        return smoothadv_pgd(model, x, y, threat, sigma, m, steps, noise, step)


def smoothadv_pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, threat: ThreatModel, sigma: float, m: int,
                  steps: int, noise: torch.Tensor | None, step_size: float | None = None) -> torch.Tensor:
    """The SmoothAdv PGD loop: ascend -log G_y with the draws ``noise`` (m, N, ...) held fixed
    (None: fresh draws at every step), step ``step_size`` (default 2 eps / steps), no random start.
    Used by the attack and by SmoothAdv training (which reuses the same noise for its inputs)."""
    soft = SoftSmoothed(model, sigma, m, noise)
    step = step_size if step_size is not None else 2 * threat.eps / steps
    return pgd_loss_ascent(soft, x, y, threat, step, steps, random_start=False,
                           loss_fn=nn.functional.nll_loss, random_direction_on_zero=True)
