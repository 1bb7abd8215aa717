"""Top-k certification: the authors' own radii, Cohen's closed forms at k = 1, and the root's side."""

import math

import numpy as np
import pytest
import torch
from conftest import Affine
from scipy.special import ndtr
from scipy.stats import multivariate_normal, norm

import pipeline
from pipeline import stats
from pipeline.certifiers import topk


def read_reference(reference):
    counts = np.loadtxt(reference / "topk" / "cifar10_sigma0.25_counts.txt", dtype=np.int64)
    radii = np.loadtxt(reference / "topk" / "cifar10_sigma0.25_top3_radius.tsv", skiprows=1, usecols=1, dtype=str)
    return counts, radii


def last_digit_unit(printed: str) -> float:
    """One unit of the last digit of a number printed with Python's '{:.3}'."""
    value = float(printed)
    return 1e-3 if value == 0 else 10.0 ** (math.floor(math.log10(abs(value))) - 2)


def test_reproduces_every_row_of_the_authors_top3_radii(reference):
    counts, printed = read_reference(reference)
    assert len(counts) == len(printed) == 500
    for row, expected in zip(counts, printed, strict=True):
        radius = topk.radius_from_counts(row[:10], int(row[10]), k=3, sigma=0.25, alpha=0.001, bound="simuem")
        if float(expected) == 0.0:
            assert radius == 0.0, (row, expected)
        else:
            assert abs(radius - float(expected)) <= last_digit_unit(expected), (row, expected, radius)


def test_k1_simuem_is_cohens_two_class_radius(reference):
    counts, _ = read_reference(reference)
    sigma, alpha = 0.25, 0.001
    for row in counts[:100]:
        label = int(row[10])
        lower, upper = stats.simultaneous_bounds(row[:10], alpha, "simuem")
        p_a = lower[label]
        p_b = min(np.delete(upper, label).max(), 1 - p_a)
        expected = max(0.0, sigma / 2 * (norm.ppf(p_a) - norm.ppf(p_b))) if p_a > p_b else 0.0
        radius = topk.radius_from_counts(row[:10], label, k=1, sigma=sigma, alpha=alpha, bound="simuem")
        assert expected - 1e-5 <= radius <= expected + 1e-12


def test_k1_binocp_is_cohens_certify_radius(reference):
    counts, _ = read_reference(reference)
    sigma, alpha = 0.25, 0.001
    for row in counts[:100]:
        label = int(row[10])
        p_a = stats.clopper_pearson_lower(row[label], row[:10].sum(), alpha)
        expected = sigma * norm.ppf(p_a) if p_a > 0.5 else 0.0
        radius = topk.radius_from_counts(row[:10], label, k=1, sigma=sigma, alpha=alpha, bound="binocp")
        assert expected - 1e-5 <= radius <= expected + 1e-12


@pytest.mark.parametrize("sigma", [1.0, 4.0, 12.0])
def test_no_cap_on_the_radius(sigma):
    counts = np.array([100_000, 0, 0, 0, 0])
    radius = topk.radius_from_counts(counts, 0, k=2, sigma=sigma, alpha=0.001)
    at_least_cohen = sigma * norm.ppf(stats.clopper_pearson_lower(100_000, 100_000, 0.001 / 5))
    assert radius >= at_least_cohen - 1e-5
    assert radius > 3.8 * sigma


def test_radius_is_the_lower_side_of_the_root():
    # At the returned radius the certification inequality still holds for some t; just beyond it, for none.
    counts, label, k, sigma, alpha = np.array([4000, 3000, 2500, 400, 100]), 1, 2, 0.5, 0.001
    radius = topk.radius_from_counts(counts, label, k, sigma, alpha)
    p_lower, upper = topk.label_bounds(counts, label, alpha)
    sets = np.minimum(np.cumsum(np.sort(upper)[-k:]), 1 - p_lower)

    def holds(r):
        return any(ndtr(norm.ppf(p_lower) - r / sigma) >= ndtr(norm.ppf(sets[t - 1]) + r / sigma) / t
                   for t in range(1, k + 1))

    assert radius > 0
    assert holds(radius)
    assert not holds(radius + 2e-5)


def test_top_k_predict_runs_consecutive_binomial_tests():
    assert topk.predict_from_counts(np.array([5000, 3000, 1500, 500]), k=2, alpha=0.001) == [0, 1]
    assert topk.predict_from_counts(np.array([5000, 3000, 2990, 10]), k=2, alpha=0.001) is None  # 2nd vs 3rd
    assert topk.predict_from_counts(np.array([10, 5000, 0, 3000]), k=1, alpha=0.001) == [1]


@pytest.mark.parametrize("k", [0, 5, 6])
def test_k_outside_the_classes_is_rejected(k):
    with pytest.raises(ValueError, match="k must"):
        topk.radius_from_counts(np.array([10, 5, 3, 1, 1]), 0, k=k, sigma=0.25, alpha=0.001)


def test_unknown_bound_is_rejected():
    with pytest.raises(ValueError, match="bound"):
        topk.radius_from_counts(np.array([10, 5, 3]), 0, k=1, sigma=0.25, alpha=0.001, bound="goodman")


def smoothed_probabilities(weight, bias, x, sigma):
    """Exact P(argmax(W(x + eps) + b) = c) for 3 classes: a bivariate normal orthant per class."""
    probabilities = []
    for c in range(3):
        others = [j for j in range(3) if j != c]
        rows = weight[c] - weight[others]  # margins of c over the others: rows @ (x + eps) + bias gap
        mean = rows @ x + (bias[c] - bias[others])
        cov = sigma**2 * rows @ rows.T
        probabilities.append(multivariate_normal(mean=-mean, cov=cov).cdf(np.zeros(2)))
    return np.array(probabilities)


def test_no_counterexample_inside_the_certified_top2_radius():
    """A 3-class linear classifier: its smoothed probabilities are exact, and they depend on x only
    through the plane spanned by the weight differences. Scanning that plane at and inside each certified
    radius finds no point where the label leaves the top 2, while scanning further out does, so the scan
    can find a counterexample where there is one."""
    rng = np.random.default_rng(0)
    sigma, dim = 0.5, 8
    weight, bias = rng.normal(size=(3, dim)), np.zeros(3)
    basis, _ = np.linalg.qr((weight[1:] - weight[0]).T)  # orthonormal basis of the plane, [dim, 2]
    model = Affine(torch.tensor(weight, dtype=torch.float32), torch.tensor(bias, dtype=torch.float32))
    points = np.clip(0.5 + 0.15 * rng.normal(size=(12, dim)), 0, 1)
    labels = [int(np.argsort(smoothed_probabilities(weight, bias, x, sigma))[1]) for x in points]  # 2nd of 3
    table = pipeline.certify(model, torch.tensor(points, dtype=torch.float32).view(12, 2, 2, 2), labels,
                             [topk.TopK(k=2, sigma=sigma, n=2000, alpha=0.001)], seed=0)
    angles = np.linspace(0, 2 * np.pi, 48, endpoint=False)
    directions = basis @ np.stack([np.cos(angles), np.sin(angles)])

    def drops_out(x, label, radius):
        return any(np.argmin(smoothed_probabilities(weight, bias, x + radius * d, sigma)) == label
                   for d in directions.T)

    certified = 0
    for x, label, row in zip(points, labels, table.to_pylist(), strict=True):
        if row["abstained"]:
            continue
        certified += 1
        for fraction in (0.5, 0.999):
            assert not drops_out(x, label, fraction * row["radius"]), (x, label, row["radius"])
        assert drops_out(x, label, 4 * row["radius"] + 4 * sigma)
    assert certified >= 6
