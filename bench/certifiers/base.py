"""The certifier contract.

A certifier turns a model and a batch of examples into one :class:`Certificate` per example: a
prediction (or an abstention) and a certified L2 radius within which that prediction provably
does not change, with the guarantee its class docstring states. The harness stores every
certificate (``example_results``: prediction, abstained, radius, samples_used, count_a, bound,
seconds) and computes certified accuracy per radius from them.

Subclasses set ``info`` and ``parameters`` (:class:`~bench.params.Param` specs) and implement
:meth:`Certifier.prepare` (resolve what the certificate needs from the model, e.g. sigma or the
Lipschitz bound, and refuse models that cannot be certified) and :meth:`Certifier.certify`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from bench.capabilities import capability
from bench.errors import BenchError
from bench.params import Param, Parameterized

__all__ = ["ALPHA", "Certificate", "Certifier", "CertifierInfo"]

ALPHA = Param(0.001, float, gt=0, lt=1)  # the failure probability of a statistical certificate


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


class Certifier(Parameterized):
    """Base class of certifier registry entries.

    Each parameter is declared once in ``parameters`` (default and rule, a
    :class:`~bench.params.Param`); ``defaults`` is derived from it. The constructor checks and
    coerces every value into ``self.params``, then calls :meth:`validate` for rules that relate
    several parameters.
    """

    kind: ClassVar[str] = "certifier"
    info: ClassVar[CertifierInfo] = CertifierInfo()

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        self.validate()

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in sorted(self.params.items()))
        return f"{type(self).__name__}({args})"

    def validate(self) -> None:
        """Raise :class:`BenchError` for parameters that break a rule relating several of them (each
        value alone is already checked by its spec); called by the constructor, before any work."""

    def require_single_label(self, model: nn.Module) -> None:
        """The certificates are about argmax predictions: multilabel models cannot be certified."""
        if capability(model, "task") == "multilabel":
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

    def certify_each(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor | None = None, *,
                     keys: Sequence[int] | None = None, planned: int | None = None
                     ) -> Iterator[tuple[int, Certificate]]:
        """``(position in x, certificate)`` of each example as soon as it is decided, in any order.

        ``keys`` name the examples (a run passes their dataset indices) and ``planned`` is how many
        examples the caller's batch held before any were done: a certifier that streams
        (``prepare`` returns ``"streamed": True``) makes each certificate depend only on its key and
        the seed of torch's generator at the call, so a resumed batch gives the same certificates.
        The default certifies the batch with :meth:`certify` and yields them in order."""
        yield from enumerate(self.certify(model, x, y))
