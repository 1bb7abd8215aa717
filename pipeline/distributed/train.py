"""Denoiser training over Ray Train: the loop of `pipeline.denoise.train` on every TorchTrainer worker.

DDP across `workers` workers (gloo on CPU, NCCL with `use_gpu`); each worker trains on its shard of the
subset; rank 0 reports the artifact as a Ray Train checkpoint whenever the validation accuracy improves
(the best is ranked by `selection_score`, so it comes from the last training stage), to a storage path
that is a local directory or s3:// (pyarrow's filesystem, endpoint from config).
"""

from __future__ import annotations

import logging
from pathlib import Path
from urllib.parse import urlparse

import ray
import ray.train
import ray.train.torch
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from pipeline.config import DenoiserConfig
from pipeline.denoise.train import decrop_views, fit, fit_local, gradient_spec, prepare_training, stages
from pipeline.distributed import init_ray, is_verbose
from pipeline.distributed.generate import generate_with_ray
from pipeline.distributed.progress import TrainProgress

log = logging.getLogger(__name__)

__all__ = ["train_denoiser"]


def _train_loop(config_dict: dict) -> None:
    config = DenoiserConfig.from_dict(config_dict)
    context = ray.train.get_context()

    def report(metrics: dict, directory: Path | None) -> None:
        checkpoint = Checkpoint.from_directory(str(directory)) if directory is not None else None
        ray.train.report(metrics, checkpoint=checkpoint)

    options = {"rank": context.get_world_rank(), "world_size": context.get_world_size(),
               "prepare": ray.train.torch.prepare_model, "device": str(ray.train.torch.get_device())}
    checkpoint = ray.train.get_checkpoint()  # an earlier attempt's latest: resume after its epoch
    if checkpoint is None:
        fit(config, report, **options)
        return
    with checkpoint.as_directory() as directory:
        fit(config, report, resume_from=Path(directory), **options)


def _quiet_options(config: DenoiserConfig) -> dict:
    """One progress line per tenth of the epochs (`TrainProgress`); Ray Train's INFO logs only with -v."""
    options = {"callbacks": [TrainProgress(sum(stage.epochs for stage in stages(config)), config.run_name)]}
    if hasattr(ray.train, "LoggingConfig"):
        options["logging_config"] = ray.train.LoggingConfig(log_level="INFO" if is_verbose() else "WARNING")
    return options


def train_denoiser(config: DenoiserConfig) -> str:
    """Trains on Ray Train with `config.workers` workers (in this process when 0); returns the URI of the
    best artifact."""
    if config.workers == 0:
        return fit_local(config)
    output = config.storage.open(config.output)
    init_ray()
    if config.objective == "decrop":  # generate the views once, as a Ray Data job; the workers read the cache
        decrop_views(config, prepare_training(config), generate_with_ray(gradient_spec(config), config.storage,
                                                                          actors=config.workers))
    checkpoints = CheckpointConfig(num_to_keep=2, checkpoint_score_attribute="selection_score",
                                   checkpoint_score_order="max")
    trainer = TorchTrainer(
        _train_loop, train_loop_config=config.to_dict(),
        scaling_config=ScalingConfig(num_workers=config.workers, use_gpu=config.use_gpu),
        run_config=RunConfig(name=config.run_name, storage_path=output.path, storage_filesystem=output.fs,
                             checkpoint_config=checkpoints,
                             failure_config=FailureConfig(max_failures=0, controller_failure_limit=1),
                             **_quiet_options(config)))
    result = trainer.fit()
    best = result.get_best_checkpoint("selection_score", "max") if result.best_checkpoints else result.checkpoint
    if best is None:
        raise RuntimeError(f"denoiser training {config.run_name} reported no checkpoint")
    uri = f"{urlparse(output.uri).scheme}://{best.path}" if output.is_s3 else best.path
    log.info("best denoiser (validation accuracy %s): %s", result.metrics.get("val_accuracy"), uri)
    return uri
