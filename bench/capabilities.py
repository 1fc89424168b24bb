"""What a model declares about itself, and the one reader of those declarations.

:class:`Capabilities` declares every capability once, with its default and its meaning.
:class:`bench.models.defended.DefendedModel` inherits from it, so every defended model carries
every declaration; a model overrides one with a class or instance attribute of the same name.
Any other ``nn.Module`` may declare some of them the same way (tests do), or none.

:func:`capability` is the one reader, used everywhere in ``bench`` for these names. It sees
through wrappers, so it gives the same answer for a model and for the model inside the attacks'
pass counter, EOT's expectation model, ``torch.compile`` or ``DataParallel``: see :func:`wrapped`.
A name that is not in :data:`CAPABILITIES` raises ``KeyError`` (a typo must not read a default).

This module sits in the core (below ``training``), so the training loop can read a model's task,
and imports no torch at import time, so import-light modules (defenses) may import it.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn

__all__ = ["CAPABILITIES", "WRAPPER_ATTRIBUTES", "Capabilities", "capability", "shares_randomness", "wrapped"]


class Capabilities:
    """Every declaration a model can make, with its default (class attributes).

    * ``randomized`` (False): the forward pass draws fresh randomness on every call, in eval mode
      too. Such a model must override ``freeze_randomness``. Read by the scoring policy (R draws),
      EOT, the model checks, the Lipschitz certifier and audit, and ``torch.compile`` (never for
      a randomized model).
    * ``randomness_per_example`` (False): a randomized model draws independently for every example
      of a batch (K copies of an input in one batch are K independent draws); otherwise one draw
      is shared by the whole pass, and batched sampling puts each input once per pass
      (:func:`shares_randomness`; read by smoothing's sampler and EOT).
    * ``smoothed_evaluation`` (False): the defended classifier is the smoothed
      g(x) = argmax_c P[f(x + e) = c] of this base classifier f at ``sigma``, so a run predicts
      with PREDICT (abstain = wrong). Read by the scoring policy.
    * ``sigma`` (None): the Gaussian noise level (pixel space) of the smoothed classifier; the
      ``smoothing`` certifier, SmoothAdv and PREDICT use it unless given another.
    * ``adds_smoothing_noise`` (False): the forward pass draws the smoothing noise (at ``sigma``)
      itself (DDS), so samplers add none and a different ``--sigma`` is refused.
    * ``lipschitz_bound`` (None) and ``lipschitz_guarantee`` (None): a *guaranteed* L2 Lipschitz
      bound of the logit map and how it is guaranteed. Read by the ``lipschitz`` certifier and
      the certificate audit.
    * ``logit_clip`` (None): the clip range B of the ``lipschitz`` certifier's
      argmax E[clip(logits, -B, B)] for a randomized model (10.0 when neither the model nor
      ``--certify-param clip`` gives one).
    * ``task`` ("multiclass"): ``multiclass``/``binary`` (argmax of C logits) or ``multilabel``
      (one logit per label, positive when > 0); see :mod:`bench.tasks`. Read by attacks,
      certifiers, training and scoring.
    * ``num_classes`` (None): the number of logits (labels, for multilabel). Read by the
      smoothing sampler, AutoAttack, training's class weights and scoring.
    * ``draw_space`` (None): for a randomized model whose randomness takes finitely many equally
      likely values, few enough to enumerate, their number D; the model then also has a method
      ``enumerate_draws()``, a generator that fixes each of the D draws in turn (yielding once
      per draw) and restores the previous randomness state when it ends or is closed. None
      otherwise. Read by :func:`bench.harness.draws.enumerated_logits` (exact expectations over
      draws).
    """

    randomized: bool = False
    randomness_per_example: bool = False
    smoothed_evaluation: bool = False
    sigma: float | None = None
    adds_smoothing_noise: bool = False
    lipschitz_bound: float | None = None
    lipschitz_guarantee: str | None = None
    logit_clip: float | None = None
    task: str = "multiclass"
    num_classes: int | None = None
    draw_space: int | None = None


CAPABILITIES: tuple[str, ...] = tuple(Capabilities.__annotations__)

# Attributes under which a wrapper keeps the module it wraps: torch.compile's OptimizedModule,
# bench's wrappers (the attacks' PassCounter, EOT's ExpectationModel) and (Distributed)DataParallel.
WRAPPER_ATTRIBUTES: tuple[str, ...] = ("_orig_mod", "model", "module")


def wrapped(model: nn.Module) -> Iterator[nn.Module]:
    """``model``, then the module it wraps, and so on: each step follows the first of
    :data:`WRAPPER_ATTRIBUTES` that holds an ``nn.Module``. Ends at a module that wraps nothing
    (or would revisit one)."""
    from torch import nn

    seen: set[int] = set()
    current: nn.Module | None = model
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = next((inner for attr in WRAPPER_ATTRIBUTES
                        if isinstance(inner := getattr(current, attr, None), nn.Module)), None)


def capability(model: nn.Module, name: str) -> Any:
    """The declaration ``name`` of ``model``: from the first module along :func:`wrapped` that
    declares it (a :class:`Capabilities` declares every name; any other module only the
    attributes it has), else the default of :class:`Capabilities`.

    A wrapper that declares a name itself overrides the model it wraps. Raises ``KeyError`` for
    a name not in :data:`CAPABILITIES`.
    """
    if name not in CAPABILITIES:
        raise KeyError(f"unknown model capability {name!r}; known: {', '.join(CAPABILITIES)}")
    for module in wrapped(model):
        if isinstance(module, Capabilities) or hasattr(module, name):
            return getattr(module, name)
    return getattr(Capabilities, name)


def shares_randomness(model: nn.Module) -> bool:
    """A randomized model whose draw is shared by a whole forward batch (e.g. one random mask per
    pass): copies of an input in one batch are *not* independent draws of it."""
    return bool(capability(model, "randomized")) and not bool(capability(model, "randomness_per_example"))
