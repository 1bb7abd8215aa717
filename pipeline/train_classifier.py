"""Training a base classifier with noise augmentation, in this process or on each Ray Train worker.

A smoothed classifier is only as good as its base classifier is under the noise it is smoothed with, so
the base classifier trains on noisy copies (Cohen et al.: Gaussian noise at the certification sigma;
Levine & Feizi: the splitting noise of SSN or DSSN). Each batch is split in equal shares between the
`noise` entries (`gaussian:SIGMA`, `ssn:SIGMA`, `dssn:SIGMA`, or `none` for clean images), after the
papers' CIFAR augmentation (random crop with 4 pixels of zero padding, horizontal flip; both keep pixels on
the 1/255 grid DSSN needs). SGD with momentum and a step schedule, as in the papers' training scripts.

`fit` runs the loop on one worker of `world_size` (its shard of every epoch's permutation; the model
wrapped by `prepare`, e.g. DDP); rank 0 writes `<output>/checkpoint.pth.tar` after every epoch in the
published layout ({'epoch', 'arch', 'state_dict' under `1.`, 'noise'}), which `model: {weights: ...}` reads
back with the architecture's normalisation in front, and `<output>/training.json` (the config and every
epoch's metrics). `fit_local` is `fit` in this process.
"""

from __future__ import annotations

import io
import logging
import math
from collections.abc import Callable
from typing import Annotated

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import AfterValidator, Field
from torch import nn

from pipeline.data.preprocess import ImageError, decode
from pipeline.data.sources import DatasetSpec, list_images, read_encoded
from pipeline.denoise.train import unwrap
from pipeline.models import Normalize
from pipeline.models.architectures import CLASSIFIER, architecture
from pipeline.models.checkpoints import save_checkpoint
from pipeline.noise import SplittingAugment
from pipeline.sections import Count, Listed, Number, Section
from pipeline.storage import Storage

log = logging.getLogger(__name__)

NOISE_KINDS = ("gaussian", "ssn", "dssn")

__all__ = ["ClassifierTraining", "fit", "fit_local", "random_crop_flip", "training_noise"]


def training_noise(spec: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """'gaussian:SIGMA', 'ssn:SIGMA', 'dssn:SIGMA' or 'none' -> a function from a clean batch in [0, 1] to a
    noisy one (splitting noise as `pipeline.noise.SplittingAugment`, the certifiers' own)."""
    if spec == "none":
        return lambda images: images
    kind, _, value = str(spec).partition(":")
    try:
        sigma = float(value)
    except ValueError:
        sigma = math.nan
    if kind not in NOISE_KINDS or not sigma > 0 or not math.isfinite(sigma):
        raise ValueError(f"noise {spec!r}: give 'none' or KIND:SIGMA with KIND one of {list(NOISE_KINDS)} and "
                         f"SIGMA > 0, e.g. gaussian:0.25")
    if kind == "gaussian":
        return lambda images: images + sigma * torch.randn_like(images)
    return SplittingAugment(kind, sigma)


def _noise(spec: str) -> str:
    training_noise(spec)  # ValueError naming the spec
    return spec


def _classifier(arch: str) -> str:
    if architecture(arch).kind != CLASSIFIER:  # ValueError for an unknown name
        raise ValueError(f"{arch} is a denoiser, not a classifier")
    return arch


class ClassifierTraining(Section):
    """A classifier training (see jobs/configs/train_cifar10.yaml): the architecture `arch` (a project name,
    e.g. cifar_resnet110, or a torchvision classifier), the training images (`dataset`, its train split),
    optionally `test` images whose noisy accuracy is reported every epoch, the `noise` shares, the SGD
    schedule, `augment`, the seed, where the checkpoint goes (`output`, a directory or s3:// prefix, with
    `storage`) and `workers` (0: this process; N: Ray Train with N workers, `use_gpu`)."""

    unknown_keys = "unknown classifier training key(s)"

    arch: Annotated[str, AfterValidator(_classifier)]
    dataset: DatasetSpec
    test: DatasetSpec | None = None
    noise: Annotated[tuple[Annotated[str, AfterValidator(_noise)], ...], Listed, Field(min_length=1)] = (
        "gaussian:0.25",)
    num_classes: Count | None = Field(None, ge=2)
    epochs: Count = Field(90, ge=1)
    batch_size: Count = Field(256, ge=1)
    lr: Annotated[Number, Field(gt=0.0)] = 0.1
    momentum: Annotated[Number, Field(ge=0.0)] = 0.9
    weight_decay: Annotated[Number, Field(ge=0.0)] = 1e-4
    step_size: Count = Field(30, ge=1)
    gamma: Annotated[Number, Field(gt=0.0)] = 0.1
    augment: bool = True
    seed: int = 0
    output: Annotated[str, Field(min_length=1)] = "runs/classifiers/model"
    storage: Storage = Storage()
    workers: Count = Field(0, ge=0)
    use_gpu: bool = False


def random_crop_flip(images: torch.Tensor, generator: torch.Generator, padding: int = 4) -> torch.Tensor:
    """RandomCrop(side, padding) with zero padding + horizontal flip with probability 1/2, per image."""
    count, _, height, width = images.shape
    padded = F.pad(images, (padding,) * 4).permute(0, 2, 3, 1)
    rows = torch.randint(0, 2 * padding + 1, (count, 1), generator=generator) + torch.arange(height)
    columns = torch.randint(0, 2 * padding + 1, (count, 1), generator=generator) + torch.arange(width)
    flips = torch.rand(count, 1, generator=generator) < 0.5
    columns = torch.where(flips, columns.flip(1), columns)
    picked = padded[torch.arange(count)[:, None, None], rows[:, :, None], columns[:, None, :]]
    return picked.permute(0, 3, 1, 2).contiguous()


def _pixels(dataset: DatasetSpec, storage: Storage) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 images [N, C, H, W] through the dataset's transform, labels) of any layout; an image that
    cannot be decoded is an error naming it."""
    listing = list_images(dataset, storage)
    pixels = []
    for image_id, data in zip(listing["image_id"].to_pylist(), read_encoded(dataset, listing, storage), strict=True):
        try:
            pixels.append(decode(data, dataset.transform))
        except ImageError as error:
            raise ValueError(f"training image {image_id}: {error}") from error
    return torch.from_numpy(np.stack(pixels)), torch.as_tensor(listing["label"].to_pylist(), dtype=torch.int64)


def build(config: ClassifierTraining) -> nn.Sequential:
    """Sequential(normalisation, network): the layout the checkpoint's `1.` keys come from."""
    arch = architecture(config.arch)
    network = arch.build(config.num_classes or arch.num_classes)
    if arch.mean is None:
        return nn.Sequential(nn.Identity(), network)
    return nn.Sequential(Normalize(arch.mean, arch.std), network)


def _noisy(batch: torch.Tensor, noises: list[Callable]) -> torch.Tensor:
    shares = torch.arange(len(batch), device=batch.device) % len(noises)
    noisy = torch.empty_like(batch)
    for index, noise in enumerate(noises):
        noisy[shares == index] = noise(batch[shares == index])
    return noisy


def _accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, noise: Callable, device: str,
              batch_size: int) -> float:
    model.eval()
    correct = 0
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            batch = images[start:start + batch_size].to(device).float() / 255
            correct += int((model(noise(batch)).argmax(1).cpu() == labels[start:start + batch_size]).sum())
    return correct / max(len(images), 1)


def _epoch(model: nn.Module, optimizer, images, labels, noises, config, generator, order, device) -> float:
    """One pass over this worker's shard of `order`; returns the mean batch loss."""
    model.train()
    losses = []
    for batch in order.split(config.batch_size):
        clean = images[batch]
        if config.augment:
            clean = random_crop_flip(clean, generator)
        clean = clean.to(device).float() / 255
        loss = F.cross_entropy(model(_noisy(clean, noises)), labels[batch].to(device))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return float(np.mean(losses)) if losses else math.nan


def _write(config: ClassifierTraining, model: nn.Module, epoch: int, history: list[dict]) -> None:
    location = config.storage.open(config.output)
    buffer = io.BytesIO()
    save_checkpoint(buffer, unwrap(model)[1], config.arch, epoch=epoch, noise=list(config.noise))
    location.write_bytes("checkpoint.pth.tar", buffer.getvalue())
    location.write_json("training.json", {"config": config.to_dict(), "epochs": history})


def fit(config: ClassifierTraining, report: Callable[[dict], None] = lambda metrics: None, rank: int = 0,
        world_size: int = 1, prepare: Callable[[nn.Module], nn.Module] = lambda model: model,
        device: str = "cpu") -> list[dict]:
    """Trains (see the module docstring); returns every epoch's metrics."""
    torch.manual_seed(config.seed + rank)
    generator = torch.Generator().manual_seed(config.seed + rank)
    order_generator = torch.Generator().manual_seed(config.seed)  # the same permutation on every worker
    images, labels = _pixels(config.dataset, config.storage)
    test = _pixels(config.test, config.storage) if config.test is not None else None
    model = prepare(build(config).to(device))
    noises = [training_noise(spec) for spec in config.noise]
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                                weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.StepLR(optimizer, step_size=config.step_size, gamma=config.gamma)
    history = []
    for epoch in range(1, config.epochs + 1):
        order = torch.randperm(len(images), generator=order_generator)[rank::world_size]
        metrics = {"epoch": epoch, "lr": schedule.get_last_lr()[0],
                   "train_loss": _epoch(model, optimizer, images, labels, noises, config, generator, order, device)}
        schedule.step()
        if test is not None:
            metrics.update({f"test_accuracy[{spec}]": _accuracy(model, *test, training_noise(spec), device,
                                                                 config.batch_size) for spec in config.noise})
        history.append(metrics)
        if rank == 0:
            _write(config, model, epoch, history)
        report(metrics)
    return history


def fit_local(config: ClassifierTraining) -> str:
    """Trains in this process (on the GPU when there is one); returns the checkpoint's URI."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    fit(config, lambda metrics: log.info("epoch %d: %s", metrics["epoch"], metrics), device=device)
    return config.storage.open(config.output).join("checkpoint.pth.tar").uri
