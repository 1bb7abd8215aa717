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

The steps: `TrainingRun.start` builds what a run holds fixed (data, denoiser, generators, validation noise);
`fit` runs the objective's `stages`, each epoch `train_one_epoch` (the phase's loss from `LOSSES`), `validate`
and `report_epoch` (rank 0 writes the artifact); `fit_local` is `fit` in this process with the best artifact
under `<output>/<run_name>/best`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.denoise import losses
from pipeline.denoise.config import DenoiserConfig
from pipeline.denoise.data import few_sample_subset, load_training_images
from pipeline.denoise.generate import generate_cached
from pipeline.models import ModelSpec, WithFeatures, load_model
from pipeline.models.denoisers import DnCNN, save_artifact
from pipeline.progress import Progress

log = logging.getLogger(__name__)

__all__ = ["LOSSES", "TrainingData", "TrainingRun", "decrop_views", "describe", "fit", "fit_local", "fit_resumable",
           "gradient_spec", "prepare_training", "stages", "train_one_epoch", "training_record", "unwrap", "validate"]


def unwrap(module: nn.Module) -> nn.Module:
    """The network inside a DistributedDataParallel wrapper (or the module itself)."""
    return module.module if hasattr(module, "module") else module


def describe(config: DenoiserConfig, metrics: dict, subset: dict) -> dict:
    """What a checkpoint of this training is and how it was made (the artifact's description)."""
    surrogate = config.surrogate and config.surrogate.model_dump()
    return {"architecture": {"name": "dncnn", **config.to_dict()["denoiser"]},
            "classifier": config.classifier.model_dump(),
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


def gradient_spec(config: DenoiserConfig) -> ModelSpec:
    """The spec of the classifier whose gradients train the denoiser: the surrogate with black-box access,
    the target otherwise."""
    return config.surrogate if config.access == "black_box" else config.classifier


def prepare_training(config: DenoiserConfig, device: str = "cpu") -> TrainingData:
    """Loads the classifiers (frozen) and the subset: the same on every worker and on the driver."""
    shape = config.dataset.transform.shape  # a classifier trained on another input size is resized to
    target = load_model(config.classifier, config.storage, shape).to(device).eval()
    gradient_model = target
    if config.access == "black_box":
        gradient_model = load_model(gradient_spec(config), config.storage, shape).to(device).eval()
    for model in (target, gradient_model):
        for parameter in model.parameters():
            parameter.requires_grad_(False)
    images, labels, ids = load_training_images(config.dataset, config.storage)
    train_index, validation_index = few_sample_subset(labels.numpy(), **config.subset.model_dump())
    subset = {"train_ids": [ids[i] for i in train_index], "validation_ids": [ids[i] for i in validation_index],
              **config.subset.model_dump()}
    return TrainingData(target, gradient_model, images[train_index].to(device), labels[train_index].to(device),
                        images[validation_index].to(device), labels[validation_index].to(device), subset)


def decrop_views(config: DenoiserConfig, data: TrainingData, generate_fn=None) -> tuple[torch.Tensor, torch.Tensor]:
    """DE-CROP's boundary and interpolated samples of the training subset, from the cache when present."""
    cache = config.storage.open(config.cache or f"{config.output}/cache")
    return generate_cached(data.gradient_model, data.x_train, data.y_train, data.subset["train_ids"],
                           config.generation, cache, **({"generate_fn": generate_fn}
                                                                              if generate_fn else {}))


class Stage(NamedTuple):
    """One stage of an objective: the phase (which loss), its epochs and its learning rate."""

    phase: str
    epochs: int
    lr: float


PHASES = {"mse": ("mse",), "stab": ("stab",), "clf": ("clf",), "stab_mse": ("mse", "stab"),
          "decrop": ("decrop1", "decrop2")}


def stages(config: DenoiserConfig) -> list[Stage]:
    """The objective's stages in order: the first for `epochs` at `lr`, a second for `second_epochs` at
    `second_lr` (or `lr`)."""
    phases = PHASES[config.objective]
    schedule = [(config.epochs, config.lr), (config.second_epochs, config.second_lr or config.lr)][:len(phases)]
    return [Stage(phase, epochs, lr) for phase, (epochs, lr) in zip(phases, schedule, strict=True)]


def _unchanged(module: nn.Module) -> nn.Module:
    """The module itself: no wrapper, for training in one process."""
    return module


@dataclass
class Batch:
    """A training batch: its positions in the subset, the clean (augmented) images and the noise drawn for
    them, and how far through its stage the batch starts (0 at the stage's first batch)."""

    index: torch.Tensor
    x: torch.Tensor
    noise: torch.Tensor
    progress: float

    @property
    def noisy(self) -> torch.Tensor:
        return self.x + self.noise


@dataclass
class TrainingRun:
    """What every step of one run on one rank shares, built once by `start`: the config, the classifiers and
    subset, the (wrapped) denoiser, the gradient model's features, DE-CROP's views, the run's generators and
    the validation split's fixed noise. `discriminator` is DE-CROP stage 2's, None before that stage."""

    config: DenoiserConfig
    data: TrainingData
    denoiser: nn.Module
    featured: WithFeatures
    views: tuple[torch.Tensor, torch.Tensor] | None
    noise_generator: torch.Generator  # the training noise, seeded per rank
    shuffle_generator: torch.Generator  # the epoch order and the augmentation, the same on every rank
    validation_noise: torch.Tensor
    start_epoch: int = 0  # epochs finished before a resume
    rank: int = 0
    world_size: int = 1
    device: str = "cpu"
    prepare: Callable[[nn.Module], nn.Module] = _unchanged  # wraps every trained module (DDP on Ray Train)
    discriminator: nn.Module | None = None

    @classmethod
    def start(cls, config: DenoiserConfig, rank: int = 0, world_size: int = 1,
              prepare: Callable[[nn.Module], nn.Module] = _unchanged, device: str = "cpu",
              resume_from: Path | None = None) -> TrainingRun:
        """Seeds torch, then loads the data, generates (or reads) the views and builds the denoiser, in this
        order; resumes from the artifact directory `resume_from` when given."""
        torch.manual_seed(config.seed)
        data = prepare_training(config, device)
        log.info("training a %s denoiser on %d images (%d held out for selection), rank %d of %d",
                 config.objective, len(data.x_train), len(data.x_val), rank, world_size)
        views = decrop_views(config, data) if config.objective == "decrop" else None
        network, start_epoch = _denoiser(config, data.x_train.shape[1], resume_from)
        validation = torch.Generator(device=device).manual_seed(config.seed)
        return cls(config, data, prepare(network.to(device)), WithFeatures(data.gradient_model), views,
                   noise_generator=torch.Generator(device=device).manual_seed(config.seed + 1000 * rank),
                   shuffle_generator=torch.Generator().manual_seed(config.seed),
                   validation_noise=torch.randn(data.x_val.shape, generator=validation, device=device) * config.sigma,
                   start_epoch=start_epoch, rank=rank, world_size=world_size, device=device, prepare=prepare)

    def batches(self) -> tuple[torch.Tensor, ...]:
        """This rank's batches of positions for one epoch: a fresh seeded permutation of the subset, cut to a
        multiple of the world size and dealt out to the ranks (equal shards for DDP)."""
        order = torch.randperm(len(self.data.x_train), generator=self.shuffle_generator)
        order = order[:len(order) - len(order) % self.world_size][self.rank::self.world_size]
        return order.split(self.config.batch_size)

    def batch(self, index: torch.Tensor, progress: float) -> Batch:
        """The subset's images at `index`, augmented when configured, and their noise: drawn in that order."""
        x = self.data.x_train[index]
        if self.config.augment:
            x = _augment(x, self.shuffle_generator)
        noise = torch.randn(x.shape, generator=self.noise_generator, device=self.device) * self.config.sigma
        return Batch(index, x, noise, progress)


def _denoiser(config: DenoiserConfig, image_channels: int, resume_from: Path | None) -> tuple[DnCNN, int]:
    """A freshly initialised DnCNN and 0, or, resuming, that DnCNN with the artifact's weights and the epoch
    the artifact records."""
    network = DnCNN(image_channels=image_channels, **config.to_dict()["denoiser"])
    if resume_from is None:
        return network, 0
    network.load_state_dict(torch.load(resume_from / "denoiser.pt", map_location="cpu", weights_only=True))
    return network, json.loads((resume_from / "artifact.json").read_text())["metrics"]["epoch"]


def _mse_loss(run: TrainingRun, batch: Batch) -> torch.Tensor:
    """MSE between the denoised noisy images and the clean ones."""
    return F.mse_loss(run.denoiser(batch.noisy), batch.x)


def _stab_loss(run: TrainingRun, batch: Batch) -> torch.Tensor:
    """Stab: the gradient model on the denoised images against the target's prediction on the clean ones."""
    with torch.no_grad():
        clean_logits = run.data.target(batch.x)
    return losses.stab_loss(run.data.gradient_model(run.denoiser(batch.noisy)), clean_logits)


def _clf_loss(run: TrainingRun, batch: Batch) -> torch.Tensor:
    """Clf: the gradient model on the denoised images against the true labels."""
    return F.cross_entropy(run.data.gradient_model(run.denoiser(batch.noisy)), run.data.y_train[batch.index])


def _decrop_loss(run: TrainingRun, batch: Batch) -> torch.Tensor:
    """DE-CROP stage 1: Stab on the originals, cosine in logit space and MMD on normalised features for the
    boundary and interpolated views; one noise draw shared by the three views."""
    weights = run.config.weights
    with torch.no_grad():
        target_logits = run.data.target(batch.x)
        clean_logits, clean_features = run.featured(batch.x)
        clean_features = F.normalize(clean_features, dim=1)
    denoised_logits = run.data.gradient_model(run.denoiser(batch.noisy))
    loss = weights.stab * losses.stab_loss(denoised_logits, target_logits)
    for view in run.views:
        extra = view[batch.index]
        if run.config.augment:
            extra = _augment(extra, run.shuffle_generator)
        logits, features = run.featured(run.denoiser(extra + batch.noise))
        loss = loss + weights.cosine * losses.cosine_loss(logits, clean_logits)
        loss = loss + weights.mmd * losses.mmd_rbf(clean_features, F.normalize(features, dim=1))
    return loss


def _decrop_domain_loss(run: TrainingRun, batch: Batch) -> torch.Tensor:
    """DE-CROP stage 2: stage 1's loss plus the domain loss, clean features (domain 0) against denoised ones
    (domain 1) through the gradient reversal layer, whose weight follows DANN's schedule over the stage; the
    discriminator learns the domains while the denoiser learns to hide them."""
    loss = _decrop_loss(run, batch)
    scale = losses.dann_lambda(batch.progress, run.config.weights.dann)
    with torch.no_grad():
        clean = F.normalize(run.featured(batch.x)[1], dim=1)
    denoised = F.normalize(run.featured(run.denoiser(batch.noisy))[1], dim=1)
    features = torch.cat([clean, losses.reverse_gradient(denoised, scale)])
    domains = torch.cat([torch.zeros(len(batch.x)), torch.ones(len(batch.x))]).long().to(batch.x.device)
    return loss + F.nll_loss(run.discriminator(features), domains)


LOSSES: dict[str, Callable[[TrainingRun, Batch], torch.Tensor]] = {
    "mse": _mse_loss, "stab": _stab_loss, "clf": _clf_loss, "decrop1": _decrop_loss, "decrop2": _decrop_domain_loss}


def start_stage(run: TrainingRun, stage: Stage) -> tuple[list[torch.optim.Optimizer], torch.optim.lr_scheduler.StepLR]:
    """A stage's fresh optimizers and the denoiser's step schedule: Adam on the denoiser, and in DE-CROP
    stage 2 Adam on a new domain discriminator (built here, on the gradient model's feature width)."""
    config = run.config
    optimizer = torch.optim.Adam(run.denoiser.parameters(), lr=stage.lr, weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.StepLR(optimizer, step_size=config.step_size, gamma=config.gamma)
    if stage.phase != "decrop2":
        return [optimizer], schedule
    with torch.no_grad():
        width = run.featured(run.data.x_train[:2])[1].shape[1]
    run.discriminator = run.prepare(losses.DomainDiscriminator(width).to(run.device))
    return [optimizer, torch.optim.Adam(run.discriminator.parameters(), lr=config.disc_lr)], schedule


def train_one_epoch(run: TrainingRun, stage: Stage, stage_epoch: int,
                    optimizers: list[torch.optim.Optimizer]) -> float:
    """One pass over this rank's shard with the stage's loss, every optimizer stepping after each batch;
    returns the mean batch loss."""
    run.denoiser.train()
    batches = run.batches()
    running = 0.0
    for step, index in enumerate(batches):
        loss = LOSSES[stage.phase](run, run.batch(index, (stage_epoch + step / len(batches)) / stage.epochs))
        for optimizer in optimizers:
            optimizer.zero_grad()
        loss.backward()
        for optimizer in optimizers:
            optimizer.step()
        running += loss.item()
    return running / max(1, len(batches))


def validate(run: TrainingRun) -> float:
    """The target's accuracy on the validation split with the run's fixed noise, denoised (0 when the split
    is empty)."""
    if len(run.data.x_val) == 0:
        return 0.0
    run.denoiser.eval()
    with torch.no_grad():
        predictions = run.data.target(run.denoiser(run.data.x_val + run.validation_noise)).argmax(1)
    return float((predictions == run.data.y_val).float().mean())


def report_epoch(run: TrainingRun, report: Callable[[dict, Path | None], None], metrics: dict, save: bool) -> None:
    """report(metrics, artifact directory) on rank 0 when `save`, the artifact written to a temporary
    directory for the call; report(metrics, None) otherwise."""
    if run.rank != 0 or not save:
        report(metrics, None)
        return
    with tempfile.TemporaryDirectory() as directory:
        save_artifact(Path(directory), unwrap(run.denoiser), run.data.target,
                      describe(run.config, metrics, run.data.subset))
        report(metrics, Path(directory))


def fit(config: DenoiserConfig, report: Callable[[dict, Path | None], None], rank: int = 0, world_size: int = 1,
        prepare: Callable[[nn.Module], nn.Module] = _unchanged, device: str = "cpu",
        evaluate: Callable[[nn.Module, TrainingData], dict] | None = None, every_epoch: bool = False,
        resume_from: Path | None = None) -> dict:
    """Trains the denoiser; calls report(metrics, artifact directory or None) after every epoch (the
    directory, on rank 0, when the validation accuracy improved within the stage, or every epoch with
    `every_epoch`). `evaluate(denoiser, data)` adds metrics every epoch; `resume_from` (an artifact directory)
    restarts after the epoch it records, from its weights. Returns the best metrics of the last stage. Every
    report carries `selection_score`: the validation accuracy in the last stage, -1 before it, so ranking
    checkpoints by it picks the last stage's best."""
    run = TrainingRun.start(config, rank, world_size, prepare, device, resume_from)
    plan = stages(config)
    last = max(number for number, stage in enumerate(plan) if stage.epochs > 0)
    epoch = 0
    for number, stage in enumerate(plan):
        if stage.epochs == 0:
            continue
        best = {"val_accuracy": -1.0}  # the best of this stage; the last stage's is the artifact
        optimizers, schedule = start_stage(run, stage)
        for stage_epoch in range(stage.epochs):
            epoch += 1
            if epoch <= run.start_epoch:  # finished before the run was resumed
                continue
            train_loss = train_one_epoch(run, stage, stage_epoch, optimizers)
            schedule.step()
            accuracy = validate(run)
            metrics = {"epoch": epoch, "phase": stage.phase, "stage": number + 1, "train_loss": train_loss,
                       "val_accuracy": accuracy, "selection_score": accuracy if number == last else -1.0}
            if evaluate is not None:
                metrics.update(evaluate(unwrap(run.denoiser), run.data))
            improved = accuracy > best["val_accuracy"]
            if improved:
                best = dict(metrics)
            report_epoch(run, report, metrics, save=improved or every_epoch)
    return best


def fit_local(config: DenoiserConfig) -> str:
    """Trains in this process, resumably, under `<output>/<run_name>/` (see `fit_resumable`); returns the URI
    of `best/`."""
    return fit_resumable(config, config.storage.open(config.output).join(config.run_name))


def fit_resumable(config: DenoiserConfig, folder, evaluate: Callable[[nn.Module, TrainingData], dict] | None = None,
                  on_epoch: Callable[[dict], None] | None = None,
                  score: Callable[[dict], tuple] | None = None, show: bool = True) -> str:
    """Trains in this process into the Location `folder`, resumably. `epochs/<n>/` holds the artifact of the
    last finished epoch and `last.json` (written after it, so it never names a partial one) names it with the
    sha256 of its files and the metrics of every epoch so far; `best/` is replaced only by an artifact of a
    higher `score` (default: `selection_score`, then validation accuracy), so it never gets worse. A rerun
    resumes after the last finished epoch once the digests match (a changed file is refused before it is
    loaded); a folder that holds a training with another config is refused. `on_epoch(metrics)` runs after
    each epoch's files are written; `show` puts the epochs in a progress display. Returns the URI of
    `best/`."""
    score = score or _selection_key
    best = folder.join("best")
    earlier_best = _earlier(config, best)
    best_key = [None if earlier_best is None else score(earlier_best["metrics"])]
    last = training_record(folder)
    history = list(last["history"]) if last else []
    previous = [last["epoch"] if last else None]

    def report(metrics: dict, directory: Path | None) -> None:
        log.debug("epoch %d (%s): loss %.4f, validation accuracy %.3f", metrics["epoch"], metrics["phase"],
                  metrics["train_loss"], metrics["val_accuracy"])
        progress.update(metrics["epoch"] - progress.done, loss=metrics["train_loss"],
                        val_accuracy=metrics["val_accuracy"], phase=metrics["phase"])
        if directory is None:
            return
        _copy(directory, folder.join("epochs", str(metrics["epoch"])))
        history.append(metrics)
        folder.write_json("last.json", {"epoch": metrics["epoch"], "sha256": _digests(directory),
                                        "history": history})
        if previous[0] is not None and previous[0] != metrics["epoch"]:
            folder.fs.delete_dir(folder.join("epochs", str(previous[0])).path)
        previous[0] = metrics["epoch"]
        if best_key[0] is None or score(metrics) > best_key[0]:
            _copy(directory, best)
            best_key[0] = score(metrics)
        if on_epoch is not None:
            on_epoch(metrics)

    done = last["epoch"] if last else 0
    total = sum(stage.epochs for stage in stages(config))
    with tempfile.TemporaryDirectory() as scratch, Progress(total, "epochs", f"training {config.run_name}",
                                                             logger=log, initial=done, tty=show and None,
                                                             emit=None if show else _silent) as progress:
        resume_from = _last_epoch(config, folder, last, Path(scratch))
        fit(config, report, evaluate=evaluate, every_epoch=True, resume_from=resume_from)
    return best.uri


def _silent(line: str) -> None:
    """A progress display's lines, dropped (a sweep shows its trials instead)."""


def _digests(directory: Path) -> dict[str, str]:
    return {file.name: hashlib.sha256(file.read_bytes()).hexdigest() for file in sorted(directory.iterdir())}


def training_record(folder) -> dict | None:
    """The last.json of a training in `folder` (its last epoch, that epoch's file digests, every epoch's metrics),
    or None if there is none; ValueError when it is not one this project wrote."""
    if not folder.join("last.json").exists():
        return None
    try:
        last = folder.read_json("last.json")
        if not (isinstance(last.get("epoch"), int) and isinstance(last.get("sha256"), dict)
                and isinstance(last.get("history"), list)):
            raise ValueError("it lacks the epoch, the digests or the history")
    except ValueError as error:
        raise ValueError(f"{folder.join('last.json').uri} is not a training record this project wrote ({error}); "
                         f"remove {folder.uri} to start over") from error
    return last


def _earlier(config: DenoiserConfig, artifact) -> dict | None:
    """An earlier attempt's artifact.json at `artifact`, checked to come from this very config; None if none."""
    if not artifact.join("artifact.json").exists():
        return None
    metadata = artifact.read_json("artifact.json")
    if metadata.get("config") != json.loads(json.dumps(config.to_dict(), default=str)):
        raise ValueError(f"{artifact.uri} comes from a training with another config; choose another run_name or "
                         f"remove that folder")
    return metadata


def _selection_key(metrics: dict) -> tuple[float, float]:
    return (metrics["selection_score"], metrics["val_accuracy"])


def _copy(directory: Path, target) -> None:
    for file in sorted(directory.iterdir(), key=lambda path: path.name != "denoiser.pt"):  # the weights first
        target.write_bytes(file.name, file.read_bytes())


def _last_epoch(config: DenoiserConfig, folder, last: dict | None, scratch: Path) -> Path | None:
    """The artifact of the last finished epoch of an earlier attempt, checked against the digests in
    last.json and copied to `scratch` before anything loads it; None if none."""
    if last is None:
        return None
    source = folder.join("epochs", str(last["epoch"]))
    for name in ("denoiser.pt", "artifact.json"):
        data = source.read_bytes(name)
        if hashlib.sha256(data).hexdigest() != last["sha256"].get(name):
            raise ValueError(f"{source.join(name).uri} differs from the file this training wrote (sha256); "
                             f"refusing to load it. Remove {folder.uri} to start over")
        (scratch / name).write_bytes(data)
    _earlier(config, source)
    log.info("resuming %s after epoch %d", folder.uri, last["epoch"])
    return scratch
