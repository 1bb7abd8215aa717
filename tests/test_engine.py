"""The engine's packing: counts equal a draw-by-draw computation, whatever the batch size (fixed or chosen
by the `auto` probe)."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from conftest import CountingModel, without_batch
from torch import nn

import pipeline
from pipeline.batch_probe import probe_batch_size
from pipeline.certifiers import SSN, Cohen, TopK
from pipeline.engine import Draws, Engine
from pipeline.noise import DRAWS_PER_BLOCK, gaussian_draws
from pipeline.votes import VoteCache


class SignOfMean(nn.Module):
    """Class = which of 3 bins the mean of the input falls in: sensitive to every noise value."""

    def forward(self, x):
        mean = x.flatten(1).mean(1)
        return torch.stack([-(mean - 0.45).abs(), -(mean - 0.5).abs(), -(mean - 0.55).abs()], dim=1)


def draw_by_draw(model, images, ids, seed, request):
    counts = np.zeros((len(images), 3), dtype=np.int64)
    for i, image in enumerate(images):
        eps = gaussian_draws(seed, ids[i], request.stage, 0, request.n, image.shape)
        for row in model(image + request.sigma * eps).argmax(1):
            counts[i, row] += 1
    return counts


@pytest.fixture
def images():
    torch.manual_seed(0)
    return torch.rand(5, 2, 3, 3)


@pytest.mark.parametrize("batch_size", [1, 7, DRAWS_PER_BLOCK, 100, 1000])
def test_counts_equal_a_draw_by_draw_loop(images, batch_size):
    ids = [f"img{i}" for i in range(len(images))]
    requests = [Draws("selection", 0.3, 37), Draws("estimation", 0.3, 150), Draws("estimation", 0.1, 90)]
    counts = Engine(SignOfMean(), batch_size=batch_size).session().count(images, ids, seed=3, requests=requests)
    for request in requests:
        expected = draw_by_draw(SignOfMean(), images, ids, 3, request)
        np.testing.assert_array_equal(counts[request], expected)
        assert counts[request].sum() == request.n * len(images)


def test_requests_on_one_stream_share_draws_and_fill_batches(images):
    ids = [f"img{i}" for i in range(len(images))]
    model = CountingModel(SignOfMean())
    small, large = Draws("estimation", 0.3, 40), Draws("estimation", 0.3, 200)
    selection = Draws("selection", 0.3, 10)
    counts = Engine(model, batch_size=64).session().count(images, ids, seed=0, requests=[small, large, selection])
    assert model.rows == len(images) * (200 + 10) + 1  # one probe of a clean image
    assert model.calls == 1 + -(-len(images) * 210 // 64)  # every batch full except the last
    np.testing.assert_array_equal(counts[small], draw_by_draw(SignOfMean(), images, ids, 0, small))


def test_streams_are_independent_and_seeded(images):
    shape = images.shape[1:]
    a = gaussian_draws(0, "x", "selection", 0, 10, shape)
    assert not torch.equal(a, gaussian_draws(0, "x", "estimation", 0, 10, shape))
    assert not torch.equal(a, gaussian_draws(1, "x", "selection", 0, 10, shape))
    assert not torch.equal(a, gaussian_draws(0, "y", "selection", 0, 10, shape))
    assert torch.equal(a, gaussian_draws(0, "x", "selection", 0, 10, shape))
    whole = gaussian_draws(0, "x", "selection", 0, 3 * DRAWS_PER_BLOCK, shape)
    pieces = [gaussian_draws(0, "x", "selection", a, b, shape) for a, b in [(0, 5), (5, 130), (130, 192)]]
    assert torch.equal(whole, torch.cat(pieces))


def test_draws_are_standard_normal():
    eps = gaussian_draws(0, "x", "estimation", 0, 2000, (3, 8, 8)).flatten().double()
    assert abs(eps.mean()) < 5 / np.sqrt(eps.numel())
    assert abs(eps.std() - 1) < 0.01


def test_bf16_runs_the_model_in_reduced_precision(images):
    seen = {}

    class Spy(SignOfMean):
        def forward(self, x):
            seen["dtype"] = torch.nn.functional.linear(x.flatten(1), torch.ones(1, x[0].numel())).dtype
            return super().forward(x)

    Engine(Spy(), precision="bf16").session().count(images, [str(i) for i in range(5)], 0, [Draws("s", 0.1, 10)])
    assert seen["dtype"] == torch.bfloat16


def test_bad_engine_settings_are_rejected():
    with pytest.raises(ValueError, match="batch_size"):
        Engine(SignOfMean(), batch_size=0)
    with pytest.raises(ValueError, match="precision"):
        Engine(SignOfMean(), precision="int8")
    with pytest.raises(ValueError, match="class scores"):
        Engine(nn.Identity()).num_classes(torch.rand(1, 2, 2))


def test_bf16_rounds_the_noisy_input_once_after_adding_the_noise(images):
    """The fused path: the model sees (x + sigma * eps) computed in fp32, then rounded to bf16."""
    seen = []

    class Spy(SignOfMean):
        def forward(self, x):
            seen.append(x.clone())
            return super().forward(x.float())

    ids = [str(i) for i in range(len(images))]
    Engine(Spy(), precision="bf16", batch_size=64).session().count(images, ids, 2, [Draws("s", 0.1, 10)])
    inputs = torch.cat(seen[1:])  # after the clean probe
    assert inputs.dtype == torch.bfloat16
    expected = torch.cat([(image + 0.1 * gaussian_draws(2, i, "s", 0, 10, image.shape)).to(torch.bfloat16)
                          for i, image in zip(ids, images, strict=True)])
    assert torch.equal(inputs, expected)


def test_channels_last_and_compile_run_the_same_classifier(images):
    """NHWC inputs and a compiled model (the eager backend, no compiler needed) give the same counts."""
    seen = {}

    class Spy(SignOfMean):
        def forward(self, x):
            seen["channels_last"] = x.is_contiguous(memory_format=torch.channels_last)
            return super().forward(x)

    ids = [str(i) for i in range(len(images))]
    requests = [Draws("s", 0.2, 300)]
    plain = Engine(SignOfMean(), batch_size=128).session().count(images, ids, 0, requests)
    engine = Engine(Spy(), batch_size=128, channels_last=True, compile="eager")
    fast = engine.session().count(images, ids, 0, requests)
    assert seen["channels_last"]
    np.testing.assert_array_equal(plain[requests[0]], fast[requests[0]])
    assert engine.settings() == {"precision": "fp32", "tf32": False, "channels_last": True, "compile": "eager",
                                 "batch": {"size": 128, "chosen_by": "config"}}


class OutOfMemoryAbove(nn.Module):
    """SignOfMean that runs out of memory on batches of more than `rows` rows, as a small GPU would."""

    def __init__(self, rows: int):
        super().__init__()
        self.rows, self.inner = rows, SignOfMean()

    def forward(self, x):
        if len(x) > self.rows:
            raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {len(x)} rows")
        return self.inner(x)


def test_auto_batch_size_gives_the_same_certificates_as_every_fixed_size(images):
    ids = [f"img{i}" for i in range(len(images))]
    certifiers = [Cohen(sigma=0.3, n0=20, n=300), TopK(sigma=0.3, k=2, n=300), SSN(sigma=0.3, n0=10, n=200),
                  Cohen(sigma=0.3, n0=20, n=2_000, mode="sequential", radii=[0.1, 0.3])]
    labels = [0, 1, 2, 1, 0]

    def rows(batch_size):
        table = pipeline.certify(SignOfMean(), images, labels, certifiers, image_ids=ids, seed=5,
                                 batch_size=batch_size).to_pandas()
        batch = [json.loads(params)["batch"] for params in table["params"]]
        table["params"] = table["params"].map(without_batch)
        return table.drop(columns=["wall_time_s"]), batch

    auto, batch = rows("auto")
    assert {entry["chosen_by"] for entry in batch} == {"probe"}
    assert str(batch[0]["size"]) in batch[0]["probe"]["draws_per_s"] and batch[0]["probe"]["seconds"] < 10
    for size in (1, 7, DRAWS_PER_BLOCK, 1000):
        fixed, batch = rows(size)
        assert batch[0] == {"size": size, "chosen_by": "config"}
        assert fixed.equals(auto), size


@pytest.mark.parametrize("fits", [1, 5, 100])
def test_a_probe_that_runs_out_of_memory_falls_back_to_a_smaller_batch(images, fits):
    ids = [f"img{i}" for i in range(len(images))]
    request = Draws("estimation", 0.3, 150)
    engine = Engine(OutOfMemoryAbove(fits))
    counts = engine.session().count(images, ids, seed=3, requests=[request])
    assert engine.batch_size <= fits and engine.probe["out_of_memory"] > fits
    np.testing.assert_array_equal(counts[request], draw_by_draw(SignOfMean(), images, ids, 3, request))

    def never_fits(rows):
        raise torch.OutOfMemoryError("CUDA out of memory")

    with pytest.raises(MemoryError, match="even one noisy copy per forward pass runs out of memory"):
        probe_batch_size(never_fits, torch.device("cuda"))
    with pytest.raises(ValueError, match="batch_size must be 'auto' or an integer"):
        Engine(SignOfMean(), batch_size="fast")


# A model whose activations take 3 MB per row, certified under an address-space limit of 40 MB more than it
# uses idle: the CPU allocator's own failure ("can't allocate memory"), not a simulated one.
UNDER_A_MEMORY_LIMIT = textwrap.dedent("""
    import json, resource, torch
    from torch import nn
    from pipeline.engine import Draws, Engine
    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = nn.Sequential(nn.Upsample(scale_factor=16), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 4)).eval()
    image, request = torch.rand(1, 3, 32, 32), Draws("estimation", 0.25, 200)
    engine = Engine(model)
    engine.logits(image)  # the thread pool and allocator, before the limit
    idle = int(next(line for line in open("/proc/self/status") if line.startswith("VmSize")).split()[1]) * 1024
    resource.setrlimit(resource.RLIMIT_AS, (idle + 40 * 2**20, resource.RLIM_INFINITY))
    limited = engine.session().count(image, ["x"], 0, [request])[request]
    resource.setrlimit(resource.RLIMIT_AS, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    one_row = Engine(model, batch_size=1).session().count(image, ["x"], 0, [request])[request]
    print(json.dumps({"probe": engine.probe, "limited": limited.tolist(), "one_row": one_row.tolist()}))
""")


def test_the_probe_falls_back_when_the_cpu_allocator_runs_out_under_a_memory_limit():
    # a fixed mmap threshold: freed activations go back to the system, so what fits is what the probe saw
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    done = subprocess.run([sys.executable, "-c", UNDER_A_MEMORY_LIMIT], capture_output=True, text=True, env=env,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    probe = result["probe"]
    assert probe["out_of_memory"] is not None and probe["size"] < probe["out_of_memory"] <= 64, probe
    assert result["limited"] == result["one_row"]


def test_each_session_keeps_its_own_record_and_only_the_cache_it_is_given_carries_votes(images):
    """A session records what it ran and nothing else does: a second session on the same engine starts
    from zero, answers from the votes a first one kept only when it is given the same cache, and leaves
    the first one's record as it was."""
    ids = [f"img{i}" for i in range(len(images))]
    request = Draws("estimation", 0.3, 100)
    engine = Engine(SignOfMean(), batch_size=64)
    votes = VoteCache({request.stream: [request.n]})
    first = engine.session(votes)
    counted = first.count(images, ids, 0, [request])
    assert first.forward_passes == len(images) * 100 and first.reused == {} and first.seconds > 0
    again = engine.session(votes)
    answered = again.count(images, ids, 0, [request])
    np.testing.assert_array_equal(answered[request], counted[request])
    assert again.forward_passes == 0 and again.reused == {(image_id, request.stream): 100 for image_id in ids}
    assert all(again.shared_passes(image_id) == 100 for image_id in ids)
    fresh = engine.session()
    np.testing.assert_array_equal(fresh.count(images, ids, 0, [request])[request], counted[request])
    assert fresh.forward_passes == len(images) * 100 and fresh.reused == {}
    assert first.forward_passes == len(images) * 100 and first.reused == {}
    assert not first.nonfinite and not again.nonfinite and not fresh.nonfinite
