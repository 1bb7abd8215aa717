"""DE-CROP's extra views of each training image: a boundary sample and an interpolated sample.

- Boundary sample x_b: untargeted L-inf PGD on the frozen classifier against the true label
  (eps 8/255, step 2/255, 20 steps, uniform random start), maximising the cross-entropy.
- Interpolated sample x_int: an image optimised (Adam, lr 1e-3, betas (0.5, 0.999), up to 50 steps,
  stopping when the loss changes by less than the tolerance) so that its logits approach
  t = mix f(x) + (1 - mix) f(x_b), mix = 0.8, starting at x. `interp_mode="paper"` does that;
  `"reference"` reproduces the released code, whose loop stops after one Adam step (so x_int is x moved
  by about lr per pixel).

Generation is batched and deterministic for a seed. Results are cached under a key that hashes the
classifier's weights and every generation setting (`cache_key`).
"""

from __future__ import annotations

import hashlib
import io
import json

import torch
import torch.nn.functional as F

from pipeline.denoise.config import GenerationSettings
from pipeline.models.denoisers import classifier_digest
from pipeline.storage import Location

__all__ = ["GenerationSettings", "boundary_samples", "cache_key", "generate", "generate_cached",
           "interpolated_samples", "random_starts"]


def random_starts(shape, image_ids: list[str], seed: int) -> torch.Tensor:
    """Uniform [-1, 1) start offsets, one generator per image seeded by (seed, image id), so a sample does
    not depend on which batch it was generated in."""
    starts = []
    for image_id in image_ids:
        key = hashlib.blake2b(f"{seed}\x1f{image_id}\x1fpgd".encode(), digest_size=8).digest()
        generator = torch.Generator().manual_seed(int.from_bytes(key, "little"))
        starts.append(torch.rand(tuple(shape), generator=generator) * 2 - 1)
    return torch.stack(starts)


def boundary_samples(model, images: torch.Tensor, labels: torch.Tensor, settings: GenerationSettings,
                     starts: torch.Tensor | None = None) -> torch.Tensor:
    """L-inf PGD: every step ascends the cross-entropy by step * sign(gradient) and projects back onto the
    eps-ball around the image and onto [0, 1]. `starts` (in [-1, 1], per image) scale by eps for the random
    start."""
    adversarial = images.clone()
    if settings.random_start:
        if starts is None:
            starts = torch.rand(images.shape) * 2 - 1
        adversarial = (adversarial + settings.eps * starts.to(images.device)).clamp(0, 1)
    for _ in range(settings.steps):
        adversarial.requires_grad_(True)
        loss = F.cross_entropy(model(adversarial), labels)
        (gradient,) = torch.autograd.grad(loss, adversarial)
        with torch.no_grad():
            moved = adversarial + settings.step * gradient.sign()
            adversarial = (images + (moved - images).clamp(-settings.eps, settings.eps)).clamp(0, 1)
    return adversarial.detach()


def interpolated_samples(model, images: torch.Tensor, boundary: torch.Tensor,
                         settings: GenerationSettings) -> torch.Tensor:
    """Images whose logits approach mix f(x) + (1 - mix) f(x_b); each sample stops on its own."""
    with torch.no_grad():
        target = settings.mix * model(images) + (1 - settings.mix) * model(boundary)
    current = images.clone().requires_grad_(True)
    optimizer = torch.optim.Adam([current], lr=settings.interp_lr, betas=(0.5, 0.999))
    steps = 1 if settings.interp_mode == "reference" else settings.interp_steps
    active = torch.ones(len(images), dtype=torch.bool, device=images.device)
    previous = None
    for _ in range(steps):
        losses = (model(current) - target).pow(2).mean(dim=1)
        optimizer.zero_grad()
        losses.sum().backward()
        kept = current.detach().clone()
        optimizer.step()
        with torch.no_grad():
            current.clamp_(0, 1)
            current[~active] = kept[~active]
            now = (model(current) - target).pow(2).mean(dim=1)
            if previous is not None:
                active &= (previous - now).abs() >= settings.interp_tolerance
            previous = now
        if not active.any():
            break
    return current.detach()


def generate(model, images: torch.Tensor, labels: torch.Tensor, image_ids: list[str], settings: GenerationSettings,
             batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """(boundary samples, interpolated samples) for every image, `batch_size` images at a time; each image's
    samples depend only on the image, its id and the settings, not on the batching."""
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    boundary, interpolated = [], []
    for first in range(0, len(images), batch_size):
        x, y = images[first:first + batch_size], labels[first:first + batch_size]
        starts = random_starts(x.shape[1:], image_ids[first:first + batch_size], settings.seed)
        x_b = boundary_samples(model, x, y, settings, starts)
        boundary.append(x_b)
        interpolated.append(interpolated_samples(model, x, x_b, settings))
    return torch.cat(boundary), torch.cat(interpolated)


def cache_key(model: torch.nn.Module, settings: GenerationSettings, image_ids: list[str]) -> str:
    """sha256 over the classifier's weights, every generation setting and the images' ids."""
    digest = hashlib.sha256(classifier_digest(model).encode())
    digest.update(json.dumps(settings.model_dump(), sort_keys=True).encode())
    digest.update("\n".join(image_ids).encode())
    return digest.hexdigest()[:24]


def generate_cached(model, images: torch.Tensor, labels: torch.Tensor, image_ids: list[str],
                    settings: GenerationSettings, cache: Location | None, generate_fn=generate
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """`generate_fn(model, images, labels, image_ids, settings)` unless `cache` holds its result for this key."""
    key = cache_key(model, settings, image_ids)
    name = f"decrop-{key}.pt"
    if cache is not None and cache.join(name).exists():
        stored = torch.load(io.BytesIO(cache.read_bytes(name)), map_location=images.device, weights_only=True)
        return stored["boundary"], stored["interpolated"]
    boundary, interpolated = generate_fn(model, images, labels, image_ids, settings)
    if cache is not None:
        buffer = io.BytesIO()
        torch.save({"boundary": boundary.cpu(), "interpolated": interpolated.cpu(), "image_ids": image_ids,
                    "settings": settings.model_dump()}, buffer)
        cache.write_bytes(name, buffer.getvalue())
    return boundary, interpolated
