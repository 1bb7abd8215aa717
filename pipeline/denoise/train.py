"""One training loop for denoisers, run in this process or on each Ray Train worker.

Objectives (`objective`):
- `mse`, `stab`, `clf`: Salman et al.'s, from scratch;
- `stab_mse`: MSE for `epochs`, then Stab fine-tuning for `second_epochs` at `second_lr`;
- `decrop`: DE-CROP stage 1 (Stab on the originals + cosine on the boundary and interpolated views + MMD on
  normalised penultimate features) for `epochs`, then stage 2 (adds the domain discriminator behind a
  gradient reversal layer, DANN schedule) for `second_epochs`; the reversal weight ramps from 0 over stage
  2's own iterations, as in the authors' code.

A two-stage objective's artifact comes from its last stage that has epochs: the best checkpoint is chosen
among that stage's epochs only (a `decrop` artifact is never a stage-1 model), and the artifact records its
`stage` (1 or 2) and `phase`.

Access (`access`):
- `white_box`: the target classifier's gradients drive generation and every loss.
- `black_box`: the target is used only through its outputs (its predicted labels are the Stab targets and
  its predictions score the validation split). Gradients come from the `surrogate` classifier named in
  config, as in Salman et al.'s query-access setting: a denoiser trained through one classifier transfers
  to another on the same task, and no gradient of the target is ever taken.

Checkpoints are selected by the target's accuracy on noisy, denoised images of the validation split carved
from the few-sample subset (one seeded noise draw per image), never on the test set. A checkpoint is a
versioned artifact: the weights, the config, the target classifier's digest, the subset and the seeds.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config import DenoiserConfig
from pipeline.denoise import losses
from pipeline.denoise.data import few_sample_subset, load_training_images
from pipeline.denoise.generate import GenerationSettings, generate_cached
from pipeline.models import WithFeatures, load_model
from pipeline.models.denoisers import DnCNN, save_artifact

log = logging.getLogger(__name__)

__all__ = ["TrainingData", "decrop_views", "describe", "fit", "prepare_training", "unwrap"]


def unwrap(module: nn.Module) -> nn.Module:
    """The network inside a DistributedDataParallel wrapper (or the module itself)."""
    return module.module if hasattr(module, "module") else module


def describe(config: DenoiserConfig, metrics: dict, subset: dict) -> dict:
    """What a checkpoint of this training is and how it was made (the artifact's description)."""
    surrogate = config.surrogate and dataclasses.asdict(config.surrogate)
    return {"architecture": {"name": "dncnn", **config.denoiser}, "classifier": dataclasses.asdict(config.classifier),
            "objective": config.objective, "access": config.access, "sigma": config.sigma,
            "surrogate": surrogate, "subset": subset, "seed": config.seed, "metrics": metrics,
            "stage": metrics.get("stage"), "phase": metrics.get("phase"), "config": config.to_dict()}


def _augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """RandomCrop(size, padding 4) + horizontal flip, drawn per image."""
    size = images.shape[-1]
    padded = F.pad(images, (4, 4, 4, 4))
    out = torch.empty_like(images)
    corners = torch.randint(0, 9, (len(images), 2), generator=generator)
    flips = torch.rand(len(images), generator=generator) < 0.5
    for index, (row, column) in enumerate(corners.tolist()):
        crop = padded[index, :, row:row + size, column:column + size]
        out[index] = crop.flip(-1) if flips[index] else crop
    return out


@dataclass
class TrainingData:
    """The frozen classifiers and the few-sample subset of a run."""

    target: nn.Module
    gradient_model: nn.Module  # the target (white-box) or the surrogate (black-box)
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    subset: dict


def prepare_training(config: DenoiserConfig, device: str = "cpu") -> TrainingData:
    """Loads the classifiers (frozen) and the subset: the same on every worker and on the driver."""
    target = load_model(config.classifier, config.storage).to(device).eval()
    gradient_model = target
    if config.access == "black_box":
        gradient_model = load_model(config.surrogate, config.storage).to(device).eval()
    for model in (target, gradient_model):
        for parameter in model.parameters():
            parameter.requires_grad_(False)
    images, labels, ids = load_training_images(config.dataset, config.storage)
    counts = {key: value for key, value in config.subset.items() if key in ("per_class", "fraction")}
    train_index, validation_index = few_sample_subset(
        labels.numpy(), seed=config.subset.get("seed", 3), validation=config.subset.get("validation", 0.2), **counts)
    subset = {"train_ids": [ids[i] for i in train_index], "validation_ids": [ids[i] for i in validation_index],
              **config.subset}
    return TrainingData(target, gradient_model, images[train_index].to(device), labels[train_index].to(device),
                        images[validation_index].to(device), labels[validation_index].to(device), subset)


def decrop_views(config: DenoiserConfig, data: TrainingData, generate_fn=None) -> tuple[torch.Tensor, torch.Tensor]:
    """DE-CROP's boundary and interpolated samples of the training subset, from the cache when present."""
    cache = config.storage.open(config.cache or f"{config.output}/cache")
    return generate_cached(data.gradient_model, data.x_train, data.y_train, data.subset["train_ids"],
                           GenerationSettings(**config.generation), cache, **({"generate_fn": generate_fn}
                                                                              if generate_fn else {}))


def fit(config: DenoiserConfig, report: Callable[[dict, Path | None], None], rank: int = 0, world_size: int = 1,
        prepare: Callable[[nn.Module], nn.Module] = lambda module: module, device: str = "cpu",
        evaluate: Callable[[nn.Module, TrainingData], dict] | None = None, every_epoch: bool = False,
        resume_from: Path | None = None) -> dict:
    """Trains the denoiser; calls report(metrics, artifact directory or None) after every epoch (the
    directory, on rank 0, when the validation accuracy improved, or every epoch with `every_epoch`).
    `evaluate(denoiser, data)` adds metrics every epoch; `resume_from` (an artifact directory) restarts after
    the epoch it records, from its weights. Returns the best metrics of the last stage. Every report carries
    `selection_score`: the validation accuracy in the last stage, -1 before it, so ranking checkpoints by it
    picks the last stage's best."""
    torch.manual_seed(config.seed)
    data = prepare_training(config, device)
    target, gradient_model, subset = data.target, data.gradient_model, data.subset
    x_train, y_train, x_val, y_val = data.x_train, data.y_train, data.x_val, data.y_val
    featured = WithFeatures(gradient_model)
    log.info("training a %s denoiser on %d images (%d held out for selection), rank %d of %d",
             config.objective, len(x_train), len(x_val), rank, world_size)
    views = decrop_views(config, data) if config.objective == "decrop" else None

    network = DnCNN(image_channels=x_train.shape[1], **config.denoiser)
    start_epoch = 0
    if resume_from is not None:
        network.load_state_dict(torch.load(resume_from / "denoiser.pt", map_location="cpu", weights_only=True))
        start_epoch = json.loads((resume_from / "artifact.json").read_text())["metrics"]["epoch"]
    denoiser = prepare(network.to(device))
    phases = {"mse": [("mse", config.epochs, config.lr)], "stab": [("stab", config.epochs, config.lr)],
              "clf": [("clf", config.epochs, config.lr)],
              "stab_mse": [("mse", config.epochs, config.lr), ("stab", config.second_epochs,
                                                               config.second_lr or config.lr)],
              "decrop": [("decrop1", config.epochs, config.lr), ("decrop2", config.second_epochs,
                                                                 config.second_lr or config.lr)]}[config.objective]
    noise_generator = torch.Generator(device=device).manual_seed(config.seed + 1000 * rank)
    shuffle_generator = torch.Generator().manual_seed(config.seed)
    validation_noise = torch.randn(x_val.shape, generator=torch.Generator(device=device).manual_seed(config.seed),
                                   device=device) * config.sigma
    best: dict = {"val_accuracy": -1.0}
    selected = max(index for index, (_, epochs, _) in enumerate(phases) if epochs > 0)
    epoch_done = 0
    discriminator = None
    for stage, (phase, epochs, lr) in enumerate(phases):
        if epochs == 0:
            continue
        if stage == selected:
            best = {"val_accuracy": -1.0}  # the artifact is chosen among the last stage's epochs
        optimizer = torch.optim.Adam(denoiser.parameters(), lr=lr, weight_decay=config.weight_decay)
        schedule = torch.optim.lr_scheduler.StepLR(optimizer, step_size=config.step_size, gamma=config.gamma)
        if phase == "decrop2":
            with torch.no_grad():
                width = featured(x_train[:2])[1].shape[1]
            discriminator = prepare(losses.DomainDiscriminator(width).to(device))
            disc_optimizer = torch.optim.Adam(discriminator.parameters(), lr=config.disc_lr)
        for stage_epoch in range(epochs):
            if epoch_done < start_epoch:  # finished before the run was resumed
                epoch_done += 1
                continue
            denoiser.train()
            order = torch.randperm(len(x_train), generator=shuffle_generator)
            order = order[:len(order) - len(order) % world_size][rank::world_size]  # equal shards for DDP
            batches = order.split(config.batch_size)
            running = 0.0
            for step, batch in enumerate(batches):
                x = x_train[batch]
                if config.augment:
                    x = _augment(x, shuffle_generator)
                noise = torch.randn(x.shape, generator=noise_generator, device=device) * config.sigma
                if phase == "mse":
                    loss = F.mse_loss(denoiser(x + noise), x)
                elif phase in ("stab", "clf"):
                    with torch.no_grad():
                        target_labels = target(x).argmax(1) if phase == "stab" else y_train[batch]
                    loss = F.cross_entropy(gradient_model(denoiser(x + noise)), target_labels)
                else:
                    loss = _decrop_loss(config, x, noise, views, batch, denoiser, target, gradient_model, featured,
                                        shuffle_generator)
                    if phase == "decrop2":
                        progress = (stage_epoch + step / len(batches)) / epochs  # from 0 within stage 2
                        loss = loss + _domain_loss(x, noise, denoiser, featured, discriminator,
                                                   losses.dann_lambda(progress, config.weights.get("dann", 2.0)))
                        disc_optimizer.zero_grad()
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                if phase == "decrop2":
                    disc_optimizer.step()
                running += loss.item()
            schedule.step()
            epoch_done += 1
            accuracy = _validation_accuracy(denoiser, target, x_val, y_val, validation_noise)
            metrics = {"epoch": epoch_done, "phase": phase, "stage": stage + 1,
                       "train_loss": running / max(1, len(batches)), "val_accuracy": accuracy,
                       "selection_score": accuracy if stage == selected else -1.0}
            if evaluate is not None:
                metrics.update(evaluate(unwrap(denoiser), data))
            improved = accuracy > best["val_accuracy"]
            if improved:
                best = dict(metrics)
            if rank == 0 and (improved or every_epoch):
                with tempfile.TemporaryDirectory() as directory:
                    save_artifact(Path(directory), unwrap(denoiser), target, describe(config, metrics, subset))
                    report(metrics, Path(directory))
            else:
                report(metrics, None)
    return best


def _validation_accuracy(denoiser, target, images, labels, noise) -> float:
    if len(images) == 0:
        return 0.0
    denoiser.eval()
    with torch.no_grad():
        return float((target(denoiser(images + noise)).argmax(1) == labels).float().mean())


def _decrop_loss(config, x, noise, views, batch, denoiser, target, gradient_model, featured, generator):
    """DE-CROP stage 1: Stab on the originals, cosine in logit space and MMD on normalised features for the
    boundary and interpolated views; one noise draw shared by the three views."""
    weights = config.weights
    with torch.no_grad():
        clean_labels = target(x).argmax(1)
        clean_logits, clean_features = featured(x)
        clean_features = F.normalize(clean_features, dim=1)
    denoised_logits = gradient_model(denoiser(x + noise))
    loss = weights.get("stab", 1.0) * F.cross_entropy(denoised_logits, clean_labels)
    for view in views:
        extra = view[batch]
        if config.augment:
            extra = _augment(extra, generator)
        logits, features = featured(denoiser(extra + noise))
        loss = loss + weights.get("cosine", 4.0) * losses.cosine_loss(logits, clean_logits)
        loss = loss + weights.get("mmd", 4.0) * losses.mmd_rbf(clean_features, F.normalize(features, dim=1))
    return loss


def _domain_loss(x, noise, denoiser, featured, discriminator, scale):
    """Stage 2: clean features (domain 0) against denoised features (domain 1) through the gradient reversal
    layer; the discriminator learns the domains while the denoiser learns to hide them."""
    with torch.no_grad():
        clean = F.normalize(featured(x)[1], dim=1)
    denoised = F.normalize(featured(denoiser(x + noise))[1], dim=1)
    features = torch.cat([clean, losses.reverse_gradient(denoised, scale)])
    domains = torch.cat([torch.zeros(len(x)), torch.ones(len(x))]).long().to(x.device)
    return F.nll_loss(discriminator(features), domains)
