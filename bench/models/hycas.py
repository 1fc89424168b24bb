"""The HyCAS network (Dhar et al. 2026): <= 2-Lipschitz in L2 for every weight and every draw.

The layers and the proof of the bound are in :mod:`bench.models.lipschitz_layers` and
:mod:`bench.defenses.hycas` (the table of per-layer constants); this module assembles them.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from torch import nn

from bench.errors import BenchError
from bench.models.defended import DefendedModel
from bench.models.lipschitz_layers import (
    AOLConv2d,
    AOLLinear,
    GroupSort,
    NoisyAttentionGate,
    RandomProjectionConv2d,
    frozen_randomness,
    lipschitz_product,
)

__all__ = ["ARCHS", "GUARANTEE", "HyCASModel", "build_hycas_net"]

# name -> (stem width, widest layer, convolutions per downsampling stage)
ARCHS: dict[str, tuple[int, int, int]] = {
    "hycas-small": (16, 64, 1),  # digits, HAM10000 / NIH at 64 px on a CPU
    "hycas-wide": (64, 256, 2),  # paper-scale training on a GPU (CIFAR, 128 px medical images)
}

GUARANTEE = ("by construction, for every weight and every draw of the internal randomness: AOL-rescaled "
             "convolutions and AOL head (Prach & Lampert 2022, ||W D|| <= 1), GroupSort, pixel-unshuffle, "
             "orthonormal (QR) random 1x1 projections concatenated with an AOL conv and scaled by 1/sqrt(2), "
             "one residual noisy gate x + s*h(x) with s in [0,1] independent of x (<= 2), mean subtraction "
             "only (no std division); chain rule: 2 (docs/defenses/hycas.md)")


def _random_channels(width: int, fraction: float) -> int:
    count = int(round(width * fraction))
    if not 0 < count < width:
        raise BenchError(f"hycas: random_fraction {fraction:g} gives {count} random channels of {width}; "
                         "it must leave at least one random and one learned channel")
    return count


def build_hycas_net(arch: str, in_channels: int, num_classes: int, image_size: int, *, gate_noise: float = 0.6,
                    random_fraction: float = 0.5) -> nn.Sequential:
    """The HyCAS feature extractor and head as one ``nn.Sequential`` of bounded layers.

    stem AOL conv -> GroupSort -> random-projection conv -> GroupSort -> noisy attention gate,
    then (pixel-unshuffle, AOL conv, GroupSort)* until the side is 4 px (or odd), then flatten and
    an AOL linear head. Its ``lipschitz`` attribute is the chain-rule product of the per-layer
    constants (2.0).
    """
    width, widest, depth = ARCHS[arch]
    layers: list[nn.Module] = [
        AOLConv2d(in_channels, width, 3), GroupSort(),
        RandomProjectionConv2d(width, width, _random_channels(width, random_fraction), kernel_size=3,
                               random_kernel=1), GroupSort(),
        NoisyAttentionGate(width, noise=gate_noise),
    ]
    channels, size = width, int(image_size)
    while size > 4 and size % 2 == 0:
        size //= 2
        nxt = min(2 * channels, widest)
        layers += [nn.PixelUnshuffle(2), AOLConv2d(4 * channels, nxt, 3), GroupSort()]
        for _ in range(depth - 1):
            layers += [AOLConv2d(nxt, nxt, 3), GroupSort()]
        channels = nxt
    layers += [nn.Flatten(), AOLLinear(channels * size * size, num_classes)]
    net = nn.Sequential(*layers)
    # a float attribute: nn.Module's __setattr__ is typed for tensors and modules only
    net.lipschitz = lipschitz_product(layers)  # type: ignore[assignment]
    return net


class HyCASModel(DefendedModel):
    """A HyCAS network behind mean subtraction: images in [0, 1] -> logits, <= 2-Lipschitz per draw.

    Normalisation subtracts the dataset mean only: dividing by the std would multiply the
    bound by 1 / min(std) (e.g. 2.7 on digits), so the std stays 1 and the first AOL layer
    absorbs the scale. Declarations: ``randomized`` (fresh random filters and gate noise at
    every pass), ``randomness_per_example`` (independent draws per example, so a batch of
    noisy copies of one image gives independent samples), ``lipschitz_bound = 2.0`` with its
    guarantee, ``sigma`` (the training noise, for the smoothing certificate).
    """

    randomized = True
    randomness_per_example = True
    lipschitz_bound = 2.0
    lipschitz_guarantee = GUARANTEE
    logit_clip = 1.0  # the lipschitz certifier's clip range B for argmax E[clip(logits, -B, B)]

    def __init__(self, net: nn.Module, mean: Sequence[float], input_shape: Sequence[int], num_classes: int,
                 task: str = "multiclass", sigma: float = 0.5, margin: float = 0.0) -> None:
        super().__init__(net, mean, [1.0] * len(mean), input_shape, num_classes, task)
        proven = float(getattr(net, "lipschitz", math.inf))
        if proven > self.lipschitz_bound:
            raise ValueError(f"HyCAS network's chain-rule bound {proven} exceeds {self.lipschitz_bound}")
        self.sigma = float(sigma)
        self.margin = float(margin)  # training only: target radius of the margin hinge

    @contextmanager
    def freeze_randomness(self) -> Iterator[None]:
        """One draw of every random projection and gate noise, per input shape, until exit."""
        with frozen_randomness(self):
            yield
