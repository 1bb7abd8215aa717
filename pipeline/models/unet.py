"""The diffusion UNets of openai/guided-diffusion and openai/improved-diffusion, written here module for module
so that their published state dicts load key for key and shape for shape.

Both families share one network (`UNet`): a sinusoidal timestep embedding (half cos, half sin, frequencies
exp(-ln(10000) i / half)) through Linear(ch, 4 ch), SiLU, Linear(4 ch, 4 ch); input blocks of residual
blocks (with attention at the configured downsampling rates) and a downsampler per level but the last; a
middle block (residual, attention, residual); output blocks that concatenate the matching input block's
activation, with an upsampler per level but the first; GroupNorm, SiLU and a 3x3 convolution to the output.
They differ where the resampling lives:
- guided-diffusion (`resblock_updown`): the resampling is inside a residual block of its own (average
  pooling / nearest upsampling after the first norm and SiLU, parameter-free), so those blocks carry
  residual-block keys;
- improved-diffusion: separate Downsample (3x3 convolution, stride 2: key `op`) and Upsample (nearest x2
  then a 3x3 convolution: key `conv`) layers.

Guarantees the outputs depend on (as both codes compute them): GroupNorm (32 groups, eps 1e-5) in float32,
cast back to its input's dtype; scale-shift norm out = norm(h) (1 + scale) + shift with (scale, shift)
chunked in that order; attention as guided-diffusion's `QKVAttentionLegacy` (improved-diffusion's is the
same computation): qkv split per head into q, k, v, q and k each scaled by ch^-1/4, softmax in float32.
Under autocast (bf16) the convolutions run in bf16 and GroupNorm and softmax still in float32.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["GroupNorm32", "UNet", "UNetConfig", "timestep_embedding"]


@dataclass(frozen=True)
class UNetConfig:
    """A diffusion UNet's configuration. `attention_ds`: the downsampling rates (1, 2, 4, ...) with attention;
    exactly one of `num_heads` (heads per attention layer) and `num_head_channels` (channels per head) is set.
    `resblock_updown` True is guided-diffusion's layout, False improved-diffusion's."""

    model_channels: int
    num_res_blocks: int
    channel_mult: tuple[int, ...]
    attention_ds: tuple[int, ...]
    num_heads: int | None = 4
    num_head_channels: int | None = None
    resblock_updown: bool = True
    use_scale_shift_norm: bool = True
    in_channels: int = 3
    out_channels: int = 6

    def __post_init__(self):
        if (self.num_heads is None) == (self.num_head_channels is None):
            raise ValueError("a UNet's attention takes exactly one of num_heads and num_head_channels")

    def heads(self, channels: int) -> int:
        """The number of heads of an attention layer of `channels` channels."""
        if self.num_head_channels is None:
            return self.num_heads
        if channels % self.num_head_channels:
            raise ValueError(f"{channels} attention channels do not split into heads of {self.num_head_channels}")
        return channels // self.num_head_channels


class GroupNorm32(nn.GroupNorm):
    """GroupNorm(32 groups, eps 1e-5) computed in float32 and cast back to the input's dtype."""

    def __init__(self, channels: int):
        super().__init__(32, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            return super().forward(x.float()).to(x.dtype)


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """[N, dim] sinusoidal embeddings of (possibly fractional) timesteps: cos then sin, zero-padded if dim is odd."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half)
    args = timesteps[:, None].float() * freqs[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


class Downsample(nn.Module):
    """improved-diffusion's downsampler: a 3x3 convolution with stride 2."""

    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    """improved-diffusion's upsampler: nearest x2, then a 3x3 convolution."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class ResBlock(nn.Module):
    """A residual block conditioned on the timestep embedding; `resample` "down" (2x2 average pooling) or "up"
    (nearest x2) applies between the first SiLU and the first convolution, and to the skip path."""

    def __init__(self, channels: int, emb_channels: int, out_channels: int, scale_shift: bool,
                 resample: str | None = None):
        super().__init__()
        self.scale_shift, self.resample = scale_shift, resample
        self.in_layers = nn.Sequential(GroupNorm32(channels), nn.SiLU(),
                                       nn.Conv2d(channels, out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, (2 if scale_shift else 1) * out_channels))
        self.out_layers = nn.Sequential(GroupNorm32(out_channels), nn.SiLU(), nn.Dropout(0.0),
                                        nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip_connection = (nn.Identity() if out_channels == channels
                                else nn.Conv2d(channels, out_channels, 1))

    def _resampled(self, x: torch.Tensor) -> torch.Tensor:
        if self.resample == "down":
            return F.avg_pool2d(x, kernel_size=2, stride=2)
        if self.resample == "up":
            return F.interpolate(x, scale_factor=2, mode="nearest")
        return x

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers[2](self._resampled(self.in_layers[1](self.in_layers[0](x))))
        x = self._resampled(x)
        emb_out = self.emb_layers(emb).to(h.dtype)[:, :, None, None]
        if self.scale_shift:
            scale, shift = emb_out.chunk(2, dim=1)
            h = self.out_layers[0](h) * (1 + scale) + shift
            h = self.out_layers[3](self.out_layers[2](self.out_layers[1](h)))
        else:
            h = self.out_layers(h + emb_out)
        return self.skip_connection(x) + h


class AttentionBlock(nn.Module):
    """Self-attention over the spatial positions, `heads` heads, residual (QKVAttentionLegacy's order)."""

    def __init__(self, channels: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm = GroupNorm32(channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj_out = nn.Conv1d(channels, channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        batch, channels, *spatial = x.shape
        x = x.reshape(batch, channels, -1)
        qkv = self.qkv(self.norm(x))
        length = qkv.shape[-1]
        ch = channels // self.heads
        q, k, v = qkv.reshape(batch * self.heads, 3 * ch, length).split(ch, dim=1)
        scale = 1 / math.sqrt(math.sqrt(ch))
        weight = torch.einsum("bct,bcs->bts", q * scale, k * scale)
        weight = torch.softmax(weight.float(), dim=-1).to(weight.dtype)
        attended = torch.einsum("bts,bcs->bct", weight, v).reshape(batch, channels, length)
        return (x + self.proj_out(attended)).reshape(batch, channels, *spatial)


class Block(nn.Sequential):
    """The layers of one input/output block, each called with the timestep embedding (where it takes one)."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        for layer in self:
            x = layer(x, emb) if isinstance(layer, (ResBlock, AttentionBlock, Downsample, Upsample)) else layer(x)
        return x


class UNet(nn.Module):
    """The diffusion UNet of `config` (guided- or improved-diffusion layout): forward(x, timesteps) -> the
    network output [N, out_channels, H, W] (noise prediction, then the variance channels when learnt)."""

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = config
        ch = config.model_channels
        self.time_embed = nn.Sequential(nn.Linear(ch, 4 * ch), nn.SiLU(), nn.Linear(4 * ch, 4 * ch))
        self.input_blocks = nn.ModuleList([Block(nn.Conv2d(config.in_channels, ch, 3, padding=1))])
        skips = self._build_input(config)
        width = config.model_channels * config.channel_mult[-1]
        self.middle_block = Block(self._res(width, width), AttentionBlock(width, config.heads(width)),
                                  self._res(width, width))
        self.output_blocks = nn.ModuleList()
        self._build_output(config, skips)
        self.out = nn.Sequential(GroupNorm32(ch), nn.SiLU(), nn.Conv2d(ch, config.out_channels, 3, padding=1))

    def _res(self, channels: int, out_channels: int, resample: str | None = None) -> ResBlock:
        return ResBlock(channels, 4 * self.config.model_channels, out_channels, self.config.use_scale_shift_norm,
                        resample)

    def _build_input(self, config: UNetConfig) -> list[int]:
        """Appends the input blocks; the channels of each input block's output, in order."""
        ch, ds, skips = config.model_channels, 1, [config.model_channels]
        for level, mult in enumerate(config.channel_mult):
            for _ in range(config.num_res_blocks):
                layers = [self._res(ch, mult * config.model_channels)]
                ch = mult * config.model_channels
                if ds in config.attention_ds:
                    layers.append(AttentionBlock(ch, config.heads(ch)))
                self.input_blocks.append(Block(*layers))
                skips.append(ch)
            if level != len(config.channel_mult) - 1:
                down = self._res(ch, ch, "down") if config.resblock_updown else Downsample(ch)
                self.input_blocks.append(Block(down))
                skips.append(ch)
                ds *= 2
        return skips

    def _build_output(self, config: UNetConfig, skips: list[int]) -> None:
        ch = config.model_channels * config.channel_mult[-1]
        ds = 2 ** (len(config.channel_mult) - 1)
        for level, mult in reversed(list(enumerate(config.channel_mult))):
            for index in range(config.num_res_blocks + 1):
                layers: list[nn.Module] = [self._res(ch + skips.pop(), mult * config.model_channels)]
                ch = mult * config.model_channels
                if ds in config.attention_ds:
                    layers.append(AttentionBlock(ch, config.heads(ch)))
                if level and index == config.num_res_blocks:
                    layers.append(self._res(ch, ch, "up") if config.resblock_updown else Upsample(ch))
                    ds //= 2
                self.output_blocks.append(Block(*layers))

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        emb = self.time_embed(timestep_embedding(timesteps, self.config.model_channels))
        h, kept = x, []
        for block in self.input_blocks:
            h = block(h, emb)
            kept.append(h)
        h = self.middle_block(h, emb)
        for block in self.output_blocks:
            h = block(torch.cat([h, kept.pop()], dim=1), emb)
        return self.out(h)
