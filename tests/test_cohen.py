"""Cohen's CERTIFY and PREDICT on counts, and soundness on a classifier whose smoothed radius is known."""

import numpy as np
import pytest
import torch
from scipy import stats as sps
from scipy.stats import norm

import pipeline
from pipeline import stats
from pipeline.certifiers import Cohen, TopK, cohen


def test_certify_uses_the_selection_top_class_and_the_fresh_estimation_count():
    selection = np.array([3, 90, 7])
    estimation = np.array([500, 9400, 100])
    prediction, radius = cohen.certify_from_counts(selection, estimation, sigma=0.5, alpha=0.001)
    p_lower = sps.beta.ppf(0.001, 9400, 10_000 - 9400 + 1)
    assert prediction == 1
    assert radius == pytest.approx(0.5 * norm.ppf(p_lower), rel=1e-12)


def test_certify_abstains_unless_the_lower_bound_exceeds_one_half():
    # 5100 of 10,000: p_hat > 1/2, but the 0.999 lower bound (0.4946) is below it.
    assert cohen.certify_from_counts([0, 100], [4900, 5100], sigma=0.25, alpha=0.001) == (-1, 0.0)
    # the selection picks class 0, whose estimation count is small: abstain, not a switch to class 1
    assert cohen.certify_from_counts([60, 40], [10, 9990], sigma=0.25, alpha=0.001) == (-1, 0.0)


def test_largest_radius_is_reached_when_every_draw_agrees():
    for n, multiple in [(100_000, 3.81), (10_000, 3.20), (1_000, 2.46)]:
        _, radius = cohen.certify_from_counts([100, 0], [n, 0], sigma=1.0, alpha=0.001)
        assert radius == pytest.approx(norm.ppf(0.001 ** (1 / n)), rel=1e-9)
        assert radius == pytest.approx(cohen.max_radius(1.0, n, 0.001), rel=1e-9)
        assert radius == pytest.approx(multiple, abs=0.005)
        assert cohen.max_radius(0.25, n, 0.001) == pytest.approx(0.25 * radius, rel=1e-9)


def test_predict_runs_the_binomial_test_on_the_top_two():
    assert cohen.predict_from_counts([10, 70, 20], alpha=0.001) == 1
    assert cohen.predict_from_counts([45, 55, 0], alpha=0.001) == -1


def test_certified_radius_never_exceeds_the_linear_classifiers_true_radius_too_often(linear_binary):
    """A binary linear f smoothed with Gaussian noise has robust radius |w.x + b| / ||w|| exactly.

    Each certificate overstates it (or names the wrong class) with probability <= alpha, independently
    across images. Over m images the failures are at most Binomial(m, alpha); the test fails when they
    exceed its 1 - 1e-6 quantile, so its own false-alarm rate is below 1e-6. A point-estimate radius
    (no confidence bound) fails the same check, which shows the check has power.
    """
    torch.manual_seed(0)
    m, sigma, alpha, n = 300, 0.25, 0.05, 400
    w = torch.randn(1, 4, 4)
    w = w / w.norm()
    model = linear_binary(w, b=-float(w.sum()) * 0.5)  # the boundary passes through the grey image
    offsets = torch.empty(m).uniform_(-0.5, 0.5) * (0.5 / w.abs().max())
    images = (0.5 + offsets[:, None, None, None] * w + 0.02 * torch.randn(m, 1, 4, 4)).clamp(0, 1)
    margin = model.margin(images)
    true_class = (margin > 0).long()
    true_radius = (margin.abs() / w.norm()).numpy()

    table = pipeline.certify(model, images, true_class, [Cohen(sigma=sigma, n0=20, n=n, alpha=alpha),
                                                         TopK(k=1, sigma=sigma, n=n, alpha=alpha)], seed=1)
    threshold = sps.binom.ppf(1 - 1e-6, m, alpha)
    for name in ("cohen", "topk"):
        rows = table.filter(table["certifier"].to_numpy(zero_copy_only=False) == name).to_pandas()
        certified = ~rows.abstained.to_numpy()
        wrong = rows.prediction.to_numpy() != true_class.numpy()
        failures = certified & (wrong | (rows.radius.to_numpy() > true_radius))
        assert certified.sum() > m / 2, name  # the check is not vacuous
        assert failures.sum() <= threshold, (name, failures.sum(), threshold)

    rows = table.filter(table["certifier"].to_numpy(zero_copy_only=False) == "cohen").to_pandas()
    naive_radius = sigma * norm.ppf(np.clip(rows["count"].to_numpy() / n, 0, 1 - 1e-12))
    naive_failures = (naive_radius > true_radius) & (rows["count"].to_numpy() / n > 0.5)
    assert naive_failures.sum() > threshold


def test_abstention_follows_the_spec_conventions(linear_binary):
    model = linear_binary(torch.ones(1, 2, 2), b=-2.0)
    images = torch.full((1, 1, 2, 2), 0.5)  # exactly on the boundary: p_A = 1/2
    row = pipeline.certify(model, images, None, [Cohen(sigma=0.5, n0=100, n=2000)]).to_pylist()[0]
    assert row["abstained"] and row["prediction"] == -1 and row["radius"] == 0.0
    assert row["correct"] is None and row["label"] is None
    assert stats.clopper_pearson_lower(row["count"], 2000, 0.001) == pytest.approx(row["p_lower"])
