"""CIFAR classifiers with the module names of the published smoothing checkpoints, for 3x32x32 inputs.

- `CifarResNet(depth)`: He et al.'s CIFAR ResNet as Cohen et al. and Salman et al. trained it
  (`cifar_resnet20`, `cifar_resnet110`): a 3x3 stem of 16 channels, three stages of (depth - 2) / 6
  BasicBlocks at 16, 32 and 64 channels (stride 2 entering stages 2 and 3, a 1x1 convolution + BatchNorm
  shortcut where the shape changes), global average pooling and a linear head. Keys: `conv1`, `bn1`,
  `layer{1,2,3}.{i}.{conv1,bn1,conv2,bn2,downsample.{0,1}}`, `fc`.
- `WideResNet(depth, widen)`: Zagoruyko & Komodakis's pre-activation WRN-depth-widen as denoised smoothing
  trained it (`cifar_wrn` = WRN-28-10, `cifar_wrn40` = WRN-40-10): stages of (depth - 4) / 6 blocks at 16k,
  32k and 64k channels, each block BN-ReLU-conv-BN-ReLU-conv; where a block changes the shape its shortcut
  is a 1x1 convolution of the pre-activated input. Keys: `conv1`, `block{1,2,3}.layer.{i}.{bn1,conv1,bn2,
  conv2,convShortcut}`, `bn1`, `fc`.

Neither includes normalisation: `pipeline.models` puts it in front, as the published checkpoints do.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["CifarResNet", "WideResNet"]


def _conv3x3(channels_in: int, channels_out: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(channels_in, channels_out, 3, stride=stride, padding=1, bias=False)


def _init(model: nn.Module) -> None:
    """He initialisation for convolutions (fan out), BatchNorm at the identity, zero linear biases."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Linear):
            nn.init.zeros_(module.bias)


class BasicBlock(nn.Module):
    """relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x)), the shortcut a 1x1 projection when shapes differ."""

    def __init__(self, channels_in: int, channels_out: int, stride: int):
        super().__init__()
        self.conv1 = _conv3x3(channels_in, channels_out, stride)
        self.bn1 = nn.BatchNorm2d(channels_out)
        self.conv2 = _conv3x3(channels_out, channels_out)
        self.bn2 = nn.BatchNorm2d(channels_out)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or channels_in != channels_out:
            self.downsample = nn.Sequential(nn.Conv2d(channels_in, channels_out, 1, stride=stride, bias=False),
                                            nn.BatchNorm2d(channels_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + shortcut)


class CifarResNet(nn.Module):
    """The CIFAR ResNet of depth 6n + 2 (20: n = 3, 110: n = 18)."""

    def __init__(self, depth: int = 110, num_classes: int = 10):
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(f"a CIFAR ResNet has depth 6n + 2 (20, 32, 44, 56, 110, ...), got {depth}")
        blocks = (depth - 2) // 6
        self.conv1 = _conv3x3(3, 16)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._stage(16, 16, blocks, 1)
        self.layer2 = self._stage(16, 32, blocks, 2)
        self.layer3 = self._stage(32, 64, blocks, 2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)
        _init(self)

    @staticmethod
    def _stage(channels_in: int, channels_out: int, blocks: int, stride: int) -> nn.Sequential:
        return nn.Sequential(BasicBlock(channels_in, channels_out, stride),
                             *[BasicBlock(channels_out, channels_out, 1) for _ in range(blocks - 1)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.avgpool(x).flatten(1))


class WideBlock(nn.Module):
    """Pre-activation block; with a shape change the 1x1 shortcut sees the pre-activated input."""

    def __init__(self, channels_in: int, channels_out: int, stride: int, drop_rate: float = 0.0):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(channels_in)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = _conv3x3(channels_in, channels_out, stride)
        self.bn2 = nn.BatchNorm2d(channels_out)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(channels_out, channels_out)
        self.drop_rate = drop_rate
        self.equal = channels_in == channels_out
        self.convShortcut = None if self.equal else nn.Conv2d(channels_in, channels_out, 1, stride=stride,
                                                               bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        activated = self.relu1(self.bn1(x))
        out = self.relu2(self.bn2(self.conv1(activated)))
        if self.drop_rate > 0:
            out = nn.functional.dropout(out, p=self.drop_rate, training=self.training)
        shortcut = x if self.equal else self.convShortcut(activated)
        return shortcut + self.conv2(out)


class WideStage(nn.Module):
    """`layer`: the stage's blocks (the published name of the Sequential)."""

    def __init__(self, channels_in: int, channels_out: int, blocks: int, stride: int, drop_rate: float):
        super().__init__()
        self.layer = nn.Sequential(*[WideBlock(channels_in if i == 0 else channels_out, channels_out,
                                               stride if i == 0 else 1, drop_rate) for i in range(blocks)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class WideResNet(nn.Module):
    """WRN-depth-widen for CIFAR (depth 6n + 4: 28 gives n = 4, 40 gives n = 6)."""

    def __init__(self, depth: int = 28, widen: int = 10, num_classes: int = 10, drop_rate: float = 0.0):
        super().__init__()
        if depth < 10 or (depth - 4) % 6:
            raise ValueError(f"a Wide ResNet has depth 6n + 4 (16, 22, 28, 40, ...), got {depth}")
        blocks = (depth - 4) // 6
        widths = [16, 16 * widen, 32 * widen, 64 * widen]
        self.conv1 = _conv3x3(3, widths[0])
        self.block1 = WideStage(widths[0], widths[1], blocks, 1, drop_rate)
        self.block2 = WideStage(widths[1], widths[2], blocks, 2, drop_rate)
        self.block3 = WideStage(widths[2], widths[3], blocks, 2, drop_rate)
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.relu = nn.ReLU(inplace=True)
        self.fc = nn.Linear(widths[3], num_classes)
        _init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block3(self.block2(self.block1(self.conv1(x))))
        x = self.relu(self.bn1(x))
        return self.fc(x.mean(dim=(2, 3)))
