"""The logits of R draws of a (randomized) model, with draws independent across examples.

Scoring a randomized model with R draws per example (protocol ``draws``) needs, for every example,
R forward passes whose randomness is independent of each other *and* of the other examples' draws:
only then is ``correct_draws`` of an example a Binomial(R, p_i) count, independent across examples,
and the standard error of the mean single-draw accuracy the binomial one. A model that draws its
randomness once per forward pass for the whole batch (DCS: one mask per pass,
:func:`bench.capabilities.shares_randomness`) answers a batch of B examples with B predictions of
*one* draw; stacking R passes of the whole batch correlates the examples, and the spread of the
mean is then several times the binomial one (tests/test_draws.py measures both).

* :func:`draw_logits`: R independent draws per example, with the layout the model needs;
* :func:`enumerated_logits`: every draw of a model whose randomness has a small finite space of
  equally likely draws (``draw_space``, e.g. DCS's masks), so expectations over draws are exact;
* :func:`draw_outcomes`: each draw's predictions and, per example, how many draws are correct.
"""

from __future__ import annotations

from collections.abc import Generator
from contextlib import closing
from typing import Any, cast

import torch
from torch import nn

from bench import tasks
from bench.capabilities import capability, shares_randomness, wrapped
from bench.errors import BenchError

__all__ = ["draw_logits", "draw_outcomes", "enumerated_logits"]


def _check_draws(draws: int) -> int:
    if isinstance(draws, bool) or not isinstance(draws, int) or draws < 1:
        raise BenchError(f"draws must be an integer >= 1, got {draws!r}")
    return draws


def draw_logits(model: nn.Module, x: torch.Tensor, draws: int) -> torch.Tensor:
    """The logits of ``draws`` forward passes of ``model`` on ``x``: a tensor (draws, B, C).

    Guarantee: for a randomized model, ``out[r, i]`` and ``out[s, j]`` come from different
    forward passes whenever (r, i) != (s, j), so the draws are independent across draws *and*
    across examples, provided the model draws fresh randomness on every forward pass (not
    inside ``freeze_randomness()``, where every pass uses the one frozen draw by design):

    * a model that shares one draw across the batch (:func:`~bench.capabilities.shares_randomness`)
      is called once per example and draw, on a batch of 1 (``B * draws`` calls);
    * any other model (per-example randomness, or deterministic) is called ``draws`` times on
      the whole batch, as before.

    Runs under ``torch.no_grad()``. The model's mode is not changed: call it in eval mode (a
    BatchNorm in training mode would see batches of 1 in the first layout).
    """
    draws = _check_draws(draws)
    if x.shape[0] == 0:
        raise BenchError("draw_logits needs at least one example")
    with torch.no_grad():
        if not shares_randomness(model):
            return torch.stack([model(x) for _ in range(draws)])
        per_draw = [torch.cat([model(x[i:i + 1]) for i in range(x.shape[0])]) for _ in range(draws)]
        return torch.stack(per_draw)


def _enumerator(model: nn.Module) -> nn.Module:
    """The first module along :func:`~bench.capabilities.wrapped` with an ``enumerate_draws`` method."""
    for module in wrapped(model):
        if callable(getattr(module, "enumerate_draws", None)):
            return module
    raise BenchError(f"{type(model).__name__} declares a draw_space but has no enumerate_draws() method")


def enumerated_logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The logits of every draw of ``model``'s declared draw space on ``x``: a tensor (D, B, C),
    D = ``capability(model, "draw_space")``, each row one draw, all D equally likely.

    So the mean over the first axis of any function of the logits is its exact expectation over
    the model's randomness. Draws are fixed one after the other by ``model.enumerate_draws()``
    (found on the model or a module it wraps; the calls go through ``model``, so wrappers such
    as pass counters see them), which restores the model's previous randomness state at the end,
    also when this function fails. Runs under ``torch.no_grad()``.

    Raises :class:`~bench.errors.BenchError` when the model declares no draw space, or when
    ``enumerate_draws()`` yields a different number of draws than it declares.
    """
    space = capability(model, "draw_space")
    if space is None:
        raise BenchError(f"{type(model).__name__} declares no enumerable draw space (draw_space is None)")
    enumerate_draws = cast(Any, _enumerator(model)).enumerate_draws
    logits: list[torch.Tensor] = []
    with torch.no_grad(), closing(cast(Generator[Any, None, None], enumerate_draws())) as draws:
        for _ in draws:
            logits.append(model(x))
    if len(logits) != int(space):
        raise BenchError(f"{type(model).__name__}.enumerate_draws() gave {len(logits)} draws, "
                         f"but the model declares draw_space={space}")
    return torch.stack(logits)


def draw_outcomes(logits: torch.Tensor, y: torch.Tensor, task: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The predictions of each draw of ``logits`` (draws, B, ...) and, per example, how many of the
    draws are correct (all labels, for multilabel): ``(preds, correct_draws)``."""
    preds = torch.stack([tasks.predict(lg, task) for lg in logits])
    return preds, torch.stack([tasks.correct(p, y, task) for p in preds]).sum(dim=0)
