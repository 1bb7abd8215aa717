"""Training over Ray Train: one wrapper, `fit_on_ray_train`, runs the loop of either training on every
TorchTrainer worker, with DDP across `workers` workers (gloo on CPU, NCCL with `use_gpu`).

- The denoiser (`pipeline.denoise.train`): each worker trains on its shard of the subset; rank 0 reports the
  artifact as a Ray Train checkpoint whenever the validation accuracy improves (the best is ranked by
  `selection_score`, so it comes from the last training stage), to a storage path that is a local directory
  or s3:// (pyarrow's filesystem, endpoint from config); a rerun resumes after the latest checkpoint.
- The base classifier (`pipeline.train_classifier`): each worker trains on its shard of every epoch's
  permutation, and rank 0 writes the checkpoint in the published layout to `output` (a directory or s3://)
  after every epoch. Ray Train's own run state goes to `<output>/ray/`.

Training in this process (`workers: 0`) does not come here: the command line calls the loops' `fit_local`
itself, without importing Ray.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlparse

import ray
import ray.train
import ray.train.torch
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from pipeline import train_classifier as classifier_training
from pipeline.config import DenoiserConfig
from pipeline.denoise.train import decrop_views, fit, gradient_spec, prepare_training, stages
from pipeline.distributed import init_ray, is_verbose
from pipeline.distributed.generate import generate_with_ray
from pipeline.distributed.progress import TrainProgress
from pipeline.storage import Location

log = logging.getLogger(__name__)

__all__ = ["fit_on_ray_train", "train_classifier", "train_denoiser"]


def fit_on_ray_train(loop: Callable[[dict], None], config, name: str, output: Location,
                     failure: FailureConfig | None = None, before: Callable[[], None] | None = None,
                     **options) -> ray.train.Result:
    """Runs `loop(config.to_dict())` on `config.workers` (>= 1) TorchTrainer workers, with GPUs when
    `config.use_gpu`; Ray Train's run state goes to `<output>/<name>`. `before()` runs once Ray is up. A
    failed worker fails the training (`failure`: no retries unless given); `options`: more of Ray Train's
    RunConfig."""
    if config.workers < 1:
        raise ValueError("Ray Train needs workers >= 1; with workers: 0 the training runs in this process")
    init_ray()
    if before is not None:
        before()
    trainer = TorchTrainer(
        loop, train_loop_config=config.to_dict(),
        scaling_config=ScalingConfig(num_workers=config.workers, use_gpu=config.use_gpu),
        run_config=RunConfig(name=name, storage_path=output.path, storage_filesystem=output.fs,
                             failure_config=failure or FailureConfig(max_failures=0), **options))
    return trainer.fit()


def worker_options() -> dict:
    """This worker's rank, world size, model wrapper (DDP) and device, as both loops' `fit` take them."""
    context = ray.train.get_context()
    return {"rank": context.get_world_rank(), "world_size": context.get_world_size(),
            "prepare": ray.train.torch.prepare_model, "device": str(ray.train.torch.get_device())}


def _denoiser_loop(config_dict: dict) -> None:
    config = DenoiserConfig.from_dict(config_dict)

    def report(metrics: dict, directory: Path | None) -> None:
        checkpoint = Checkpoint.from_directory(str(directory)) if directory is not None else None
        ray.train.report(metrics, checkpoint=checkpoint)

    checkpoint = ray.train.get_checkpoint()  # an earlier attempt's latest: resume after its epoch
    if checkpoint is None:
        fit(config, report, **worker_options())
        return
    with checkpoint.as_directory() as directory:
        fit(config, report, resume_from=Path(directory), **worker_options())


def _classifier_loop(config_dict: dict) -> None:
    config = classifier_training.ClassifierTraining.from_dict(config_dict)
    classifier_training.fit(config, lambda metrics: ray.train.report(metrics), **worker_options())


def _quiet_options(config: DenoiserConfig) -> dict:
    """One progress line per tenth of the epochs (`TrainProgress`); Ray Train's INFO logs only with -v."""
    options = {"callbacks": [TrainProgress(sum(stage.epochs for stage in stages(config)), config.run_name)]}
    if hasattr(ray.train, "LoggingConfig"):
        options["logging_config"] = ray.train.LoggingConfig(log_level="INFO" if is_verbose() else "WARNING")
    return options


def train_denoiser(config: DenoiserConfig) -> str:
    """Trains the denoiser on Ray Train with `config.workers` workers; returns the URI of the best artifact."""
    def generate_views() -> None:  # DE-CROP: the views generated once, as a Ray Data job; workers read the cache
        decrop_views(config, prepare_training(config), generate_with_ray(gradient_spec(config), config.storage,
                                                                          actors=config.workers))

    output = config.storage.open(config.output)
    checkpoints = CheckpointConfig(num_to_keep=2, checkpoint_score_attribute="selection_score",
                                   checkpoint_score_order="max")
    result = fit_on_ray_train(_denoiser_loop, config, config.run_name, output,
                              FailureConfig(max_failures=0, controller_failure_limit=1),
                              generate_views if config.objective == "decrop" else None,
                              checkpoint_config=checkpoints, **_quiet_options(config))
    best = result.get_best_checkpoint("selection_score", "max") if result.best_checkpoints else result.checkpoint
    if best is None:
        raise RuntimeError(f"denoiser training {config.run_name} reported no checkpoint")
    uri = f"{urlparse(output.uri).scheme}://{best.path}" if output.is_s3 else best.path
    log.info("best denoiser (validation accuracy %s): %s", result.metrics.get("val_accuracy"), uri)
    return uri


def train_classifier(config: classifier_training.ClassifierTraining) -> str:
    """Trains the classifier on Ray Train with `config.workers` workers; returns the URI of the checkpoint."""
    output = config.storage.open(config.output)
    result = fit_on_ray_train(_classifier_loop, config, "ray", output)
    log.info("trained %s: %s", config.arch, result.metrics)
    return output.join("checkpoint.pth.tar").uri
