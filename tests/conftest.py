"""Shared fixtures: paths to the reference data, and small models with known behaviour."""

from __future__ import annotations

import json
import os
import struct
import zlib
from pathlib import Path

import pytest
import torch
from torch import nn

REFERENCE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "reference"


def pytest_configure(config):
    config.addinivalue_line("markers", "faults: the fault matrix (kills, outages, concurrent runs); `make test-faults`")
    if os.environ.get("PYTEST_XDIST_WORKER"):  # two test processes (and their Ray workers) share the cores:
        torch.set_num_threads(1)  # one thread each, or waiting threads spin and slow everything many times over


@pytest.fixture(scope="session")
def reference() -> Path:
    if not REFERENCE.is_dir():
        pytest.fail(f"reference data not found at {REFERENCE}; the project expects ../shared beside it")
    return REFERENCE


class LinearBinary(nn.Module):
    """f(x) = 1[w.x + b > 0] as two logits; its Gaussian-smoothed classifier has robust radius |w.x + b| / ||w||."""

    def __init__(self, w: torch.Tensor, b: float):
        super().__init__()
        self.register_buffer("w", w.flatten().float())
        self.b = float(b)

    def margin(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1) @ self.w + self.b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        score = self.margin(x)
        return torch.stack([-score, score], dim=1)


def without_batch(params: str) -> str:
    """A row's params without the engine's batch size (which changes only the speed, never a certificate)."""
    return json.dumps({key: value for key, value in json.loads(params).items() if key != "batch"}, sort_keys=True)


def png_header(width: int, height: int) -> bytes:
    """A PNG that declares width x height 8-bit RGB pixels and holds none: enough for a decoder to see its size."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


@pytest.fixture
def linear_binary() -> type[LinearBinary]:
    return LinearBinary


class CountingModel(nn.Module):
    """Wraps a model and counts the rows (inputs) and the calls of its forward: the passes really run."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner, self.rows, self.calls = inner, 0, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.rows += len(x)
        self.calls += 1
        return self.inner(x)


class Affine(nn.Module):
    """Class scores W x + b on flattened inputs (buffers, so .float() / .double() convert them)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor):
        super().__init__()
        self.register_buffer("weight", weight)
        self.register_buffer("bias", bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1) @ self.weight.T + self.bias


@pytest.fixture(scope="session")
def s3_endpoint():
    """A local S3-compatible server (moto) on 127.0.0.1, with dummy credentials in the environment."""
    from moto.server import ThreadedMotoServer

    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture(scope="session")
def ray_cluster(s3_endpoint):
    """A local Ray instance with 4 logical CPUs, shared by the tests (started after the S3 credentials are set,
    so workers inherit them)."""
    import ray

    ray.init(num_cpus=4, log_to_driver=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture
def kill_actors(ray_cluster):
    """kill_actors(name) SIGKILLs the worker processes of the live actors of this Ray instance whose class
    contains `name`, and returns how many it killed: only this instance's, so fault tests can run side by side."""
    import signal

    from ray.util.state import list_actors

    def kill(name: str) -> int:
        pids = {actor.pid for actor in list_actors(ray_cluster, [("state", "=", "ALIVE")], limit=10_000)
                if name in actor.class_name}
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        return len(pids)

    return kill
