"""Adaptive-attack wrappers: ``eot`` (expectation over transformation) and ``bpda`` (backward-pass
differentiable approximation). Both wrap any gradient attack of the registry and compose:
``eot`` with ``attack="bpda"`` and ``params={"attack": "pgd"}`` averages BPDA gradients over draws.

**EOT** (Athalye et al., 2018). A randomized model f(x; omega) is attacked through its expected
prediction: the wrapped attack sees the model

    x -> log( (1/K) sum_k softmax(f(x; omega_k)) )     (multilabel: logit of the mean sigmoid)

with K fresh draws of the randomness at every call. Its cross-entropy is -log E_k[p_k(y)], the
loss of the randomized classifier's expected prediction (the objective SmoothAdv uses), whose
gradient is a weighted average of the per-draw gradients. The K draws are batched (the batch
repeated K times in one forward pass); ``chunk`` bounds how many copies run at once when memory
is short. A model whose draw is shared by a whole forward batch (DCS: one mask per pass) gets one
draw per pass instead, since K copies in one pass would all see the same mask. For smoothing
defenses the input noise is part of the model's forward pass, so it is redrawn too.

**BPDA** (Athalye et al., 2018). A model declares, in ``bpda_surrogates()``, the submodules that
are non-differentiable or mask gradients, with a differentiable stand-in (identity by default).
While the wrapped attack runs, each such submodule computes its true output in the forward pass
but back-propagates through its surrogate: out = g(x) + (f(x) - g(x)).detach().
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from bench.attacks.base import Attack, AttackInfo
from bench.capabilities import capability, shares_randomness, wrapped
from bench.config import Norm, ThreatModel
from bench.errors import BenchError
from bench.params import Param
from bench.registry import ATTACKS, register_attack

__all__ = ["BPDA", "EOT", "ExpectationModel", "straight_through"]

INNER = Param("pgd", str)  # the wrapped attack's registry name
INNER_PARAMS = Param(None, dict)  # its parameters, checked by the wrapped attack's own specs


def _inner(name: str, params: dict[str, Any] | None) -> Attack:
    """The wrapped attack, built (so its own specs check ``params``)."""
    return ATTACKS.get(name)(**(params or {}))


class ExpectationModel(nn.Module):
    """The expected prediction of a randomized model over ``draws`` fresh draws per call.

    It declares nothing itself: :func:`bench.capabilities.capability` reads the wrapped model's
    declarations (``task``, ``num_classes``, ...) through ``.model``."""

    def __init__(self, model: nn.Module, draws: int, chunk: int | None = None) -> None:
        super().__init__()
        self.model = model
        self.draws = draws
        self.chunk = chunk or draws
        self.multilabel = capability(model, "task") == "multilabel"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = len(x)
        outs = []
        for start in range(0, self.draws, self.chunk):
            k = min(self.chunk, self.draws - start)
            logits = self.model(x.repeat(k, *([1] * (x.ndim - 1))))  # k draws of the batch in one pass
            outs.append(logits.view(k, n, -1))
        logits = torch.cat(outs)
        if self.multilabel:
            p = torch.sigmoid(logits).mean(dim=0).clamp(1e-12, 1 - 1e-12)
            return torch.log(p) - torch.log1p(-p)
        return torch.logsumexp(torch.log_softmax(logits, dim=-1), dim=0) - torch.log(torch.tensor(float(self.draws)))


@register_attack("eot")
class EOT(Attack):
    """Expectation over transformation around any gradient attack (see the module docstring).

    Parameters: ``attack`` (inner attack, default ``pgd``), ``params`` (its parameters, a
    mapping), ``draws`` (K, default 20), ``chunk`` (draws per forward pass; default all K, but 1 for a model
    whose draw is shared by a whole batch, so that the K draws are independent). A deterministic
    model is attacked with K = 1: its expectation is its prediction.
    """

    info = AttackInfo(norms=(Norm.LINF, Norm.L2), stochastic=True, source="bench")
    parameters = {"attack": INNER, "params": INNER_PARAMS, "draws": Param(20, int, ge=1),
                  "chunk": Param(None, int, ge=1)}

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        self.inner = _inner(self.params["attack"], self.params["params"])
        if not self.inner.info.needs_grad:
            raise BenchError(f"eot wraps gradient attacks; '{self.params['attack']}' needs no gradients")

    def run(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, threat: ThreatModel) -> torch.Tensor:
        chunk = int(self.params["chunk"]) if self.params["chunk"] is not None else None
        draws = int(self.params["draws"])
        if not capability(model, "randomized"):
            draws = 1  # the expectation of a deterministic model is its prediction: K copies add nothing
        elif shares_randomness(model):
            chunk = 1  # one draw per pass is shared by the batch: K copies in one pass would be one draw
        expected = ExpectationModel(model, draws, chunk).eval()
        return self.inner.run(expected, x, y, threat)


def straight_through(forward: nn.Module, surrogate: nn.Module) -> nn.Module:
    """A module whose value is ``forward(x)`` and whose gradient is ``surrogate``'s."""

    class _StraightThrough(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.forward_module, self.surrogate = forward, surrogate

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            approx = self.surrogate(x)
            return approx + (self.forward_module(x) - approx).detach()

    return _StraightThrough()


@contextmanager
def bpda_applied(model: nn.Module) -> Iterator[int]:
    """Within the context, every declared component back-propagates through its surrogate.

    Yields the number of replaced components (0 when the model declares none).
    """
    # the first module through the wrappers (PassCounter, ExpectationModel, ...) that declares them
    target = next((m for m in wrapped(model) if hasattr(m, "bpda_surrogates")), model)
    declared = getattr(target, "bpda_surrogates", None)
    surrogates = declared() if callable(declared) else {}
    replaced: list[tuple[nn.Module, str, nn.Module]] = []
    try:
        for name, surrogate in surrogates.items():
            parent_name, _, child = name.rpartition(".")
            parent = target.get_submodule(parent_name) if parent_name else target
            original = getattr(parent, child)
            setattr(parent, child, straight_through(original, surrogate))
            replaced.append((parent, child, original))
        yield len(replaced)
    finally:
        for parent, child, original in reversed(replaced):
            setattr(parent, child, original)


@register_attack("bpda")
class BPDA(Attack):
    """Backward-pass differentiable approximation around any gradient attack (module docstring).

    Parameters: ``attack`` (inner attack, default ``pgd``), ``params`` (its parameters).
    A model that declares no surrogate is attacked unchanged (the run records that in the
    attack's parameters only; BPDA then equals the inner attack).
    """

    info = AttackInfo(norms=(Norm.LINF, Norm.L2), stochastic=True, source="bench")
    parameters = {"attack": INNER, "params": INNER_PARAMS}

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        self.inner = _inner(self.params["attack"], self.params["params"])

    def run(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, threat: ThreatModel) -> torch.Tensor:
        with bpda_applied(model):
            return self.inner.run(model, x, y, threat)
