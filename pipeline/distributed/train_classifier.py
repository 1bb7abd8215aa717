"""Classifier training over Ray Train: the loop of `pipeline.train_classifier` on every TorchTrainer worker.

DDP across `workers` workers (gloo on CPU, NCCL with `use_gpu`); each worker trains on its shard of every
epoch's permutation, and rank 0 writes the checkpoint in the published layout to `output` (a directory or
s3://) after every epoch. Ray Train's own run state goes to `<output>/ray/`.
"""

from __future__ import annotations

import logging

import ray.train
import ray.train.torch
from ray.train import FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from pipeline.distributed import init_ray
from pipeline.train_classifier import ClassifierTraining, fit, fit_local

log = logging.getLogger(__name__)

__all__ = ["train_classifier"]


def _train_loop(config_dict: dict) -> None:
    config = ClassifierTraining.from_dict(config_dict)
    context = ray.train.get_context()
    fit(config, lambda metrics: ray.train.report(metrics), rank=context.get_world_rank(),
        world_size=context.get_world_size(), prepare=ray.train.torch.prepare_model,
        device=str(ray.train.torch.get_device()))


def train_classifier(config: ClassifierTraining) -> str:
    """Trains on Ray Train with `config.workers` workers (in this process when 0); returns the URI of the
    checkpoint."""
    if config.workers == 0:
        return fit_local(config)
    output = config.storage.open(config.output)
    init_ray()
    trainer = TorchTrainer(
        _train_loop, train_loop_config=config.to_dict(),
        scaling_config=ScalingConfig(num_workers=config.workers, use_gpu=config.use_gpu),
        run_config=RunConfig(name="ray", storage_path=output.path, storage_filesystem=output.fs,
                             failure_config=FailureConfig(max_failures=0)))
    result = trainer.fit()
    log.info("trained %s: %s", config.arch, result.metrics)
    return output.join("checkpoint.pth.tar").uri
