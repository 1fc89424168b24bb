"""Lipschitz-margin certificates for models that declare a guaranteed L2 Lipschitz bound.

If the logit map f: R^d -> R^K satisfies ||f(x) - f(x')||_2 <= L ||x - x'||_2, then for classes
a != c the margin m_ac(x) = f_a(x) - f_c(x) changes by at most sqrt(2) L ||x - x'||_2 (the vector
e_a - e_c has L2 norm sqrt(2)), so the prediction a = argmax f(x) cannot change within radius
(f_a(x) - max_{c != a} f_c(x)) / (sqrt(2) L)  (Tsuzuku et al. 2018, Proposition 1).

For a randomized model the certified classifier is argmax Z(x) with Z(x) = E_omega[clip(f(x;
omega), -B, B)]: clipping is 1-Lipschitz coordinate-wise and an expectation of L-Lipschitz maps
is L-Lipschitz, so the margin argument holds for Z when the bound L holds for every draw. Z is
estimated from n draws, with a confidence bound on every class (see :class:`Lipschitz`).
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch
from torch import nn

from bench.capabilities import capability
from bench.certifiers.base import ALPHA, Certificate, Certifier, CertifierInfo
from bench.certifiers.stats import empirical_bernstein_radius, hoeffding_radius
from bench.errors import BenchError
from bench.params import Param
from bench.registry import register_certifier

__all__ = ["Lipschitz", "declared_bound"]

DEFAULT_CLIP = 10.0  # B when neither --certify-param clip nor the model's logit_clip says otherwise


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

    **Guarantee.** Deterministic model: exact (no probability): the returned class is the argmax
    of the logits everywhere in the L2 ball of radius margin / (sqrt(2) L). Randomized model: with
    probability at least 1 - alpha over the n draws, the returned class is argmax Z on the L2 ball
    of the returned radius, where Z(x) = E[clip(logits(x; omega), -clip, clip)]; the margin of Z
    is lower-bounded with a Hoeffding (or empirical Bernstein) bound on each of the K classes,
    each side at level alpha / (2K) (union bound over 2K events, so the choice of the top class
    from the same draws is covered). Abstains when the lower-bounded margin is not positive.

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
                               "randomized": self.randomized}
        if self.randomized:
            out.update(n=int(self.params["n"]), alpha=float(self.params["alpha"]), clip=self.clip,
                       bound=self.params["bound"])
        return out

    def certify(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor | None = None) -> list[Certificate]:
        if not hasattr(self, "lipschitz"):
            self.prepare(model)
        started = time.perf_counter()
        scale = math.sqrt(2.0) * self.lipschitz
        with torch.inference_mode():
            if not self.randomized:
                logits = model(x).double()
                lower = upper = logits
                samples = 1
            else:
                lower, upper, samples = self._confidence_box(model, x)
        out = []
        seconds = (time.perf_counter() - started) / max(len(x), 1)
        centre = (lower + upper) / 2
        for lo, hi, mid in zip(lower, upper, centre):
            top = int(mid.argmax())
            others = torch.cat([hi[:top], hi[top + 1:]])
            margin = float(lo[top] - others.max()) if len(others) else float("inf")
            if margin <= 0:
                out.append(Certificate(None, 0.0, samples, bound=margin, seconds=seconds))
            else:
                out.append(Certificate(top, margin / scale, samples, bound=margin, seconds=seconds))
        return out

    def _confidence_box(self, model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Per-class lower and upper confidence bounds on Z(x) from n draws (one draw per example
        per forward pass, so draws shared across a batch stay independent across passes)."""
        n, clip = int(self.params["n"]), self.clip
        total = sq = None
        for _ in range(n):
            logits = model(x).double().clamp(-clip, clip)
            total = logits if total is None else total + logits
            sq = logits ** 2 if sq is None else sq + logits ** 2
        assert total is not None and sq is not None
        mean = total / n
        k = mean.shape[1]
        level = float(self.params["alpha"]) / (2 * k)
        if self.params["bound"] == "hoeffding":
            width = torch.full_like(mean, hoeffding_radius(n, 2 * clip, level))
        else:
            var = ((sq - n * mean ** 2) / (n - 1)).clamp_min(0)
            width = torch.tensor([[empirical_bernstein_radius(float(v), n, 2 * clip, level) for v in row]
                                  for row in var], dtype=mean.dtype, device=mean.device)
        return mean - width, mean + width, n
