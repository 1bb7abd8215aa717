"""DE-CROP sample generation as a Ray Data job: the subset's images batched across an actor pool.

Each actor loads the (gradient) classifier once and generates boundary and interpolated samples for its
batches; the driver gathers them in subset order. Samples depend only on the image, its id and the
settings, so the result equals in-process generation.
"""

from __future__ import annotations

import numpy as np
import ray
import torch

from pipeline.denoise.generate import GenerationSettings, generate
from pipeline.models import ModelSpec, load_model
from pipeline.storage import Storage

__all__ = ["SampleGenerator", "generate_with_ray"]


class SampleGenerator:
    """Ray Data actor: boundary and interpolated samples for a batch of (index, id, pixels, label)."""

    def __init__(self, model: ModelSpec, storage: Storage, settings: GenerationSettings):
        self.model = load_model(model, storage).eval()
        self.settings = settings

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        images = torch.from_numpy(np.asarray(batch["pixels"], dtype=np.float32))
        labels = torch.from_numpy(np.asarray(batch["label"], dtype=np.int64))
        boundary, interpolated = generate(self.model, images, labels, [str(i) for i in batch["image_id"]],
                                          self.settings)
        return {"index": batch["index"], "boundary": boundary.numpy(), "interpolated": interpolated.numpy()}


def generate_with_ray(model_spec: ModelSpec, storage: Storage, actors: int = 1, batch_size: int = 64):
    """A `generate_fn` for `generate_cached` that runs the generation as a Ray Data job."""

    def run(model, images: torch.Tensor, labels: torch.Tensor, image_ids: list[str], settings: GenerationSettings):
        items = [{"index": i, "image_id": image_id, "pixels": images[i].cpu().numpy(), "label": int(labels[i])}
                 for i, image_id in enumerate(image_ids)]
        rows = (ray.data.from_items(items)
                .map_batches(SampleGenerator, batch_size=batch_size, batch_format="numpy",
                             compute=ray.data.ActorPoolStrategy(size=actors),
                             fn_constructor_kwargs={"model": model_spec, "storage": storage,
                                                    "settings": settings})
                .take_all())
        rows.sort(key=lambda row: row["index"])
        return (torch.from_numpy(np.stack([row["boundary"] for row in rows])).to(images.device),
                torch.from_numpy(np.stack([row["interpolated"] for row in rows])).to(images.device))

    return run
