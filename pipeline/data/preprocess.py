"""Decoding and preprocessing on CPU workers: encoded bytes to uint8 [C, H, W] arrays.

`Transform(resize=256, size=224)` is ImageNet's Resize(256) + CenterCrop(224) (torchvision, on the PIL
image, as the papers did). Pixels stay 8-bit, so every value lies on the 1/255 grid after scaling.
A bad image never raises: it comes back as an error message with a zero array in its place.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError
from torchvision.transforms import v2

__all__ = ["ImageError", "Transform", "decode"]


class ImageError(ValueError):
    """An image that cannot be certified; the message says why."""


@dataclass(frozen=True)
class Transform:
    """`resize`: shorter side first (optional); `size`: the square centre crop every image ends at;
    `channels`: what the model expects; `mode`: convert with PIL first (e.g. "RGB", as torchvision's
    ImageFolder does), or None to reject images whose channel count differs."""

    size: int
    resize: int | None = None
    channels: int = 3
    mode: str | None = "RGB"

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.channels, self.size, self.size)


def decode(data: bytes, transform: Transform) -> np.ndarray:
    """uint8 array of `transform.shape`, or ImageError."""
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise ImageError(f"cannot decode image: {error}") from error
    if transform.mode:
        image = image.convert(transform.mode)
    channels = len(image.getbands())
    if channels != transform.channels:
        raise ImageError(f"image has {channels} channel(s) (mode {image.mode}), the model expects "
                         f"{transform.channels}")
    if transform.resize:
        image = v2.functional.resize(image, transform.resize)
    if min(image.size) < transform.size:
        raise ImageError(f"image is {image.size[0]}x{image.size[1]} after resizing, smaller than the "
                         f"{transform.size}x{transform.size} crop")
    image = v2.functional.center_crop(image, transform.size)
    pixels = np.asarray(image, dtype=np.uint8)
    return pixels.reshape(*pixels.shape[:2], -1).transpose(2, 0, 1).copy()
