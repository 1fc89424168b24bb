"""Lipschitz-margin certificates for models that declare a guaranteed L2 Lipschitz bound.

If the logit map f: R^d -> R^K satisfies ||f(x) - f(x')||_2 <= L ||x - x'||_2, then for classes
a != c the margin m_ac(x) = f_a(x) - f_c(x) changes by at most sqrt(2) L ||x - x'||_2 (the vector
e_a - e_c has L2 norm sqrt(2)), so the prediction a = argmax f(x) cannot change within radius
(f_a(x) - max_{c != a} f_c(x)) / (sqrt(2) L)  (Tsuzuku et al. 2018, Proposition 1).

For a randomized model the certified classifier is argmax Z(x) with Z(x) = E_omega[clip(f(x;
omega), -B, B)]: clipping is 1-Lipschitz coordinate-wise and an expectation of L-Lipschitz maps
is L-Lipschitz, so the margin argument holds for Z when the bound L holds for every draw. Z is
estimated from n draws, with a confidence bound on every class (see :class:`Lipschitz`).

**Float rounding.** The logits are computed in floating point, so the computed margin is not the
margin of the exact map f. The certificate assumes that every computed logit is within

    rho = ROUNDING * eps(dtype) * max_k |z_k|,   ROUNDING = 8,

of the exact one (``z``: the computed logits, ``eps``: the machine epsilon of their dtype, 2^-23 in
float32), subtracts ``2 rho`` from the margin (each of the two logits may err by ``rho``) and rounds
the radius down (:func:`certified_radius`). What this covers: the rounding of each logit to its dtype
(``eps / 2`` relative) and a forward pass whose accumulated error stays below 8 eps of the largest
logit. Measured per-logit error (float32 against float64 forward pass of the same weights and
inputs, in units of eps * max|z|): a 6 -> 2 linear map with nonnegative weights 0.94 (the test's
model); the HyCAS digits network trained for 3 epochs at most 6.0 (median 2.2; 450 test images, 3
frozen draws); the same network *untrained* up to 12.1 (three seeds, 256 images of digits and of
synthetic), which 8 does not cover. What it does **not** cover: a network's forward-pass error is
not bounded by any multiple of eps * max|z| in general (cancellation inside the network: large
intermediate activations and small logits, deep or wide layers), nor arithmetic less precise than
the logits' dtype (reduced-precision kernels; the certificate's own forward passes run with TF32
switched off, see :func:`float32_arithmetic`). Where a logit errs by e > rho, the radius can exceed
the exact model's by up to 2 (e - rho) / (sqrt(2) L).
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from bench.capabilities import capability
from bench.certifiers.base import ALPHA, Certificate, Certifier, CertifierInfo
from bench.certifiers.stats import empirical_bernstein_radius, hoeffding_radius
from bench.errors import BenchError
from bench.params import Param
from bench.registry import register_certifier

__all__ = ["ROUNDING", "Lipschitz", "certified_radius", "declared_bound", "float32_arithmetic",
           "rounding_allowance"]

DEFAULT_CLIP = 10.0  # B when neither --certify-param clip nor the model's logit_clip says otherwise
ROUNDING = 8.0  # assumed per-logit float error, in units of eps(dtype) * max_k |z_k| (module docstring)
_EPS64 = sys.float_info.epsilon  # 2^-52; float64 unit roundoff u = 2^-53
_DOWN = 1.0 - 4 * _EPS64  # exactly representable; see certified_radius


def rounding_allowance(logits: torch.Tensor) -> torch.Tensor:
    """Per-example bound rho (float64, shape (N,)) on |computed - exact| of every logit, as assumed.

    ``rho = (ROUNDING * eps(dtype) + 2 * eps64) * max_k |z_k|``: the assumed forward-pass error (module
    docstring) plus ``2 eps64 max|z|``, which covers the float64 rounding of ``z -+ rho`` (at most
    ``u64 (max|z| + rho)`` each, rho <= max|z|). Non-finite logits give an infinite allowance, so the
    certificate abstains. Integer logits are refused (``ValueError``).
    """
    if not logits.is_floating_point():
        raise ValueError(f"lipschitz: logits must be floating point, got {logits.dtype}")
    eps = torch.finfo(logits.dtype).eps
    scale = logits.detach().double().abs().reshape(len(logits), -1).amax(dim=1)
    scale = torch.where(torch.isfinite(scale), scale, torch.full_like(scale, math.inf))
    return (ROUNDING * eps + 2 * _EPS64) * scale


def certified_radius(margin: float, lipschitz: float) -> float:
    """``margin / (sqrt(2) L)`` rounded toward zero: never above the exact real quotient.

    Guarantee: for finite ``margin > 0`` and ``lipschitz > 0`` (floats), the result is <= the exact
    ``margin / (sqrt(2) * lipschitz)``. The float64 evaluation makes four roundings of relative size
    at most u = 2^-53 (sqrt(2), the product, the quotient, and the subtraction that produced
    ``margin`` in the caller), so it is at most (1 + u)^4 times too large; multiplying by
    ``1 - 2^-50`` (exact) and rounding once more gives (1 + u)^5 (1 - 8u) < 1.
    """
    return (margin / (math.sqrt(2.0) * lipschitz)) * _DOWN


@contextmanager
def float32_arithmetic() -> Iterator[None]:
    """TF32 off for CUDA matmuls and cuDNN convolutions within the context (restored after).

    TF32 keeps 10 mantissa bits: a float32 model on an Ampere-or-newer GPU would compute its
    convolutions ~8,000x less precisely than float32 (cuDNN's default allows it), far outside the
    rounding allowance. No effect on CPU.
    """
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = matmul
        torch.backends.cudnn.allow_tf32 = cudnn


def declared_bound(model: nn.Module) -> tuple[float, str]:
    """The model's guaranteed L2 Lipschitz bound of its logit map and how it is guaranteed."""
    bound = capability(model, "lipschitz_bound")
    guarantee = capability(model, "lipschitz_guarantee")
    if bound is None:
        raise BenchError(f"lipschitz: {type(model).__name__} declares no guaranteed Lipschitz bound "
                         "(lipschitz_bound); only models with a proven bound can be certified this way")
    if not guarantee:
        raise BenchError(f"lipschitz: {type(model).__name__} declares lipschitz_bound={bound} but not how it is "
                         "guaranteed (lipschitz_guarantee); an estimated bound is not a certificate")
    value = float(bound)
    if not value > 0 or math.isinf(value):
        raise BenchError(f"lipschitz: declared bound must be a finite number > 0, got {bound}")
    return value, str(guarantee)


@register_certifier("lipschitz")
class Lipschitz(Certifier):
    """Lipschitz-margin certificate (L2) from the model's declared, guaranteed bound L.

    **Guarantee.** Deterministic model: no probability: the returned class is the argmax of the
    exact logits f everywhere in the L2 ball of the returned radius
    ``(z_a - max_{c != a} z_c - 2 rho) / (sqrt(2) L)``, rounded down, *provided* every computed
    logit ``z_k`` is within ``rho`` (:func:`rounding_allowance`) of ``f_k`` at the example (module
    docstring: what this assumption covers and what it does not). Abstains when that margin is not
    positive (a tie, a margin within the rounding allowance, or non-finite logits). Randomized
    model: with probability at least 1 - alpha over the n draws, the returned class is argmax Z on
    the L2 ball of the returned radius, where Z(x) = E[clip(logits(x; omega), -clip, clip)]; the
    margin of Z is lower-bounded with a Hoeffding (or empirical Bernstein) bound on each of the K
    classes, each side at level alpha / (2K) (union bound over 2K events, so the choice of the top
    class from the same draws is covered), each interval widened by the rounding allowance (see
    :meth:`_confidence_box`). Abstains when the lower-bounded margin is not positive. The forward
    passes run with TF32 off (:func:`float32_arithmetic`).

    A model that declares no ``lipschitz_bound`` (with ``lipschitz_guarantee``) is refused.
    Parameters: ``n`` (draws for randomized models, 1,000), ``alpha`` (0.001), ``clip`` (B; default
    the model's ``logit_clip`` if declared, else 10.0), ``bound`` (``bernstein``, the default, or
    ``hoeffding``; Bernstein is much tighter when the logits vary little between draws).
    """

    info = CertifierInfo(norm="L2", statistical=False, summary="margin / (sqrt(2) L) from a guaranteed bound L")
    parameters = {"n": Param(1000, int, ge=1), "alpha": ALPHA, "clip": Param(None, float, gt=0),
                  "bound": Param("bernstein", str, choices=("hoeffding", "bernstein"))}

    def validate(self) -> None:
        p = self.params
        if p["bound"] == "bernstein" and p["n"] < 2:
            raise BenchError("lipschitz: the Bernstein bound needs n >= 2")

    def prepare(self, model: nn.Module) -> dict[str, Any]:
        self.require_single_label(model)
        self.lipschitz, guarantee = declared_bound(model)
        self.randomized = bool(capability(model, "randomized"))
        clip = self.params["clip"] if self.params["clip"] is not None else capability(model, "logit_clip")
        self.clip = float(clip) if clip is not None else DEFAULT_CLIP
        out: dict[str, Any] = {"certifier": "lipschitz", "L": self.lipschitz, "guarantee": guarantee,
                               "randomized": self.randomized, "rounding": ROUNDING}
        if self.randomized:
            out.update(n=int(self.params["n"]), alpha=float(self.params["alpha"]), clip=self.clip,
                       bound=self.params["bound"])
        return out

    def certify(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor | None = None) -> list[Certificate]:
        if not hasattr(self, "lipschitz"):
            self.prepare(model)
        started = time.perf_counter()
        with torch.inference_mode(), float32_arithmetic():
            if not self.randomized:
                logits = model(x)
                rho = rounding_allowance(logits)[:, None]
                centre = logits.double()
                lower, upper, samples = centre - rho, centre + rho, 1
            else:
                lower, upper, samples = self._confidence_box(model, x)
                centre = (lower + upper) / 2
        seconds = (time.perf_counter() - started) / max(len(x), 1)
        return [self._certificate(lo, hi, mid, samples, seconds) for lo, hi, mid in zip(lower, upper, centre)]

    def _certificate(self, lo: torch.Tensor, hi: torch.Tensor, mid: torch.Tensor, samples: int,
                     seconds: float) -> Certificate:
        """The certificate from per-class lower and upper bounds on the certified logits (float64)."""
        top = int(mid.argmax())
        others = torch.cat([hi[:top], hi[top + 1:]])
        margin = float(lo[top] - others.max()) if len(others) else math.inf
        if not margin > 0:  # a tie, within the allowance, or NaN
            return Certificate(None, 0.0, samples, bound=margin, seconds=seconds)
        return Certificate(top, certified_radius(margin, self.lipschitz), samples, bound=margin, seconds=seconds)

    def _confidence_box(self, model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Per-class lower and upper confidence bounds on Z(x) from n draws (one draw per example
        per forward pass, so draws shared across a batch stay independent across passes).

        Rounding: the clipped logits are summed in float64 as differences from the first draw
        (shifted sums, so the variance is not computed by cancelling large squares). Each interval
        is widened by (a) the mean over the draws of each draw's :func:`rounding_allowance` (clipping
        is 1-Lipschitz, so it bounds the mean's error if every draw obeys the assumption; draws not
        seen are assumed to obey it like the seen ones), and (b) ``(n + 4) eps64 (2 clip)``, the
        float64 error of the sums and of the later subtractions; the variance fed to the Bernstein
        bound is raised by ``4 n eps64 S2 / (n - 1)`` (S2: the shifted sum of squares), which bounds
        its float64 error.
        """
        n, clip = int(self.params["n"]), self.clip
        shift = total = sq = allowance = None
        for _ in range(n):
            raw = model(x)
            rho = rounding_allowance(raw)[:, None]
            logits = raw.double().clamp(-clip, clip)
            if shift is None:
                shift, total, sq, allowance = logits, torch.zeros_like(logits), torch.zeros_like(logits), rho
                continue
            assert total is not None and sq is not None and allowance is not None
            total, sq, allowance = total + (logits - shift), sq + (logits - shift) ** 2, allowance + rho
        assert shift is not None and total is not None and sq is not None and allowance is not None
        mean = shift + total / n
        k = mean.shape[1]
        level = float(self.params["alpha"]) / (2 * k)
        if self.params["bound"] == "hoeffding":
            width = torch.full_like(mean, hoeffding_radius(n, 2 * clip, level))
        else:
            var = ((sq - total ** 2 / n) / (n - 1)).clamp_min(0) + 4 * n * _EPS64 * sq / (n - 1)
            width = torch.tensor([[empirical_bernstein_radius(float(v), n, 2 * clip, level) for v in row]
                                  for row in var], dtype=mean.dtype, device=mean.device)
        width = width + allowance / n + (n + 4) * _EPS64 * 2 * clip
        return mean - width, mean + width, n
