"""MemNet (Tai et al. 2017), the denoiser of denoised smoothing's `memnet`, with its published module names.

Every unit is BN-ReLU-conv (`bn`, `relu`, `conv`; convolutions without bias). A feature extractor maps the
image to `channels`; `memory_blocks` memory blocks follow, each a chain of `residual_blocks` residual
blocks (x + unit(unit(x))) whose outputs, together with the outputs of the feature extractor and of every
earlier memory block, a 1x1 gate unit fuses back to `channels`; a reconstructor maps to the image and the
input is added back: D(z) = z + reconstructor(...). Keys: `feature_extractor`, `dense_memory.{m}.
recursive_unit.{r}.relu_conv{1,2}`, `dense_memory.{m}.gate_unit`, `reconstructor`.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["MemNet"]


class BNReLUConv(nn.Sequential):
    def __init__(self, channels_in: int, channels_out: int, kernel: int = 3, padding: int = 1):
        super().__init__()
        self.add_module("bn", nn.BatchNorm2d(channels_in))
        self.add_module("relu", nn.ReLU(inplace=True))
        self.add_module("conv", nn.Conv2d(channels_in, channels_out, kernel, padding=padding, bias=False))


class ResidualBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.relu_conv1 = BNReLUConv(channels, channels)
        self.relu_conv2 = BNReLUConv(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.relu_conv2(self.relu_conv1(x))


class MemoryBlock(nn.Module):
    """The `position`-th memory block (from 1): its gate sees residual_blocks + position feature maps."""

    def __init__(self, channels: int, residual_blocks: int, position: int):
        super().__init__()
        self.recursive_unit = nn.ModuleList([ResidualBlock(channels) for _ in range(residual_blocks)])
        self.gate_unit = BNReLUConv((residual_blocks + position) * channels, channels, kernel=1, padding=0)

    def forward(self, x: torch.Tensor, memory: list[torch.Tensor]) -> torch.Tensor:
        short_term = []
        for unit in self.recursive_unit:
            x = unit(x)
            short_term.append(x)
        return self.gate_unit(torch.cat(short_term + memory, dim=1))


class MemNet(nn.Module):
    """MemNet(3, 64, 3, 6) is denoised smoothing's `memnet` / `imagenet_memnet`."""

    def __init__(self, image_channels: int = 3, channels: int = 64, memory_blocks: int = 3,
                 residual_blocks: int = 6):
        super().__init__()
        if min(memory_blocks, residual_blocks) < 1:
            raise ValueError(f"MemNet needs at least one memory block and one residual block, got "
                             f"{memory_blocks} and {residual_blocks}")
        self.feature_extractor = BNReLUConv(image_channels, channels)
        self.reconstructor = BNReLUConv(channels, image_channels)
        self.dense_memory = nn.ModuleList([MemoryBlock(channels, residual_blocks, position + 1)
                                           for position in range(memory_blocks)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.feature_extractor(x)
        memory = [out]
        for block in self.dense_memory:
            out = block(out, memory)
            memory.append(out)
        return x + self.reconstructor(out)
