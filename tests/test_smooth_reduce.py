"""Smooth-Reduce: the reference radius is unsound, ours hold; patch plans; the resize norm; Cohen as a case."""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.stats import norm
from torch import nn

import pipeline
from pipeline.certifiers import Cohen, SmoothReduce, smooth_reduce
from pipeline.data.demo import load_demo
from pipeline.models import load_demo_model


class PatchLinear(nn.Module):
    """Two logits [-s, s], s = w . patch + b, for 1 x 4 x 4 patches."""

    def __init__(self, w, b):
        super().__init__()
        self.register_buffer("w", w)
        self.b = b

    def forward(self, x):
        score = x.flatten(1) @ self.w + self.b
        return torch.stack([-score, score], dim=1)


def test_reference_radius_is_violated_while_both_sound_modes_hold():
    """Spec §2.3 as a test. 6x6 image, nine 4x4 grid patches, logits averaged, a linear base model. Both
    smoothed classifiers predict sign(mu(x)), mu(x) = mean_i (w . P_i x) + b, so the true input-space radius
    is |mu(x)| / ||u||, u = mean_i P_i^T w. The reference radius (independent noise, Cohen's formula as it
    is) exceeds it, and a perturbation inside it flips the smoothed prediction; ours stay below it."""
    sigma, truth = 0.5, 0.3
    w = torch.ones(16, dtype=torch.float64)
    corners = smooth_reduce.patch_corners(6, 4, None)
    u = torch.zeros(6, 6, dtype=torch.float64)
    for row, column in corners:
        u[row:row + 4, column:column + 4] += w.view(4, 4) / len(corners)
    x = torch.full((1, 1, 6, 6), 0.5, dtype=torch.float64)
    mu_without_bias = float((u * x[0, 0]).sum())
    bias = truth * float(u.norm()) - mu_without_bias  # so that mu(x) = truth * ||u||
    model = PatchLinear(w.float(), bias)
    settings = {"sigma": sigma, "patch_size": 4, "scores": "logits", "reduce": "mean", "n0": 100, "n": 2000}
    rows = pipeline.certify(model, x.float(), [1], [SmoothReduce(noise="independent", **settings),
                                                    SmoothReduce(noise="shared", **settings)]).to_pylist()
    independent, shared = rows
    assert independent["prediction"] == shared["prediction"] == 1

    reference = json.loads(independent["params"])["uncorrected_radius"]
    assert json.loads(independent["params"])["max_multiplicity"] == 9
    assert reference > truth  # the reference code's certificate overstates the radius...
    delta = -1.01 * truth * u / u.norm()
    assert float(delta.norm()) < reference
    mu_moved = float((u * (x[0, 0] + delta)).sum()) + bias
    assert mu_moved < 0  # ...and a perturbation inside it flips the smoothed prediction
    p_moved = norm.cdf(mu_moved * math.sqrt(9) / (sigma * float(w.norm())))
    assert p_moved < 0.5

    assert 0 < independent["radius"] <= truth
    assert 0 < shared["radius"] <= truth
    assert independent["radius"] == pytest.approx(reference / 3)


def test_grid_and_random_patch_plans():
    grid = smooth_reduce.patch_corners(36, 32, None)
    assert len(grid) == 25 and grid[:6].tolist() == [[0, 0], [0, 1], [0, 2], [0, 3], [0, 4], [1, 0]]
    assert smooth_reduce.multiplicity(36, 32, grid) == 25
    strided = smooth_reduce.patch_corners(36, 32, None, stride=2)
    assert strided.tolist() == [[r, c] for r in (0, 2, 4) for c in (0, 2, 4)]
    assert len(smooth_reduce.patch_corners(36, 32, 10)) == 10

    random = smooth_reduce.patch_corners(36, 32, 50, placement="random", seed=3)
    assert random.shape == (50, 2) and random.min() >= 0 and random.max() <= 4
    assert np.array_equal(random, smooth_reduce.patch_corners(36, 32, 50, placement="random", seed=3))
    assert not np.array_equal(random, smooth_reduce.patch_corners(36, 32, 50, placement="random", seed=4))
    duplicated = np.array([[0, 0], [0, 0], [4, 4]])
    assert smooth_reduce.multiplicity(36, 32, duplicated) == 3  # the centre is in all three, duplicates counted
    assert smooth_reduce.multiplicity(36, 32, np.array([[0, 0], [0, 0]])) == 2


def test_extraction_matches_unfold():
    images = torch.rand(2, 3, 9, 9)
    corners = torch.as_tensor(smooth_reduce.patch_corners(9, 5, None, stride=2))
    patches = smooth_reduce.extract(images, corners.expand(2, -1, -1), 5)
    unfolded = F.unfold(images, kernel_size=5, stride=2).view(2, 3, 5, 5, -1).permute(0, 4, 1, 2, 3)
    torch.testing.assert_close(patches, unfolded)


def test_resize_operator_norm_matches_a_dense_computation():
    basis = torch.eye(16, dtype=torch.float64).view(16, 1, 4, 4)
    dense = F.interpolate(basis, size=(6, 6), mode="bilinear", align_corners=False).view(16, 36).T
    assert smooth_reduce.resize_operator_norm(4, 4, 6) == pytest.approx(np.linalg.norm(dense.numpy(), 2), rel=1e-9)
    assert smooth_reduce.resize_operator_norm(32, 32, None) == 1.0
    assert smooth_reduce.resize_operator_norm(32, 32, 36) > 1.0


@pytest.mark.parametrize("noise", ["shared", "independent"])
def test_one_whole_patch_without_resize_is_cohen(noise):
    images, labels, ids = load_demo("test")
    images, labels, ids = images[:4].float() / 255, labels[:4], ids[:4]
    rows = pipeline.certify(load_demo_model(), images, labels,
                            [Cohen(sigma=0.25, n0=50, n=300, gaussian="sound" if noise == "shared" else "real"),
                             SmoothReduce(sigma=0.25, patch_size=32, n0=50, n=300, noise=noise, scores="logits")],
                            image_ids=ids, batch_size=256).to_pylist()
    for cohen, reduced in zip(rows[::2], rows[1::2], strict=True):
        assert (reduced["prediction"], reduced["count"]) == (cohen["prediction"], cohen["count"])
        assert reduced["radius"] == pytest.approx(cohen["radius"], rel=1e-12)
        assert reduced["noise"] == cohen["noise"] == ("sound_gaussian" if noise == "shared" else "gaussian")


def test_invalid_settings_give_clear_errors():
    model = PatchLinear(torch.ones(16), 0.0)
    with pytest.raises(ValueError, match=r"patch_size=8 is larger than the \(resized\) image, 6x6"):
        pipeline.certify(model, torch.rand(1, 1, 6, 6), None, [SmoothReduce(sigma=0.5, patch_size=8)])
    with pytest.raises(ValueError, match="num_patches must be an integer >= 1"):
        SmoothReduce(sigma=0.5, patch_size=4, num_patches=0)
    with pytest.raises(ValueError, match="reduce must be one of"):
        SmoothReduce(sigma=0.5, patch_size=4, reduce="median")
    with pytest.raises(ValueError, match="num_patches=30 but the grid at stride 1 has only 9 patches"):
        pipeline.certify(model, torch.rand(1, 1, 6, 6), None, [SmoothReduce(sigma=0.5, patch_size=4, num_patches=30)])
    with pytest.raises(ValueError, match="random placement needs num_patches"):
        SmoothReduce(sigma=0.5, patch_size=4, placement="random")


class PatchBrightness(nn.Module):
    """Class 0 for a bright 4x4 patch (mean above 1/2), class 1 for a dark one."""

    def forward(self, x):
        score = 40 * (x.flatten(1).mean(dim=1) - 0.5)
        return torch.stack([score, -score], dim=1)


def test_random_placement_is_one_classifier_for_every_input():
    """An 8x8 image bright on the left, dark on the right; one random 4x4 patch decides the class. The
    placement belongs to the smoothed classifier, so x and its neighbours one gray level away (well inside
    the certified radius) must be certified with the same patches and never as different classes. Corners
    that followed the pixels (the default image id is their hash) certified neighbours as the other class.
    A neighbour certified otherwise needs a wrong certificate (x's or its own): probability
    <= 41 * alpha per seed, 8 seeds, alpha = 1e-9, so the test's false-alarm rate is < 4e-7."""
    image = torch.zeros(1, 1, 8, 8)
    image[..., :4] = 1.0
    pixels = [(row, column) for row in range(8) for column in range(8)][::3][:40]
    neighbours = image.repeat(len(pixels), 1, 1, 1)
    for index, (row, column) in enumerate(pixels):
        neighbours[index, 0, row, column] += -1 / 255 if column < 4 else 1 / 255
    images = torch.cat([image, neighbours])
    certifier = SmoothReduce(sigma=0.25, alpha=1e-9, patch_size=4, num_patches=1, placement="random", n0=50, n=500)
    compared, plans = 0, []
    for seed in range(8):
        rows = pipeline.certify(PatchBrightness(), images, None, [certifier], seed=seed, batch_size=512).to_pylist()
        centre, others = rows[0], rows[1:]
        if not centre["abstained"]:
            assert centre["radius"] > 1 / 255
            compared += 1
            assert {row["prediction"] for row in others if not row["abstained"]} <= {centre["prediction"]}
        plans.append({json.dumps(json.loads(row["params"])["patch_corners"]) for row in rows})
    assert compared >= 4
    assert all(len(plan) == 1 for plan in plans)
    assert json.loads(rows[0]["params"])["placement_seed"] == seed
