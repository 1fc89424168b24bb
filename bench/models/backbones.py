"""Backbones sized by the dataset spec: a small CNN for tiny images, a CIFAR ResNet-18 otherwise."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torch.nn import functional as F

from bench.models.names import ARCH_NAMES, resolve_arch


def strided_stem(in_channels: int, width: int, image_size: int) -> tuple[nn.Sequential, int]:
    """Stride-2 3x3 conv + ReLU layers (``width // 2`` channels) that bring images larger than
    16 px down to at most 8 px; empty for smaller images. Returns the stem and its output channels."""
    stem: list[nn.Module] = []
    size, channels = image_size, in_channels
    while image_size > 16 and size > 8:
        stem += [nn.Conv2d(channels, width // 2, 3, stride=2, padding=1), nn.ReLU()]
        size, channels = (size + 1) // 2, width // 2
    return nn.Sequential(*stem), channels


class SmallCNN(nn.Module):
    """Four 3x3 conv layers in two stages, then two linear layers.

    Images larger than 16 px first pass through a narrow stem of stride-2 3x3 conv layers that
    brings the feature map down to at most 8 px, which keeps the cost per image small enough for
    CPU training (about 3 M multiply-adds at 64 px).

    ``cnn-tiny`` is this network at width 16 (0.4 M multiply-adds at 8 px against 1.5 M at width
    32), stored and computed channels-last (``channels_last``: same values, faster CPU kernels
    for these small feature maps); it is what digits' attacks (AutoAttack's 10^4 forward passes
    per robust example) can afford on two cores.
    """

    def __init__(self, in_channels: int, num_classes: int, width: int = 32, hidden: int = 128,
                 image_size: int = 16, channels_last: bool = False) -> None:
        super().__init__()
        self.channels_last = channels_last
        self.stem, channels = strided_stem(in_channels, width, image_size)
        self.features = nn.Sequential(
            nn.Conv2d(channels, width, 3, padding=1), nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.AdaptiveAvgPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(2 * width * 4, hidden), nn.ReLU(), nn.Linear(hidden, num_classes)
        )

        if channels_last:
            self.to(memory_format=torch.channels_last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.classifier(self.features(self.stem(x)))


def projection_shortcut(in_planes: int, planes: int, stride: int) -> nn.Module:
    """The identity (an empty ``nn.Sequential``) when the shape is kept, else a strided 1x1 conv and BN."""
    if stride == 1 and in_planes == planes:
        return nn.Sequential()
    return nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes))


class BasicBlock(nn.Module):
    """Two 3x3 conv + BN layers with a ReLU between them, plus ``shortcut(in_planes, planes,
    stride)`` (default :func:`projection_shortcut`), then ReLU."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1,
                 shortcut: Callable[[int, int, int], nn.Module] = projection_shortcut) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = shortcut(in_planes, planes, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """The CIFAR variant of ResNet (3x3 stem, no max-pool), global average pooling."""

    def __init__(self, blocks: tuple[int, ...], in_channels: int, num_classes: int, width: int = 64) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        layers = []
        in_planes = width
        for i, n in enumerate(blocks):
            planes = width * 2**i
            stride = 1 if i == 0 else 2
            stage = []
            for j in range(n):
                stage.append(BasicBlock(in_planes, planes, stride if j == 0 else 1))
                in_planes = planes
            layers.append(nn.Sequential(*stage))
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.linear = nn.Linear(in_planes, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


Builder = Callable[[int, int, int], nn.Module]  # (in_channels, num_classes, image_size)

ARCHS: dict[str, Builder] = {
    "cnn-tiny": lambda c, k, s: SmallCNN(c, k, width=16, image_size=s, channels_last=True),
    "cnn-small": lambda c, k, s: SmallCNN(c, k, image_size=s),
    "resnet18": lambda c, k, s: ResNet((2, 2, 2, 2), c, k),
}
assert set(ARCHS) == set(ARCH_NAMES)


def build_backbone(arch: str, in_channels: int, num_classes: int, image_size: int) -> nn.Module:
    return ARCHS[resolve_arch(arch, image_size)](in_channels, num_classes, image_size)
