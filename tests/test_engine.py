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
