"""The CIFAR-10 ResNets of He et al., "Deep Residual Learning for Image Recognition", CVPR 2016,
section 4.2, with **option A** shortcuts.

Architecture (depth ``6n + 2``): a 3x3 convolution with 16 filters, batch norm and ReLU; three
stages of ``n`` basic blocks (two 3x3 convolutions, each followed by batch norm) with 16, 32 and
64 filters on 32, 16 and 8 px feature maps (the first block of stages 2 and 3 has stride 2);
global average pooling; one linear layer. Option A: every shortcut is the identity; where a
block changes the shape, the shortcut subsamples by 2 in space and pads the extra channels with
zeros (half before the input channels, half after), so shortcuts have no parameters.

The models take **normalized** inputs: put the normalization in front of them. Submodules are
named ``conv1``, ``bn1``, ``layer1..3`` (blocks ``0..n-1`` with ``conv1``, ``bn1``, ``conv2``,
``bn2``) and ``linear``, so the state dicts published with akamaster/pytorch_resnet_cifar10 load
with ``strict=True`` once their ``module.`` prefix is removed.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from bench.errors import BenchError
from bench.models.backbones import BasicBlock

__all__ = ["CifarResNet", "cifar_resnet", "resnet20", "resnet32", "resnet44", "resnet56", "resnet110"]

STAGE_WIDTHS = (16, 32, 64)


class PadShortcut(nn.Module):
    """Option-A shortcut: spatial subsampling by ``stride`` (keeps pixels ``0, stride, 2*stride,
    ...``, the positions a stride-``stride`` 3x3 convolution with padding 1 is centred on) and
    zero channels, ``(out - in) // 2`` before the input channels and the rest after. No parameters."""

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.before = (planes - in_planes) // 2
        self.after = planes - in_planes - self.before

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, self.before, self.after))


def option_a_shortcut(in_planes: int, planes: int, stride: int) -> nn.Module:
    """The identity when the shape is kept, else :class:`PadShortcut` (no parameters)."""
    return PadShortcut(in_planes, planes, stride) if stride != 1 or in_planes != planes else nn.Identity()


class CifarResNet(nn.Module):
    """He et al.'s CIFAR ResNet with ``n`` basic blocks per stage (depth ``6n + 2``), option-A shortcuts.

    Maps normalized images ``(N, 3, H, W)`` to logits ``(N, num_classes)``. Conv and linear weights
    are Kaiming-normal initialised (fan-in, ReLU gain); batch norm starts at weight 1, bias 0.
    """

    def __init__(self, n: int, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        if n < 1 or num_classes < 1:
            raise BenchError(f"CIFAR ResNet needs n >= 1 blocks per stage and num_classes >= 1, got n={n}, "
                             f"num_classes={num_classes}")
        self.conv1 = nn.Conv2d(in_channels, STAGE_WIDTHS[0], 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(STAGE_WIDTHS[0])
        self.layer1 = self._stage(STAGE_WIDTHS[0], STAGE_WIDTHS[0], n, stride=1)
        self.layer2 = self._stage(STAGE_WIDTHS[0], STAGE_WIDTHS[1], n, stride=2)
        self.layer3 = self._stage(STAGE_WIDTHS[1], STAGE_WIDTHS[2], n, stride=2)
        self.linear = nn.Linear(STAGE_WIDTHS[2], num_classes)
        self._init_weights()

    @staticmethod
    def _stage(in_planes: int, planes: int, n: int, stride: int) -> nn.Sequential:
        blocks = [BasicBlock(in_planes, planes, stride, option_a_shortcut)]
        blocks += [BasicBlock(planes, planes, shortcut=option_a_shortcut) for _ in range(n - 1)]
        return nn.Sequential(*blocks)

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(module.weight, nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


def cifar_resnet(depth: int, num_classes: int = 10) -> CifarResNet:
    """He et al.'s CIFAR ResNet of the given depth; raises :class:`BenchError` unless ``depth = 6n + 2``, n >= 1."""
    if depth < 8 or (depth - 2) % 6:
        raise BenchError(f"CIFAR ResNet depth must be 6n+2 with n >= 1 (20, 32, 44, 56, 110, ...), got {depth}")
    return CifarResNet((depth - 2) // 6, num_classes)


def resnet20(num_classes: int = 10) -> nn.Module:
    """ResNet-20 (n = 3, about 0.27 M parameters)."""
    return cifar_resnet(20, num_classes)


def resnet32(num_classes: int = 10) -> nn.Module:
    """ResNet-32 (n = 5, about 0.46 M parameters)."""
    return cifar_resnet(32, num_classes)


def resnet44(num_classes: int = 10) -> nn.Module:
    """ResNet-44 (n = 7, about 0.66 M parameters)."""
    return cifar_resnet(44, num_classes)


def resnet56(num_classes: int = 10) -> nn.Module:
    """ResNet-56 (n = 9, about 0.85 M parameters)."""
    return cifar_resnet(56, num_classes)


def resnet110(num_classes: int = 10) -> nn.Module:
    """ResNet-110 (n = 18, about 1.7 M parameters)."""
    return cifar_resnet(110, num_classes)
