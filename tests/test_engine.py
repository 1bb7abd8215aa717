"""The engine's packing: counts equal a draw-by-draw computation, whatever the batch size."""

import numpy as np
import pytest
import torch
from torch import nn

from pipeline.engine import Draws, Engine
from pipeline.noise import DRAWS_PER_BLOCK, gaussian_draws


class SignOfMean(nn.Module):
    """Class = which of 3 bins the mean of the input falls in: sensitive to every noise value."""

    def forward(self, x):
        mean = x.flatten(1).mean(1)
        return torch.stack([-(mean - 0.45).abs(), -(mean - 0.5).abs(), -(mean - 0.55).abs()], dim=1)


class CountingModel(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner, self.rows, self.calls = inner, 0, 0

    def forward(self, x):
        self.rows += len(x)
        self.calls += 1
        return self.inner(x)


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
    counts = Engine(SignOfMean(), batch_size=batch_size).count(images, ids, seed=3, requests=requests)
    for request in requests:
        expected = draw_by_draw(SignOfMean(), images, ids, 3, request)
        np.testing.assert_array_equal(counts[request], expected)
        assert counts[request].sum() == request.n * len(images)


def test_requests_on_one_stream_share_draws_and_fill_batches(images):
    ids = [f"img{i}" for i in range(len(images))]
    model = CountingModel(SignOfMean())
    small, large = Draws("estimation", 0.3, 40), Draws("estimation", 0.3, 200)
    selection = Draws("selection", 0.3, 10)
    counts = Engine(model, batch_size=64).count(images, ids, seed=0, requests=[small, large, selection])
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

    Engine(Spy(), precision="bf16").count(images, [str(i) for i in range(5)], 0, [Draws("s", 0.1, 10)])
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
    Engine(Spy(), precision="bf16", batch_size=64).count(images, ids, 2, [Draws("s", 0.1, 10)])
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
    plain = Engine(SignOfMean(), batch_size=128).count(images, ids, 0, requests)
    engine = Engine(Spy(), batch_size=128, channels_last=True, compile="eager")
    fast = engine.count(images, ids, 0, requests)
    assert seen["channels_last"]
    np.testing.assert_array_equal(plain[requests[0]], fast[requests[0]])
    assert engine.settings() == {"precision": "fp32", "channels_last": True, "compile": "eager"}
