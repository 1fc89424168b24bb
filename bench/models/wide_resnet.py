"""The CIFAR Wide ResNet (Zagoruyko & Komodakis, 2016), pre-activation blocks, WRN-34-10 by default.

Module names follow the layout most released robustness checkpoints use (``conv1``,
``block{1,2,3}.layer.{i}.{bn1,conv1,bn2,conv2,convShortcut}``, ``bn1``, ``fc``), so their state
dicts load without renaming. ``conv_factory`` lets a defense swap individual block convolutions
(DCS replaces some with masked convolutions).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["ConvFactory", "NetworkBlock", "WideBasicBlock", "WideResNet"]

# (stage 1-3, block index in the stage, "conv1" | "conv2", in channels, out channels, stride)
#   -> a module to use instead of the 3x3 convolution, or None for the default one
ConvFactory = Callable[[int, int, str, int, int, int], "nn.Module | None"]


def _conv3x3(cin: int, cout: int, stride: int) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


class WideBasicBlock(nn.Module):
    """BN-ReLU-conv-BN-ReLU-conv with an identity shortcut, or a 1x1 conv shortcut on the
    activated input when the shape changes."""

    def __init__(self, in_planes: int, out_planes: int, stride: int, drop_rate: float = 0.0,
                 conv1: nn.Module | None = None, conv2: nn.Module | None = None) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = conv1 if conv1 is not None else _conv3x3(in_planes, out_planes, stride)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.conv2 = conv2 if conv2 is not None else _conv3x3(out_planes, out_planes, 1)
        self.drop_rate = drop_rate
        self.equal_in_out = in_planes == out_planes and stride == 1
        self.convShortcut = (None if self.equal_in_out  # noqa: N815 - the name released checkpoints use
                             else nn.Conv2d(in_planes, out_planes, 1, stride=stride, padding=0, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        activated = F.relu(self.bn1(x))
        out = F.relu(self.bn2(self.conv1(activated)))
        if self.drop_rate > 0:
            out = F.dropout(out, p=self.drop_rate, training=self.training)
        out = self.conv2(out)
        shortcut = x if self.convShortcut is None else self.convShortcut(activated)
        return shortcut + out


class NetworkBlock(nn.Module):
    def __init__(self, blocks: list[nn.Module]) -> None:
        super().__init__()
        self.layer = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class WideResNet(nn.Module):
    """WRN-``depth``-``widen_factor`` for small images: 3x3 stem (16 channels), three stages of
    (depth - 4) / 6 blocks with 16k, 32k, 64k channels (strides 1, 2, 2), BN-ReLU, global average
    pooling, linear head."""

    def __init__(self, depth: int = 34, widen_factor: int = 10, in_channels: int = 3, num_classes: int = 10,
                 drop_rate: float = 0.0, conv_factory: ConvFactory | None = None) -> None:
        super().__init__()
        if (depth - 4) % 6 != 0:
            raise ValueError(f"WRN depth must be 6n + 4, got {depth}")
        n = (depth - 4) // 6
        channels = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = _conv3x3(in_channels, channels[0], 1)
        stages = []
        for stage, stride in zip((1, 2, 3), (1, 2, 2)):
            blocks: list[nn.Module] = []
            for i in range(n):
                cin = channels[stage - 1] if i == 0 else channels[stage]
                cout, s = channels[stage], stride if i == 0 else 1
                convs = {}
                if conv_factory is not None:
                    convs = {"conv1": conv_factory(stage, i, "conv1", cin, cout, s),
                             "conv2": conv_factory(stage, i, "conv2", cout, cout, 1)}
                blocks.append(WideBasicBlock(cin, cout, s, drop_rate, **convs))
            stages.append(NetworkBlock(blocks))
        self.block1, self.block2, self.block3 = stages
        self.bn1 = nn.BatchNorm2d(channels[3])
        self.fc = nn.Linear(channels[3], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block3(self.block2(self.block1(self.conv1(x))))
        out = F.relu(self.bn1(out))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.fc(out)
