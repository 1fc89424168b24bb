"""Evaluation-time state of a model that bench sets and restores around its work."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

__all__ = ["frozen_parameters"]


@contextmanager
def frozen_parameters(model: nn.Module) -> Iterator[nn.Module]:
    """Within this context no parameter of ``model`` records gradients; on exit each one's
    ``requires_grad`` is restored as it was (a user's model is left as it came).

    Evaluation needs gradients with respect to inputs only (attacks, audits). With the weights
    frozen, autograd builds no graph through them, an optimizer over inputs accumulates nothing
    into them, and layers that derive their weight (HyCAS's AOL rescaling) may reuse the derived
    value between passes (:class:`bench.models.lipschitz_layers._AOLLayer`).
    """
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        yield model
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
