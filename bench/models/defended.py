"""The model every defense hands to the harness."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from bench.capabilities import Capabilities
from bench.models.normalize import Normalize


class DefendedModel(nn.Module, Capabilities):
    """Maps images in [0, 1], shape (N, C, H, W), to logits.

    Declarations: every capability of :class:`bench.capabilities.Capabilities` (``randomized``,
    ``randomness_per_example``, ``smoothed_evaluation``, ``sigma``, ``adds_smoothing_noise``,
    ``lipschitz_bound``, ``lipschitz_guarantee``, ``logit_clip``, ``task``, ``num_classes``),
    declared there once with its default and meaning; a subclass overrides one with a class or
    instance attribute. Read them with :func:`bench.capabilities.capability`,
    which also sees through wrappers. Methods the harness calls:

    * :meth:`freeze_randomness`: one fixed draw within a context (randomized models override it).
    * :meth:`bpda_surrogates`: differentiable stand-ins for non-differentiable components.
    """

    task: str  # set by __init__: multiclass | binary | multilabel
    num_classes: int  # set by __init__ (the number of labels for multilabel)
    input_shape: tuple[int, ...]  # set by __init__: (C, H, W) of the inputs it takes

    def __init__(self, net: nn.Module, mean: Sequence[float], std: Sequence[float],
                 input_shape: Sequence[int], num_classes: int, task: str = "multiclass") -> None:
        super().__init__()
        self.task = task
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
