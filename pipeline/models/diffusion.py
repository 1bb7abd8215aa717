"""Diffusion denoised smoothing's one-shot denoiser (Carlini et al., ICLR 2023): an off-the-shelf diffusion
model as a deterministic denoiser D_sigma, one model for every sigma.

For an input already carrying the smoothing noise, z = x + sigma eps in [0, 1] pixel units (the engine draws
and adds it; nothing here is random), D_sigma(z) is:
  t* = the first t >= 1 with sqrt(1 - abar_t) / sqrt(abar_t) >= 2 sigma (the authors' `certify.py` rule;
       abar_t = prod_{s <= t} (1 - beta_s) over the schedule's 0-based steps, computed in float64);
  x_t = sqrt(abar_t*) (2 z - 1);   e = net(x_t, t_model)[:, :3];
  x0 = clip(sqrt(1 / abar_t*) x_t - sqrt(1 / abar_t* - 1) e, -1, 1);   D_sigma(z) = (x0 + 1) / 2,
with t_model = t* (guided-diffusion) or t* x 1000 / steps (improved-diffusion rescales its timesteps). A
row whose sigma is 0 is returned unchanged. D is a fixed function of z, so Cohen's certificate for the
composed classifier f o D_sigma holds for exactly the engine's noise level sigma.

Schedules: guided-diffusion's linear one (1000 steps, betas linspace(1e-4, 0.02) scaled by 1000 / steps) and
improved-diffusion's cosine one (4000 steps, beta_i = min(1 - abar(i+1) / abar(i), 0.999) with
abar(t) = cos^2((t / T + 0.008) / 1.008 pi / 2)). `read_diffusion` recognises a plain state dict of either
published family by its keys and shapes and infers the configuration from them (see `infer_config`).
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass
from functools import cached_property

import numpy as np
import torch
from torch import nn

from pipeline.models.checkpoints import WRAPPER_PREFIXES, build_to_load, fit_state
from pipeline.models.unet import UNet, UNetConfig

__all__ = ["GUIDED_256", "GUIDED_SCHEDULE", "IMPROVED_CIFAR", "IMPROVED_SCHEDULE", "OneShotDenoiser", "Schedule",
           "infer_config", "read_diffusion"]

# the published models' configurations (spec section 3): guided-diffusion's 256x256_diffusion_uncond.pt and
# improved-diffusion's cifar10_uncond_50M_500K.pt
GUIDED_256 = UNetConfig(model_channels=256, num_res_blocks=2, channel_mult=(1, 1, 2, 2, 4, 4), attention_ds=(8, 16, 32),
                        num_heads=None, num_head_channels=64, resblock_updown=True)
IMPROVED_CIFAR = UNetConfig(model_channels=128, num_res_blocks=3, channel_mult=(1, 2, 2, 2), attention_ds=(2, 4),
                            num_heads=4, resblock_updown=False)
PUBLISHED = {GUIDED_256: "guided-diffusion UNet 256x256 uncond (256x256_diffusion_uncond.pt)",
             IMPROVED_CIFAR: "improved-diffusion UNet CIFAR-10 uncond (cifar10_uncond_50M_500K.pt)"}
HEAD_CHANNELS = 64  # every released guided-diffusion model's num_head_channels
DEFAULT_HEADS = 4  # both codes' default num_heads (improved-diffusion's released models use it)


@dataclass(frozen=True)
class Schedule:
    """A DDPM noise schedule: `kind` "linear" or "cosine", `steps` of them, and the factor the diffusion
    multiplies t by before the network (1000 / steps when it rescales timesteps, else 1)."""

    kind: str
    steps: int
    timestep_rescale: float = 1.0

    @cached_property
    def alphas_cumprod(self) -> np.ndarray:
        """abar_t for t = 0 .. steps - 1 (float64)."""
        if self.kind == "linear":
            scale = 1000 / self.steps
            betas = np.linspace(scale * 0.0001, scale * 0.02, self.steps, dtype=np.float64)
        elif self.kind == "cosine":
            def abar(t: float) -> float:
                return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
            betas = np.array([min(1 - abar((i + 1) / self.steps) / abar(i / self.steps), 0.999)
                              for i in range(self.steps)], dtype=np.float64)
        else:
            raise ValueError(f"unknown noise schedule {self.kind!r} (known: linear, cosine)")
        return np.cumprod(1.0 - betas)

    def t_star(self, sigma: float) -> tuple[int, float]:
        """(t*, abar_t*): the first t >= 1 with sqrt(1 - abar_t) / sqrt(abar_t) >= 2 sigma; ValueError when sigma
        is not positive (D_0 is the identity: no timestep) or the schedule's noise never reaches 2 sigma."""
        if not sigma > 0:
            raise ValueError(f"a timestep needs a noise level sigma > 0, got {sigma}")
        abar = self.alphas_cumprod
        ratio = np.sqrt(1.0 - abar) / np.sqrt(abar)
        reached = np.flatnonzero(ratio[1:] >= 2 * sigma)
        if not reached.size:
            raise ValueError(f"sigma {sigma} is beyond the {self.kind} schedule's largest noise level "
                             f"({ratio[-1] / 2:.4g} in pixel units)")
        t = int(reached[0]) + 1
        return t, float(abar[t])


GUIDED_SCHEDULE = Schedule("linear", 1000)
IMPROVED_SCHEDULE = Schedule("cosine", 4000, 1000 / 4000)


class OneShotDenoiser(nn.Module):
    """D_sigma of the module docstring around a diffusion UNet: forward(noisy [N, 3, H, W] in [0, 1], sigma [N])
    -> the denoised images in [0, 1], each row at the t* of its own sigma (rows with sigma 0 unchanged)."""

    noise_conditioned = True  # forward takes each row's noise level

    def __init__(self, net: UNet, schedule: Schedule, family: str):
        super().__init__()
        self.net, self.schedule, self.family = net, schedule, family
        self._steps: dict[float, tuple[int, float]] = {}

    def timestep(self, sigma: float) -> tuple[int, float]:
        """(t*, abar_t*) for `sigma` (pixel units) on this model's schedule."""
        sigma = float(sigma)
        if sigma not in self._steps:
            self._steps[sigma] = self.schedule.t_star(sigma)
        return self._steps[sigma]

    def net_output(self, x_t: torch.Tensor, t_model: torch.Tensor) -> torch.Tensor:
        """The network's raw output [N, out_channels, H, W] (the noise prediction, then the variance channels) at
        (x_t in [-1, 1] units, t_model [N]: the timestep as the network takes it, already rescaled)."""
        return self.net(x_t, t_model)

    def forward(self, noisy: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """D_sigma(noisy) row by row: `noisy` [N, 3, H, W] = x + sigma eps in [0, 1] units, `sigma` [N] (or one
        level for all rows). A fixed function of its inputs: no randomness; rows at sigma 0 come back as given."""
        sigma = torch.as_tensor(sigma).detach().to("cpu", torch.float64).reshape(-1).expand(noisy.shape[0])
        levels = sigma.tolist()
        invalid = [level for level in levels if not level >= 0]
        if invalid:
            raise ValueError(f"noise levels must be >= 0, got {invalid[0]}")
        rows = [index for index, level in enumerate(levels) if level > 0]
        if not rows:
            return noisy
        steps = [self.timestep(levels[index]) for index in rows]
        t = torch.tensor([step for step, _ in steps], dtype=torch.float64)
        abar = torch.tensor([value for _, value in steps], dtype=torch.float64)
        device = noisy.device

        def per_row(values: torch.Tensor) -> torch.Tensor:
            return values.to(device=device, dtype=torch.float32)[:, None, None, None]

        selected = torch.tensor(rows, device=device)
        x_t = per_row(abar.sqrt()) * (2 * noisy.index_select(0, selected).float() - 1)
        eps = self.net_output(x_t, (t * self.schedule.timestep_rescale).to(device=device, dtype=torch.float32))
        x0 = per_row((1 / abar).sqrt()) * x_t - per_row((1 / abar - 1).sqrt()) * eps[:, :3].float()
        denoised = ((x0.clamp(-1, 1) + 1) / 2).to(noisy.dtype)
        if len(rows) == noisy.shape[0]:
            return denoised
        return noisy.index_copy(0, selected, denoised)

    def describe(self) -> dict:
        """What this denoiser is: its architecture, configuration and schedule (for the rows' records)."""
        config = self.net.config
        return {"architecture": PUBLISHED.get(config, f"{self.family} UNet"), **asdict(config),
                "learn_sigma": config.out_channels == 2 * config.in_channels,
                "parameters": sum(parameter.numel() for parameter in self.net.parameters()),
                "schedule": self.schedule.kind, "steps": self.schedule.steps,
                "timestep_rescale": self.schedule.timestep_rescale}


def _unprefixed(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
    """The state without its wrapper prefix, when it has a diffusion UNet's landmark keys; else None."""
    landmarks = ("time_embed.0.weight", "input_blocks.0.0.weight", "middle_block.0.in_layers.2.weight",
                 "out.2.weight")
    for prefix in sorted(WRAPPER_PREFIXES, key=len, reverse=True):
        if all(prefix + key in state for key in landmarks):
            return {key[len(prefix):]: value for key, value in state.items() if key.startswith(prefix)}
    return None


def _count(keys: set[str], part: str) -> int:
    indices = {int(match.group(1)) for key in keys if (match := re.match(rf"{part}\.(\d+)\.", key))}
    return max(indices, default=-1) + 1


def _res_blocks(keys: set[str], outputs: int) -> int:
    """num_res_blocks: the first output block that upsamples (a `conv` layer, or a second residual block) is
    the last of the deepest level's num_res_blocks + 1."""
    for index in range(outputs):
        if any(re.match(rf"output_blocks\.{index}\.[1-9]\d*\.(conv|in_layers)\.", key) for key in keys):
            return index
    return outputs - 1  # a single level: no upsampler


def infer_config(state: dict[str, torch.Tensor], num_heads: int | None = None,
                 num_head_channels: int | None = None) -> tuple[UNetConfig, str] | None:
    """(the configuration, the family "guided-diffusion" / "improved-diffusion") of a diffusion UNet's state
    dict from its keys and shapes; None when the keys are not a diffusion UNet's. ValueError when they are
    but do not form one of the two layouts.

    Read from the keys: model_channels (the first convolution), in/out channels, num_res_blocks (where the
    output blocks upsample), the levels and channel_mult (each level's first residual block), attention
    (which levels have a `qkv`), scale-shift norm (the embedding projection's width) and the family (guided:
    resampling residual blocks; improved: `op`/`conv` resampling layers). The keys do not record the number
    of heads: given ones win; else improved-diffusion's 4 heads, and guided-diffusion's 64-channel heads
    (every released guided model) when its narrowest attention layer holds 4 of them, else 4 heads."""
    state = _unprefixed(state)
    if state is None:
        return None
    keys = set(state)
    channels, in_channels = state["input_blocks.0.0.weight"].shape[:2]
    inputs, outputs = _count(keys, "input_blocks"), _count(keys, "output_blocks")
    res_blocks = _res_blocks(keys, outputs)
    levels = outputs // (res_blocks + 1)
    if res_blocks < 1 or levels * (res_blocks + 1) != outputs or inputs != 1 + levels * res_blocks + levels - 1:
        raise ValueError(f"a diffusion UNet's keys with {inputs} input and {outputs} output blocks, which no "
                         "level structure of the guided- or improved-diffusion UNet gives")
    firsts = [1 + level * (res_blocks + 1) for level in range(levels)]
    widths = [state[f"input_blocks.{index}.0.in_layers.2.weight"].shape[0] for index in firsts]
    if any(width % channels for width in widths):
        raise ValueError(f"level widths {widths} are not multiples of model_channels {channels}")
    attention = tuple(2 ** level for level, index in enumerate(firsts) if f"input_blocks.{index}.1.qkv.weight" in keys)
    updown = f"input_blocks.{res_blocks + 1}.0.in_layers.0.weight" in keys if levels > 1 else None
    if updown is None:
        raise ValueError("a single-level diffusion UNet: its keys cannot tell guided- from improved-diffusion")
    heads = _heads(updown, [width for level, width in enumerate(widths) if 2 ** level in attention] + widths[-1:],
                   num_heads, num_head_channels)
    config = UNetConfig(model_channels=channels, num_res_blocks=res_blocks, channel_mult=tuple(
        width // channels for width in widths), attention_ds=attention, resblock_updown=updown,
        use_scale_shift_norm=state["input_blocks.1.0.emb_layers.1.weight"].shape[0] == 2 * widths[0],
        in_channels=in_channels, out_channels=state["out.2.weight"].shape[0], **heads)
    return config, "guided-diffusion" if updown else "improved-diffusion"


def _heads(guided: bool, widths: list[int], num_heads: int | None, num_head_channels: int | None) -> dict:
    """num_heads / num_head_channels: the given one, else the family's (see `infer_config`)."""
    if num_heads is not None or num_head_channels is not None:
        return {"num_heads": num_heads, "num_head_channels": num_head_channels}
    if guided and min(widths) >= DEFAULT_HEADS * HEAD_CHANNELS:
        return {"num_heads": None, "num_head_channels": HEAD_CHANNELS}
    return {"num_heads": DEFAULT_HEADS, "num_head_channels": None}


def read_diffusion(state: dict[str, torch.Tensor], *, num_heads: int | None = None,
                   num_head_channels: int | None = None) -> OneShotDenoiser | None:
    """The one-shot denoiser of a plain state dict of a guided- or improved-diffusion UNet (wrapper prefixes
    allowed), configuration inferred from its keys and shapes, every key and shape checked; the family's
    schedule (guided: linear, 1000 steps; improved: cosine, 4000 steps, timesteps rescaled by 1000 / 4000).
    None when the keys are not a diffusion UNet's; ValueError when they are but do not fit one. In eval mode."""
    inferred = infer_config(state, num_heads, num_head_channels)
    if inferred is None:
        return None
    config, family = inferred
    net = build_to_load(lambda: UNet(config))
    fit_state(net, state, "the diffusion state dict", f"the {family} UNet inferred from it ({config})")
    schedule = GUIDED_SCHEDULE if family == "guided-diffusion" else IMPROVED_SCHEDULE
    return OneShotDenoiser(net, schedule, family).eval()
