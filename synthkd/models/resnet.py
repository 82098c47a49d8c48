"""ResNets for small images: CIFAR-style (resnet8..56) and ImageNet-style (resnet18/34).

Both are one class: a 3x3 stem (no max-pool, small inputs keep their resolution), stages of
basic blocks, global pooling and a linear head. Top-level children are named ``stem``,
``layer1..layerN``, ``pool``, ``fc`` so module paths make natural cut points.
"""

from __future__ import annotations

import torch
from torch import nn

from .registry import register_model


def scaled(channels: int, width: float) -> int:
    """Channels after a width multiplier, never below one."""
    return max(1, int(round(channels * width)))


class BasicBlock(nn.Module):
    """Two 3x3 convolutions and a shortcut; ``inner`` scales the channels between the two
    convolutions only, so a thinner block keeps the width of the residual stream."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, inner: float = 1.0):
        super().__init__()
        middle = scaled(out_channels, inner)
        self.conv1 = nn.Conv2d(in_channels, middle, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(middle)
        self.conv2 = nn.Conv2d(middle, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    def __init__(
        self,
        stage_channels: tuple[int, ...],
        blocks_per_stage: tuple[int, ...],
        in_channels: int = 3,
        num_classes: int = 10,
        inner: float = 1.0,
    ):
        super().__init__()
        stem_channels = stage_channels[0]
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, stem_channels, 3, 1, 1, bias=False),
            nn.BatchNorm2d(stem_channels),
            nn.ReLU(inplace=True),
        )
        channels = stem_channels
        for index, (out_channels, blocks) in enumerate(zip(stage_channels, blocks_per_stage)):
            stride = 1 if index == 0 else 2
            layers = []
            for block in range(blocks):
                layers.append(BasicBlock(channels, out_channels, stride if block == 0 else 1, inner))
                channels = out_channels
            self.add_module(f"layer{index + 1}", nn.Sequential(*layers))
        self.num_stages = len(stage_channels)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(channels, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for index in range(self.num_stages):
            x = getattr(self, f"layer{index + 1}")(x)
        return self.fc(self.pool(x))


def _cifar_resnet(depth: int):
    if (depth - 2) % 6:
        raise ValueError(f"CIFAR-style ResNet depth must be 6n+2, got {depth}")
    default_blocks = (depth - 2) // 6

    def factory(
        width: float = 1.0, in_channels: int = 3, num_classes: int = 10, blocks: int | None = None, inner: float = 1.0,
    ) -> ResNet:
        channels = tuple(scaled(c, width) for c in (16, 32, 64))
        return ResNet(channels, (blocks or default_blocks,) * 3, in_channels, num_classes, inner)

    factory.__doc__ = (f"CIFAR-style ResNet-{depth}: 3 stages of {default_blocks} basic blocks (``blocks``: another number "
                       "per stage), 16/32/64 channels x width, ``inner``: the blocks' middle channels x inner.")
    return factory


def _imagenet_resnet(depth: int, stage_blocks: tuple[int, ...]):
    def factory(
        width: float = 1.0, in_channels: int = 3, num_classes: int = 10, blocks: int | None = None, inner: float = 1.0,
    ) -> ResNet:
        channels = tuple(scaled(c, width) for c in (64, 128, 256, 512))
        return ResNet(channels, (blocks,) * len(stage_blocks) if blocks else stage_blocks, in_channels, num_classes, inner)

    factory.__doc__ = (f"ImageNet-style ResNet-{depth} with a 3x3 stem and no max-pool, for small inputs (``blocks``: the "
                       "same number in every stage; ``inner``: the blocks' middle channels x inner).")
    return factory


for _depth in (8, 14, 20, 32, 56):
    register_model(f"resnet{_depth}")(_cifar_resnet(_depth))
register_model("resnet18")(_imagenet_resnet(18, (2, 2, 2, 2)))
register_model("resnet34")(_imagenet_resnet(34, (3, 4, 6, 3)))
