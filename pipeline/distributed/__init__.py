"""The Ray layer: certification over Ray Data, denoiser training over Ray Train, sweeps over Ray Tune.
It wires the library to Ray and adds no math and no run bookkeeping."""

from __future__ import annotations

import os

if not os.environ.get("RAY_ADDRESS"):
    # No cluster named, so a local instance: Ray's single-host mode (read when Ray is imported, inherited by
    # the processes Ray starts) binds every one of its servers to 127.0.0.1 instead of every interface.
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import ray

__all__ = ["init_ray"]


def init_ray() -> None:
    """Joins the cluster named by RAY_ADDRESS (as under `ray job submit`), or starts a local instance with at
    least 4 logical CPUs, so that read and write tasks keep running beside the actors, listening on
    127.0.0.1 only."""
    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=True)
    else:
        ray.init(num_cpus=max(4, os.cpu_count() or 1))
