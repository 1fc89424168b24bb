"""The certifier contract.

A certifier turns a model and a batch of examples into one :class:`Certificate` per example: a
prediction (or an abstention) and a certified L2 radius within which that prediction provably
does not change, with the guarantee its class docstring states. The harness stores every
certificate (``example_results``: prediction, abstained, radius, samples_used, count_a, bound,
seconds) and computes certified accuracy per radius from them.

Subclasses set ``info`` and ``defaults`` and implement :meth:`Certifier.prepare` (resolve what the
certificate needs from the model, e.g. sigma or the Lipschitz bound, and refuse models that
cannot be certified) and :meth:`Certifier.certify`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from bench.config import with_defaults
from bench.errors import BenchError

__all__ = ["Certificate", "Certifier", "CertifierInfo", "check_alpha", "check_positive_int"]


@dataclass(frozen=True)
class CertifierInfo:
    norm: str = "L2"
    statistical: bool = True  # the guarantee holds with probability >= 1 - alpha (per example)
    summary: str = ""


@dataclass(frozen=True)
class Certificate:
    """The certificate of one example."""

    prediction: int | None  # None: abstain
    radius: float  # certified L2 radius (0.0 when abstaining)
    samples: int  # forward samples spent on this example
    count_a: int | None = None  # votes for the predicted class among the estimation samples
    bound: float | None = None  # the lower confidence bound the radius comes from (p_A or the margin)
    seconds: float = 0.0

    @property
    def abstained(self) -> bool:
        return self.prediction is None


def check_alpha(alpha: Any, who: str) -> float:
    value = float(alpha)
    if not 0.0 < value < 1.0 or math.isnan(value):
        raise BenchError(f"{who}: alpha must lie in (0, 1), got {alpha}")
    return value


def check_positive_int(value: Any, name: str, who: str) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise BenchError(f"{who}: {name} must be an integer >= 1, got {value!r}") from None
    if number < 1 or number != value:
        raise BenchError(f"{who}: {name} must be an integer >= 1, got {value!r}")
    return number


class Certifier:
    """Base class of certifier registry entries; parameters are validated against ``defaults``."""

    name: ClassVar[str] = ""
    info: ClassVar[CertifierInfo] = CertifierInfo()
    defaults: ClassVar[dict[str, Any]] = {}

    def __init__(self, **params: Any) -> None:
        self.params = with_defaults(self.defaults, params, "certifier", self.name)
        self.validate()

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in sorted(self.params.items()))
        return f"{type(self).__name__}({args})"

    def validate(self) -> None:
        """Raise :class:`BenchError` for invalid parameters (before any work)."""

    def require_single_label(self, model: nn.Module) -> None:
        """The certificates are about argmax predictions: multilabel models cannot be certified."""
        if getattr(model, "task", "multiclass") == "multilabel":
            raise BenchError(f"{self.name}: certification is defined for single-label classifiers (argmax of the "
                             "logits); this model is multilabel")

    def prepare(self, model: nn.Module) -> dict[str, Any]:
        """Check that ``model`` can be certified and return what the certificate uses
        (e.g. ``{"sigma": 0.25, "n0": 100, "n": 100000, "alpha": 0.001}``); raises
        :class:`BenchError` otherwise. Stored with the stage and shown as the ``certificate`` block."""
        return dict(self.params)

    def certify(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor | None = None) -> list[Certificate]:
        """One certificate per example of ``x`` (images in [0, 1], shape (N, C, H, W)).

        ``y`` is not used to compute certificates; certifiers may use it only for reporting."""
        raise NotImplementedError
