"""The engine runs what its record says: `compile` compiles once (one static shape, whatever the images,
the certifiers, the probe or the partial last batch) and falls back to eager in one line when compilation
fails; `fp32` is IEEE float32 inside the forward even when the process enables TF32."""

import json
import logging

import torch
from torch import nn

import pipeline
from pipeline.certification import certify_rows
from pipeline.certifiers import Cohen, TopK
from pipeline.engine import Engine
from pipeline.models import ModelSpec, load_model


class CountingBackend:
    """A torch.compile backend that counts its compilations and runs the captured graph as it is."""

    __name__ = "counting"

    def __init__(self):
        self.compilations = 0

    def __call__(self, graph, example_inputs):
        self.compilations += 1
        return graph.forward


def failing_backend(graph, example_inputs):
    raise RuntimeError("no C++ compiler found")


def digits(count: int) -> torch.Tensor:
    return torch.linspace(0.2, 0.8, count).view(count, 1, 1, 1).expand(count, 3, 32, 32).contiguous()


def params(table) -> list[dict]:
    return [json.loads(text) for text in table["params"].to_pylist()]


def test_a_compiled_run_compiles_once_through_the_probe_partial_batches_and_later_calls():
    torch._dynamo.reset()
    backend, model = CountingBackend(), load_model(ModelSpec())
    certifiers = [Cohen(sigma=0.25, n0=30, n=170), TopK(sigma=0.25, k=2, n=170)]
    engine = Engine(model, batch_size="auto", compile=backend)
    first = certify_rows(engine, digits(5), [0, 1, 2, 3, 4], certifiers, seed=0)
    again = certify_rows(engine, digits(3), None, certifiers[:1], seed=1)
    assert backend.compilations == 1
    assert engine.batch_size not in (200, 1000)  # 5 x (30 + 170) draws: the last batch of each call is partial
    eager = pipeline.certify(model, digits(5), [0, 1, 2, 3, 4], certifiers, batch_size=engine.batch_size)
    assert [row["count"] for row in first] == eager["count"].to_pylist()  # the same counts as eager
    assert all(json.loads(row["params"])["compile"] == "counting" for row in first + again)


def test_a_failing_compilation_falls_back_to_eager_in_one_line_and_the_rows_say_so(caplog):
    torch._dynamo.reset()
    model = load_model(ModelSpec())
    with caplog.at_level(logging.WARNING, logger="pipeline.engine"):
        table = pipeline.certify(model, digits(2), [0, 1], [Cohen(sigma=0.25, n0=20, n=100)], batch_size=64,
                                 compile=failing_backend)
    warnings = [record.getMessage() for record in caplog.records if record.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "compile failed, running the model eager" in warnings[0]
    assert "no C++ compiler found" in warnings[0] and "\n" not in warnings[0]
    assert set(table["status"].to_pylist()) == {"ok"}
    recorded = params(table)
    assert all(p["compile"] is False and "no C++ compiler found" in p["compile_error"] for p in recorded)
    eager = pipeline.certify(model, digits(2), [0, 1], [Cohen(sigma=0.25, n0=20, n=100)], batch_size=64)
    assert table["count"].to_pylist() == eager["count"].to_pylist()


class FlagsSeen(nn.Module):
    """Two class scores; records the float32 math flags in force during each forward pass."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, x):
        self.seen.append((torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
                          torch.get_float32_matmul_precision()))
        mean = x.flatten(1).mean(dim=1)
        return torch.stack([mean, 1 - mean], dim=1)


def test_fp32_runs_without_tf32_inside_the_forward_whatever_the_global_flags_and_tf32_with_it():
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
             torch.get_float32_matmul_precision())
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        torch.set_float32_matmul_precision("high")
        for precision, inside in (("fp32", (False, False, "highest")), ("bf16", (False, False, "highest")),
                                  ("tf32", (True, True, "high"))):
            model = FlagsSeen()
            table = pipeline.certify(model, digits(2), None, [Cohen(sigma=0.25, n0=10, n=50)], batch_size=16,
                                     precision=precision)
            assert model.seen and set(model.seen) == {inside}, precision
            assert all(p["precision"] == precision and p["tf32"] is False for p in params(table))  # no GPU here
            assert torch.backends.cudnn.allow_tf32 and torch.get_float32_matmul_precision() == "high"  # restored
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved[:2]
        torch.set_float32_matmul_precision(saved[2])


def test_a_resumed_run_reuses_the_batch_size_its_first_attempt_chose(tmp_path):
    """The first attempt probes (batch_size auto) and is killed after one file; the rerun's workers take
    the recorded size instead of probing again, so on a GPU its counts match an uninterrupted run's."""
    import warnings

    import numpy as np

    from pipeline import run as lifecycle
    from pipeline.config import validate
    from pipeline.data.preprocess import decode_batch

    config = validate({"certifiers": [{"name": "cohen", "sigma": 0.25, "n0": 10, "n": 60}], "output": str(tmp_path),
                       "run_id": "r", "dataset": {"layout": "demo", "max": 4}, "batch_size": "auto"})
    model = load_model(config.model)

    def certify_first(run, count: int) -> int:
        engine = lifecycle.engine_for(config, model, "cpu", run.batch_sizes)
        batch = decode_batch(run.pending.slice(0, count).to_pydict(), config.dataset.transform)
        batch["pixels"].setflags(write=False)  # as Ray hands batches over
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # torch's "NumPy array is not writable" warning among them
            table = lifecycle.certify_batch(engine, run.certifiers, batch, config.seed, {**run.info, "node": "n"})
        run.results.write_parquet(lifecycle.batch_file(batch["image_id"]), table)
        assert {json.loads(p)["batch"]["size"] for p in table["params"].to_pylist()} == {engine.batch_size}
        return engine

    first = lifecycle.prepare(config)
    assert first.batch_sizes == {}
    probed = certify_first(first, 2)
    assert probed.probe is not None
    first.lease.release()  # the first attempt is killed here
    second = lifecycle.prepare(config)
    assert second.batch_sizes == {"cpu/fp32": probed.batch_size}
    assert json.loads((tmp_path / "r" / "manifest.json").read_text())["batch_sizes"] == second.batch_sizes
    reused = certify_first(second, 2)
    assert reused.probe is None and reused.batch_size == probed.batch_size
    assert reused.settings()["batch"] == {"size": probed.batch_size, "chosen_by": "earlier attempt"}
    summary = lifecycle.finish(second, {"certified": 2, "failed": 0})
    assert summary.status == "finished" and np.all(np.asarray(summary.results["status"]) == "ok")


def test_gpu_actors_ask_ray_for_their_gpus_the_way_that_draws_no_experimental_warning():
    """Ray Data warns ("Specifying both num_cpus and num_gpus for map tasks is experimental") when a map
    stage names both; the pool names GPUs alone for GPU actors and CPUs alone for CPU actors."""
    from ray.data._internal.execution.operators import map_operator

    from pipeline.config import validate
    from pipeline.distributed.certify import pool_resources

    config = validate({"certifiers": [{"name": "cohen", "sigma": 0.25}], "actors": {"gpus": 1, "cpus": 4}})
    assert pool_resources(config, 1.0) == {"num_gpus": 1.0}
    assert pool_resources(config, 0.0) == {"num_cpus": 4}
    warned = []

    class Seen(logging.Handler):
        def emit(self, record):
            warned.append(record.getMessage())

    handler = Seen(logging.WARNING)
    map_operator.logger.addHandler(handler)  # Ray's loggers do not propagate to pytest's
    try:
        map_operator._canonicalize_ray_remote_args(pool_resources(config, 1.0))
        assert not warned
        map_operator._canonicalize_ray_remote_args({"num_cpus": 4, "num_gpus": 1.0})  # what the pool asked before
        assert any("experimental" in message for message in warned)
    finally:
        map_operator.logger.removeHandler(handler)
