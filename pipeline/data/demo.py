"""The embedded demo set: scikit-learn's handwritten digits as small RGB images.

1,797 digits of 8x8 pixels with 17 grey levels ship inside scikit-learn. Each becomes a 3x32x32 uint8
image: upsampled bilinearly, its strokes in a bright colour on a dark background, both drawn per image
from a fixed seed. Every image has a stable id, `digits/NNNN`, its index in scikit-learn's order.
Every 6th digit (300 images) is the test split; the rest train the demo model.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

SIZE = 32
NUM_CLASSES = 10
SPLITS = ("train", "test", "all")

__all__ = ["NUM_CLASSES", "SIZE", "load_demo"]


def load_demo(split: str = "test") -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """(images uint8 [N, 3, 32, 32], labels int64 [N], ids) of one split."""
    from sklearn.datasets import load_digits

    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    digits = load_digits()
    strokes = torch.as_tensor(digits.images, dtype=torch.float32)[:, None] / 16.0
    strokes = F.interpolate(strokes, size=(SIZE, SIZE), mode="bilinear", align_corners=False).clamp(0, 1)
    rng = np.random.default_rng(0)
    foreground = torch.as_tensor(rng.uniform(0.55, 1.0, size=(len(strokes), 3, 1, 1)), dtype=torch.float32)
    background = torch.as_tensor(rng.uniform(0.0, 0.3, size=(len(strokes), 3, 1, 1)), dtype=torch.float32)
    images = (background + strokes * (foreground - background)).mul(255).round().to(torch.uint8)
    labels = torch.as_tensor(digits.target, dtype=torch.int64)
    index = np.arange(len(images))
    keep = {"all": index, "test": index[index % 6 == 0], "train": index[index % 6 != 0]}[split]
    return images[keep], labels[keep], [f"digits/{i:04d}" for i in keep]
