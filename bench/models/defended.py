"""The model every defense hands to the harness."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from bench.models.normalize import Normalize


def declared(model: nn.Module, name: str, default: object = None) -> object:
    """A declaration (see :class:`DefendedModel`) of ``model`` or of the model it wraps: wrappers
    such as the attacks' pass counter and EOT's expectation keep the wrapped one in ``.model``."""
    while not hasattr(model, name) and isinstance(getattr(model, "model", None), nn.Module):
        model = model.model
    return getattr(model, name, default)


def shares_randomness(model: nn.Module) -> bool:
    """A randomized model whose draw is shared by a whole forward batch (e.g. one random mask per
    pass): copies of an input in one batch are *not* independent draws of it."""
    return bool(declared(model, "randomized", False)) and not bool(declared(model, "randomness_per_example", False))


class DefendedModel(nn.Module):
    """Maps images in [0, 1], shape (N, C, H, W), to logits.

    Declarations the harness and certifiers read (class or instance attributes):

    * ``randomized``: the forward pass draws fresh randomness on every call, in eval mode too.
      Such a model must override :meth:`freeze_randomness`.
    * ``randomness_per_example``: a randomized model draws independently for every example of a
      batch (so K copies of an input in one batch are K independent draws); otherwise one draw is
      shared by the whole pass, and batched sampling must put each input once per pass.
    * ``sigma``: the Gaussian noise level (pixel space) a smoothing certificate should use.
    * ``smoothed_evaluation``: the defended classifier is the smoothed g(x) = argmax_c P[f(x + e) = c]
      of this base classifier f at ``sigma``, so a run predicts with PREDICT (abstain = wrong).
    * ``lipschitz_bound`` and ``lipschitz_guarantee``: a *guaranteed* L2 Lipschitz bound of the
      logit map and how it is guaranteed; ``None`` when there is none.
    * :meth:`bpda_surrogates`: differentiable stand-ins for non-differentiable components.
    * ``task``: ``multiclass``/``binary`` (argmax of C logits) or ``multilabel`` (one logit per
      label, positive when > 0); see :mod:`bench.tasks`.
    """

    randomized: bool = False
    sigma: float | None = None
    smoothed_evaluation: bool = False
    lipschitz_bound: float | None = None
    lipschitz_guarantee: str | None = None

    def __init__(self, net: nn.Module, mean: Sequence[float], std: Sequence[float],
                 input_shape: Sequence[int], num_classes: int, task: str = "multiclass") -> None:
        super().__init__()
        self.task = task  # multiclass | binary | multilabel (num_classes = number of labels)
        self.normalize = Normalize(mean, std)
        self.net = net
        self.input_shape = tuple(int(s) for s in input_shape)
        self.num_classes = int(num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.normalize(x))

    @contextmanager
    def freeze_randomness(self) -> Iterator[None]:
        """Within this context, every forward pass uses one fixed draw of the randomness.

        Deterministic models have nothing to freeze; randomized models override this.
        """
        yield

    def bpda_surrogates(self) -> dict[str, nn.Module]:
        """Components to replace in the backward pass, by module name (none by default)."""
        return {}
