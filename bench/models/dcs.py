"""Deformable convolution with stochasticity (DCS; Ma, Huang, Dong, You & Xu, ICML 2025).

:class:`MaskedConv2d` is a k x k convolution (no bias, padding k // 2) whose learned weight is
multiplied by a binary k x k mask with exactly ``taps`` ones. The mask is shared by every output
and input channel and by the whole batch, so one draw of the mask is one "inference path" of the
network.

When the mask changes:

* by default, a **fresh mask at every forward pass** (independent, uniform over the
  C(k*k, taps) subsets). This is the sound randomized model the harness evaluates: an attacker
  that queries it twice sees two independent draws.
* :meth:`MaskedConv2d.resample` draws the mask that the *next* forward pass uses (once);
  ``exclude_previous=True`` draws the ``taps`` positions from the k*k - taps positions the
  previous mask did not use (the official "non-repeated" variant, used by GSAT training).
* inside :meth:`DCSModel.freeze_randomness` every masked conv keeps the mask drawn on entry for
  every forward pass; :meth:`DCSModel.resample_masks` changes it. That is the official code's
  behaviour (the mask changes only on an explicit ``set_rand_mask()``).

Masks are drawn with torch's global (CPU) random generator and copied to the weight's device, so
the harness's seeding makes training and evaluation reproducible. The current mask is a registered buffer
(``<conv>.mask``, shape (k, k)) so that a state dict round-trips; it is random state, not a
learned parameter.

The networks: :func:`dcs_resnet18` (CIFAR ResNet-18, ``layer1[0]`` made a random block),
:func:`dcs_wide_resnet` (WRN-34-10, random blocks in ``block1``) and :class:`SmallDCSNet`
(a small CNN for CPU presets), all wrapped in :class:`DCSModel`.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import cast

import torch
from torch import nn
from torch.nn import functional as F

from bench.errors import BenchError
from bench.models.backbones import strided_stem
from bench.models.defended import DefendedModel

__all__ = ["MAX_ENUMERATED_DRAWS", "DCSModel", "MaskedConv2d", "SmallDCSNet", "WRN_LAYOUTS", "dcs_resnet18",
           "dcs_wide_resnet", "masked_convs", "validate_mask_shape"]

# Where WRN-34-10 has its random blocks (all in block1, the 160-channel stage):
# "official": block1.layer.0 (16 -> 160), then 4 normal blocks: WideResNet6 in the official
#   model/widepos_resnet.py at HEAD (NetworkBlock4 gets the random class as its *first* block type
#   and builds nb_layers - 4 = 1 of it, then 4 BasicBlocks). Official WRN checkpoints need this.
# "four-random": block1.layer.0 normal, block1.layer.1-4 random (160 -> 160), as the bench
#   reference notes describe WideResNet6.
WRN_LAYOUTS = {"official": (0,), "four-random": (1, 2, 3, 4)}

# DCSModel.enumerate_draws() refuses a larger draw space (and draw_space is None above it)
MAX_ENUMERATED_DRAWS = 100_000


def validate_mask_shape(kernel_size: int, taps: int) -> None:
    """k odd and >= 1 (padding k // 2 keeps the spatial size); 1 <= taps and taps <= k*k - taps
    (a non-repeated draw needs ``taps`` positions the previous mask did not use)."""
    if isinstance(kernel_size, bool) or not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be an odd integer >= 1, got {kernel_size!r}")
    if isinstance(taps, bool) or not isinstance(taps, int) or taps < 1 or 2 * taps > kernel_size * kernel_size:
        raise ValueError(f"taps must be an integer with 1 <= taps <= kernel_size**2 / 2 (non-repeated draws need "
                         f"taps unused positions), got {taps!r} for kernel_size {kernel_size}")


class MaskedConv2d(nn.Conv2d):
    """A k x k convolution whose weight is multiplied by a random mask with ``taps`` ones.

    Args:
        in_channels, out_channels, stride: as for :class:`torch.nn.Conv2d`.
        kernel_size: k (default 5); padding is k // 2.
        taps: n, the number of ones in the mask (default 2).

    The output equals ``conv2d(x, weight * mask)``; it is computed as a sum over the n shifted
    copies of the input that the mask selects (one contraction), which costs n / k**2 of the
    dense k x k convolution's multiply-adds. Masks are drawn on the CPU (torch's global
    generator) and copied to the weight's device.
    """

    mask: torch.Tensor  # buffer (k, k) of 0/1, replaced (not updated in place) by resample()

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 5, taps: int = 2,
                 stride: int = 1) -> None:
        validate_mask_shape(kernel_size, taps)
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=kernel_size // 2, bias=False)
        self.taps = int(taps)
        self.frozen = False  # inside freeze_randomness: every forward pass uses self.mask
        self._pending = False  # resample() was called: the next forward pass uses self.mask once
        self._positions: list[tuple[int, int]] = []
        self._positions_of: tuple[int, int] | None = None  # (id, version) of the mask they were read from
        self.register_buffer("mask", torch.zeros(kernel_size, kernel_size))
        self.resample()  # a valid mask from the start (the official initial mask is all ones)
        self._pending = False

    @property
    def size(self) -> int:
        return int(self.kernel_size[0])

    def resample(self, exclude_previous: bool = False) -> torch.Tensor:
        """Draw a new mask; the next forward pass uses it (every one, when frozen).

        ``exclude_previous`` draws the ``taps`` positions among those the current mask does
        not use (the official "non-repeated" variant). Returns the new mask.
        """
        k = self.size
        scores = torch.rand(k * k, device="cpu")  # a uniform n-subset: the top n of i.i.d. uniforms
        if exclude_previous:
            scores = scores.masked_fill(self.mask.detach().flatten().cpu() > 0, -1.0)
        self._install(int(i) for i in scores.topk(self.taps).indices)
        self._pending = not self.frozen
        return self.mask

    def _install(self, indices: Iterable[int]) -> None:
        """Make the mask with ones at the flat positions ``indices`` (row-major in k x k) current."""
        k = self.size
        chosen = sorted(indices)
        mask = torch.zeros(k * k, device="cpu")
        mask[chosen] = 1.0
        # a new tensor, not an in-place update: autograd graphs of earlier passes keep their mask
        self.mask = mask.view(k, k).to(device=self.mask.device, dtype=self.mask.dtype)
        self._positions = [(i // k, i % k) for i in chosen]
        self._positions_of = (id(self.mask), self.mask._version)

    @property
    def mask_count(self) -> int:
        """C(k*k, taps): the number of masks, each drawn with probability 1 / mask_count by a
        plain forward pass (``resample()`` without ``exclude_previous``)."""
        return math.comb(self.size * self.size, self.taps)

    def all_masks(self) -> Iterator[tuple[int, ...]]:
        """Every mask as its sorted flat positions (row-major), in lexicographic order."""
        return itertools.combinations(range(self.size * self.size), self.taps)

    def positions(self) -> list[tuple[int, int]]:
        """The (row, column) positions of the current mask's ones."""
        if self._positions_of != (id(self.mask), self.mask._version):  # e.g. loaded from a state dict
            self._positions = [(int(i), int(j)) for i, j in torch.nonzero(self.mask.detach().cpu()).tolist()]
            self._positions_of = (id(self.mask), self.mask._version)
        return self._positions

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.frozen and not self._pending:
            self.resample()
        self._pending = False
        positions = self.positions()
        if not positions:
            return F.conv2d(x, self.weight * self.mask.to(self.weight.dtype), None, self.stride, self.padding)
        k, s, p = self.size, int(self.stride[0]), int(self.padding[0])
        h_out = (x.shape[-2] + 2 * p - k) // s + 1
        w_out = (x.shape[-1] + 2 * p - k) // s + 1
        padded = F.pad(x, (p, p, p, p))
        shifted = torch.stack([padded[:, :, i:i + s * (h_out - 1) + 1:s, j:j + s * (w_out - 1) + 1:s]
                               for i, j in positions], dim=1)  # (B, n, C_in, H_out, W_out)
        mask = self.mask.to(self.weight.dtype)
        weight = torch.stack([self.weight[:, :, i, j] * mask[i, j] for i, j in positions])  # (n, C_out, C_in)
        return torch.einsum("bnchw,noc->bohw", shifted, weight)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", taps={self.taps}"


def masked_convs(module: nn.Module) -> list[MaskedConv2d]:
    return [m for m in module.modules() if isinstance(m, MaskedConv2d)]


class DCSModel(DefendedModel):
    """A :class:`DefendedModel` whose network contains :class:`MaskedConv2d` layers.

    ``randomized = True``: each forward pass draws new masks. ``randomness_per_example = False``:
    one mask serves the whole batch, so a batch of B images is B predictions of the same path.
    """

    randomized = True
    randomness_per_example = False

    def masked_convs(self) -> list[MaskedConv2d]:
        return masked_convs(self)

    @contextmanager
    def freeze_randomness(self) -> Iterator[None]:
        """Every masked conv draws a mask on entry and keeps it for every forward pass inside
        (nested contexts keep the outer draw); :meth:`resample_masks` changes it, as
        ``set_rand_mask()`` does in the official code."""
        convs = self.masked_convs()
        before = [m.frozen for m in convs]
        for m in convs:
            if not m.frozen:
                m.frozen = True
                m.resample()
        try:
            yield
        finally:
            for m, was in zip(convs, before):
                m.frozen = was
                m._pending = False

    def resample_masks(self, exclude_previous: bool = False) -> list[torch.Tensor]:
        """Draw new masks (independently per layer) for the next forward pass, or, inside
        :meth:`freeze_randomness`, for every following one."""
        return [m.resample(exclude_previous) for m in self.masked_convs()]

    def _mask_space(self) -> int:
        return math.prod(m.mask_count for m in self.masked_convs())

    @property  # Capabilities declares a plain attribute; here it is derived from the masked convs
    def draw_space(self) -> int | None:  # type: ignore[override]
        """The number of equally likely draws of a plain forward pass: the product over the masked
        convs of C(k*k, taps), when at most :data:`MAX_ENUMERATED_DRAWS`, else None.

        A plain forward pass (not frozen, no pending :meth:`resample_masks`) draws every conv's
        mask uniformly among its C(k*k, taps) subsets, independently of the other convs and of
        earlier passes (``resample()`` without ``exclude_previous``), so every combination of
        masks has probability 1 / product. The non-repeated draw (``exclude_previous=True``) is
        used only by GSAT training's explicit :meth:`resample_masks` call, never by a plain pass.
        """
        space = self._mask_space()
        return space if space <= MAX_ENUMERATED_DRAWS else None

    def enumerate_draws(self) -> Iterator[tuple[tuple[int, ...], ...]]:
        """Fix every combination of masks in turn (frozen, as inside :meth:`freeze_randomness`)
        and yield it, as one tuple of sorted flat mask positions per masked conv (in
        :meth:`masked_convs` order); ``itertools.product`` order, :attr:`draw_space` items.

        Every forward pass between two yields uses the yielded masks. When the generator ends,
        is closed early or the caller's code raises into it, every conv gets back the mask,
        frozen flag and pending state it had before. Draws no random numbers. Raises
        :class:`~bench.errors.BenchError` (before fixing anything) when there are more than
        :data:`MAX_ENUMERATED_DRAWS` combinations.
        """
        space = self._mask_space()
        if space > MAX_ENUMERATED_DRAWS:
            raise BenchError(f"DCS draw space has {space:,} mask combinations; enumeration is limited to "
                             f"{MAX_ENUMERATED_DRAWS:,}")
        convs = self.masked_convs()
        state = ("mask", "frozen", "_pending", "_positions", "_positions_of")
        saved = [{name: getattr(m, name) for name in state} for m in convs]
        try:
            for combination in itertools.product(*(m.all_masks() for m in convs)):
                for m, indices in zip(convs, combination):
                    m._install(indices)
                    m.frozen = True
                    m._pending = False
                yield combination
        finally:
            for m, before in zip(convs, saved):
                for name, value in before.items():
                    setattr(m, name, value)


# -- networks --------------------------------------------------------------------------------
def dcs_resnet18(in_channels: int, num_classes: int, masked_conv: int = 2, kernel_size: int = 5,
                 taps: int = 2) -> nn.Module:
    """CIFAR ResNet-18 with ``layer1[0]`` a random block.

    ``masked_conv=2`` masks ``layer1[0].conv1``, the network's 2nd conv counting the stem (the
    official ``ResNet18_1layer`` default); ``masked_conv=3`` masks ``layer1[0].conv2``, the 3rd
    conv (the paper's text for CIFAR). The masked conv is k x k (64 -> 64, stride 1).
    """
    from bench.models.backbones import BasicBlock, ResNet

    net = ResNet((2, 2, 2, 2), in_channels, num_classes)
    block = cast(BasicBlock, net.layer1[0])  # layer1 is an nn.Sequential of BasicBlocks
    if masked_conv == 2:
        block.conv1 = MaskedConv2d(block.conv1.in_channels, block.conv1.out_channels, kernel_size, taps)
    elif masked_conv == 3:
        block.conv2 = MaskedConv2d(block.conv2.in_channels, block.conv2.out_channels, kernel_size, taps)
    else:
        raise ValueError(f"masked_conv must be 2 or 3, got {masked_conv!r}")
    return net


def dcs_wide_resnet(in_channels: int, num_classes: int, masked_conv: int = 2, kernel_size: int = 5,
                    taps: int = 2, layout: str = "official", depth: int = 34, widen_factor: int = 10) -> nn.Module:
    """WRN-depth-widen with random blocks in ``block1`` (see :data:`WRN_LAYOUTS`); each has its own mask.

    ``masked_conv=2`` masks the random blocks' ``conv1`` (the official choice), ``3`` their ``conv2``.
    """
    from bench.models.wide_resnet import WideResNet

    if layout not in WRN_LAYOUTS:
        raise ValueError(f"unknown WRN layout {layout!r}; known: {', '.join(WRN_LAYOUTS)}")
    if masked_conv not in (2, 3):
        raise ValueError(f"masked_conv must be 2 or 3, got {masked_conv!r}")
    random_blocks = WRN_LAYOUTS[layout]
    which = "conv1" if masked_conv == 2 else "conv2"

    def conv(stage: int, index: int, name: str, cin: int, cout: int, stride: int) -> nn.Module | None:
        if stage == 1 and index in random_blocks and name == which:
            return MaskedConv2d(cin, cout, kernel_size, taps, stride=stride)
        return None

    return WideResNet(depth, widen_factor, in_channels, num_classes, conv_factory=conv)


class SmallDCSNet(nn.Module):
    """A small CNN for CPU presets, sized from the image size, with one masked conv.

    The layout of :class:`bench.models.backbones.SmallCNN` (a stride-2 stem for images above
    16 px, down to at most 8 px; four 3x3 convolutions of width ``width`` and ``2 * width`` in
    two max-pooled stages; global pooling to 2x2; a two-layer head) with conv -> BatchNorm -> ReLU
    as in the ResNets DCS is defined on, and conv number ``masked_conv`` (2 or 3, counted after
    the stem) a k x k :class:`MaskedConv2d` (the 2nd: ``width -> width``; the 3rd:
    ``width -> 2 * width``). Without batch normalization after the masked conv, the random taps
    stall the first epochs of training (measured on digits).
    """

    def __init__(self, in_channels: int, num_classes: int, image_size: int, masked_conv: int = 2,
                 kernel_size: int = 5, taps: int = 2, width: int = 32, hidden: int = 128) -> None:
        super().__init__()
        if masked_conv not in (2, 3):
            raise ValueError(f"masked_conv must be 2 or 3, got {masked_conv!r}")
        self.stem, channels = strided_stem(in_channels, width, image_size)
        plan: Sequence[tuple[int, int]] = ((channels, width), (width, width), (width, 2 * width),
                                           (2 * width, 2 * width))
        layers: list[nn.Module] = []
        for number, (cin, cout) in enumerate(plan, start=1):
            conv: nn.Module = (MaskedConv2d(cin, cout, kernel_size, taps) if number == masked_conv
                               else nn.Conv2d(cin, cout, 3, padding=1, bias=False))
            layers += [conv, nn.BatchNorm2d(cout), nn.ReLU()]
            if number in (2, 4):
                layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(2))
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(2 * width * 4, hidden), nn.ReLU(),
                                        nn.Linear(hidden, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(self.stem(x)))
