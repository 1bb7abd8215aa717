"""Sequential certification: anytime-valid bounds, the sequential certifiers, continuous batching.

Soundness checks count failures over many independent streams or images. Each failure happens with
probability <= alpha, so the failures are at most Binomial(m, alpha); a check fails when they exceed that
law's 1 - 1e-6 quantile, so its own false-alarm rate is below 1e-6. Peeking at a fixed-n bound after every
look fails the same check, which shows the checks have power.
"""

import json
import math

import numpy as np
import pandas as pd
import pytest
import scipy.stats as sps
import torch
from conftest import Affine, CountingModel, without_batch
from scipy.special import ndtr

import pipeline
from pipeline import stats
from pipeline.certification import certify_rows
from pipeline.certifiers import Cohen, SmoothReduce, TopK, topk
from pipeline.certifiers.cohen import sequential_certificate
from pipeline.certifiers.sequential import top_class
from pipeline.config import ConfigError, validate
from pipeline.engine import Draws, Engine
from pipeline.noise import gaussian_draws

LOOKS = stats.geometric_looks(10, 1.2, 20_000)  # 40 looks: many chances to stop


def bound_exceeds(rng, p, threshold, alpha, test, streams=4000):
    """Simulates Bernoulli(p) streams to the last of LOOKS; True where a lower bound passed `threshold`."""
    k = np.zeros(streams, dtype=np.int64)
    crossed = np.zeros(streams, dtype=bool)
    previous = 0
    for look, n in enumerate(LOOKS, 1):
        k += rng.binomial(n - previous, p, size=streams)
        previous = n
        if test == "peeking":  # a fixed-n bound at every look: not valid
            lower = stats.clopper_pearson_lower(k, n, alpha)
        else:
            lower, _ = stats.sequential_bounds(k, n, look, alpha, test)
        crossed |= lower > threshold
    return crossed


def binomial_limit(m, alpha):
    return sps.binom.ppf(1 - 1e-6, m, alpha)


@pytest.mark.parametrize("test", stats.SEQUENTIAL_TESTS)
def test_sequential_bounds_fail_at_most_alpha_over_all_looks(test):
    rng = np.random.default_rng(0)
    alpha, streams = 0.05, 4000
    for p in (0.5, 0.841, 0.99):
        crossed = bound_exceeds(rng, p, p, alpha, test, streams)  # true mean exactly at the threshold
        assert crossed.sum() <= binomial_limit(streams, alpha), (test, p, crossed.mean())
    # a fixed-n Clopper-Pearson bound, peeked at every look, is wrong far more often than alpha
    assert bound_exceeds(rng, 0.841, 0.841, alpha, "peeking", streams).sum() > binomial_limit(streams, alpha)


def test_mixture_bounds_solve_the_martingale_equation():
    alpha = 0.001
    for k, n in [(1, 1), (5, 100), (90, 100), (99_000, 100_000), (3, 3), (0, 7)]:
        lower, upper = stats.mixture_bounds(k, n, alpha)
        assert 0 <= lower <= k / n <= upper <= 1
        for bound, edge in ((lower, k == 0), (upper, k == n)):
            if edge:
                continue
            assert stats.mixture_log_martingale(k, n, bound) == pytest.approx(math.log(1 / alpha), abs=1e-6)
        inside = (lower + upper) / 2
        assert stats.mixture_log_martingale(k, n, inside) < math.log(1 / alpha)
    assert stats.mixture_bounds(0, 7, alpha)[0] == 0.0 and stats.mixture_bounds(3, 3, alpha)[1] == 1.0
    # vectorised over counts, and wider than fixed-n Clopper-Pearson (the price of looking at will)
    lower, _ = stats.mixture_bounds(np.array([50, 80, 95]), 100, alpha)
    assert np.all(lower < stats.clopper_pearson_lower(np.array([50, 80, 95]), 100, alpha))


def test_looks_schedule_and_levels():
    assert stats.geometric_looks(100, 1.5, 1000) == [100, 150, 225, 338, 507, 761, 1000]
    assert stats.geometric_looks(1, 1.1, 5) == [1, 2, 3, 4, 5]
    assert sum(stats.look_alpha(j, 0.01) for j in range(1, 10_000)) < 0.01
    with pytest.raises(ValueError, match="ratio"):
        stats.geometric_looks(10, 1.0, 100)
    with pytest.raises(ValueError, match="test"):
        stats.sequential_bounds(1, 2, 1, 0.1, "peeking")


def drive(procedure, rng, probabilities):
    """Runs a sampling procedure against a simulated multinomial stream (class 0 tops the selection)."""
    probabilities = np.asarray(probabilities)
    drawn, counts = {}, {}
    request = next(procedure)
    while True:
        key = request.stream
        have = drawn.get(key, 0)
        new = rng.multinomial(request.n - have, probabilities)
        counts[key] = counts.get(key, np.zeros(len(probabilities), dtype=np.int64)) + new
        drawn[key] = request.n
        try:
            request = procedure.send(counts[key].copy())
        except StopIteration as stop:
            return stop.value


class _Capture:
    """Stands in for the session to hand back the per-image procedures a certifier's `run` builds."""

    def sequential(self, images, ids, seed, procedures, **_):
        return procedures


def cohen_outcomes(certifier, p, streams, seed=0):
    rng = np.random.default_rng(seed)

    def procedure():
        top, outcome = yield from top_class(certifier)
        return sequential_certificate(top, outcome, certifier.sigma, certifier.n0)

    return [drive(procedure(), rng, [p, 1 - p]) for _ in range(streams)]


@pytest.mark.parametrize("test", stats.SEQUENTIAL_TESTS)
def test_sequential_cohen_certifies_a_target_beyond_the_truth_at_most_alpha(test):
    """p_A just below Phi(r / sigma): certifying r is false. Targets above and below it too."""
    sigma, alpha, streams = 0.5, 0.05, 300
    certifier = Cohen(sigma=sigma, alpha=alpha, n0=10, n=20_000, mode="sequential", radii=[0.25, 0.5, 0.75],
                      test=test, first_look=20, look_ratio=1.3)
    p = float(ndtr(0.5 / sigma)) - 0.003
    certificates = cohen_outcomes(certifier, p, streams)
    false = [0.5 in c.details["sequential"]["certified_radii"] or c.radius >= 0.5 for c in certificates]
    assert sum(false) <= binomial_limit(streams, alpha)
    decided = [c.details["sequential"]["certified_radii"] == [0.25] for c in certificates]
    assert np.mean(decided) > 0.9  # 0.25 is certified and 0.75 ruled out: the test is not vacuous


def test_futility_stops_early_and_never_certifies():
    certifier = Cohen(sigma=0.5, alpha=0.001, n0=10, n=100_000, mode="sequential", radii=[0.5, 1.0])
    for certificate in cohen_outcomes(certifier, 0.7, 50):  # far below Phi(1) = 0.84
        record = certificate.details["sequential"]
        assert record["stopped"] == "decided" and record["certified_radii"] == []
        assert record["ruled_out_radii"] == [0.5, 1.0]
        assert certificate.cost.n < 2_000
        assert certificate.radius < 0.5
    rng = np.random.default_rng(1)
    for _ in range(20):  # no class above 1/2: abstain
        certificate = drive(certifier.run(_Capture(), torch.zeros(1, 1, 1, 1), ["x"], 0)[0], rng, [0.4, 0.35, 0.25])
        assert certificate.prediction == -1 and certificate.extra == {"abstain_reason": "futility"}


def test_max_radius_mode_is_sound_and_stops_when_saturated():
    sigma, alpha, streams, p = 0.5, 0.05, 200, 0.9
    certifier = Cohen(sigma=sigma, alpha=alpha, n0=10, n=50_000, mode="max_radius", min_gain=0.02)
    certificates = cohen_outcomes(certifier, p, streams, seed=1)
    true_radius = sigma * sps.norm.ppf(p)
    assert sum(c.radius > true_radius for c in certificates) <= binomial_limit(streams, alpha)
    assert all(c.details["sequential"]["stopped"] in ("saturated", "budget") for c in certificates)
    assert np.mean([c.cost.n for c in certificates]) < 50_000  # stops before the budget...
    assert np.mean([c.radius for c in certificates]) > true_radius - 0.05  # ...close to the truth


def test_sequential_topk_certifies_beyond_the_exact_radius_at_most_alpha():
    """With the exact class probabilities, the top-k bound gives the largest radius the method can claim;
    a certified target beyond it is a failure."""
    sigma, alpha, streams, k = 0.5, 0.05, 100, 2
    probabilities = np.array([0.45, 0.3, 0.15, 0.1])
    label = 1
    exact = topk.radius_from_bounds(probabilities[label], np.delete(probabilities, label), k, sigma)
    certifier = TopK(sigma=sigma, alpha=alpha, k=k, n=20_000, mode="sequential", radii=[exact * 0.5, exact * 1.02],
                     first_look=50, look_ratio=1.3)
    rng = np.random.default_rng(0)
    outcomes = [drive(certifier.run(_Capture(), torch.zeros(1, 1, 1, 1), ["x"], 0, [label])[0], rng, probabilities)
                for _ in range(streams)]
    false = [o.radius > exact for o in outcomes]
    assert sum(false) <= binomial_limit(streams, alpha)
    assert np.mean([o.radius > exact * 0.5 for o in outcomes]) > 0.9




def test_sequential_topk_rows_count_only_the_draws_taken(recwarn):
    """Labeled images need no selection draws: their rows say n0 = 0 and passes = n; unlabeled ones take
    n0. An image whose every draw votes its label has an infinite optimistic radius, reached without
    arithmetic on infinities (no warnings)."""
    weight = torch.zeros(3, 16)
    weight[0, 0], weight[2, 0] = 10.0, -10.0
    model = Affine(weight, torch.zeros(3))
    images = torch.rand(2, 1, 4, 4)
    images[:, 0, 0, 0] = 1.0
    certifier = TopK(sigma=0.25, k=2, n=5_000, mode="sequential", radii=[0.25, 0.5])
    labeled = pipeline.certify(model, images, [0, 0], [certifier]).to_pylist()
    unlabeled = pipeline.certify(model, images, None, [certifier]).to_pylist()
    assert [(row["n0"], row["forward_passes"]) for row in labeled] == [(0, row["n"]) for row in labeled]
    assert [(row["n0"], row["forward_passes"]) for row in unlabeled] == [(100, row["n"] + 100) for row in unlabeled]
    assert all(row["radius"] > 0.5 and row["n"] < 5_000 for row in labeled + unlabeled)
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]
    assert topk.radius_from_bounds(1.0, np.array([0.0, 0.0]), 2, 0.25) == math.inf


@pytest.fixture
def linear_images(linear_binary):
    """A binary linear classifier and images at chosen distances from its boundary (the exact radii)."""
    torch.manual_seed(0)
    w = torch.where(torch.rand(1, 4, 4) < 0.5, -0.25, 0.25)  # unit norm, flat: images stay in [0, 1]
    model = linear_binary(w, b=-float(w.sum()) * 0.5)

    def at(radii):
        radii = torch.as_tensor(radii, dtype=torch.float32)
        signs = torch.where(torch.arange(len(radii)) % 2 == 0, 1.0, -1.0)
        images = 0.5 + (signs * radii)[:, None, None, None] * w
        assert images.min() >= 0 and images.max() <= 1
        return images, (signs > 0).long()

    return model, at


def test_sequential_cohen_on_a_linear_classifier_is_sound(linear_images):
    model, at = linear_images
    m, sigma, alpha = 300, 0.5, 0.05
    true_radius = np.full(m, 0.47)  # just inside the target 0.5
    images, labels = at(true_radius)
    certifier = Cohen(sigma=sigma, alpha=alpha, n0=20, n=5_000, mode="sequential", radii=[0.25, 0.5])
    rows = pipeline.certify(model, images, labels, [certifier], seed=3).to_pandas()
    failures = ~rows["abstained"] & ((rows["prediction"] != labels.numpy()) | (rows["radius"] > true_radius))
    assert failures.sum() <= binomial_limit(m, alpha)
    assert (rows["radius"] > 0.25).mean() > 0.9


def test_sequential_and_fixed_agree_far_from_the_thresholds(linear_images):
    model, at = linear_images
    sigma, radii = 0.5, [0.25, 0.5]
    true_radius = np.repeat([0.05, 0.38, 0.9], 4)
    images, labels = at(true_radius)
    common = {"sigma": sigma, "alpha": 0.001, "n0": 100, "n": 20_000}
    fixed = pipeline.certify(model, images, labels, [Cohen(**common)], seed=0).to_pandas()
    for test in stats.SEQUENTIAL_TESTS:
        sequential = pipeline.certify(model, images, labels, [Cohen(**common, mode="sequential", radii=radii,
                                                                    test=test)], seed=0).to_pandas()
        for r in radii:  # the targets are what the sequential mode decides
            np.testing.assert_array_equal(fixed["correct"] & (fixed["radius"] > r),
                                          sequential["correct"] & (sequential["radius"] > r))
        assert sequential["forward_passes"].mean() < fixed["forward_passes"].mean() / 5


def test_continuous_batching_gives_the_same_certificates_as_one_image_at_a_time(linear_images):
    model, at = linear_images
    images, labels = at([0.05, 0.2, 0.26, 0.45, 0.6, 0.9, 0.3])
    ids = [f"img{i}" for i in range(len(images))]
    certifiers = [Cohen(sigma=0.5, n0=30, n=5_000, mode="sequential", radii=[0.25, 0.5], test="looks"),
                  Cohen(sigma=0.5, n0=30, n=5_000, mode="max_radius"),
                  TopK(sigma=0.5, k=1, n=5_000, mode="sequential", radii=[0.25, 0.5])]
    together = pipeline.certify(model, images, labels, certifiers, image_ids=ids, batch_size=37).to_pandas()
    alone = [pipeline.certify(model, images[i:i + 1], labels[i:i + 1], certifiers, image_ids=ids[i:i + 1],
                              batch_size=1000).to_pandas() for i in range(len(images))]
    columns = ["image_id", "setting", "prediction", "radius", "p_lower", "count", "n", "forward_passes", "params"]
    for rows in [together, *alone]:
        rows["params"] = rows["params"].map(without_batch)
    for i, rows in enumerate(alone):
        expected = together[together["image_id"] == ids[i]][columns].reset_index(drop=True)
        assert rows[columns].equals(expected), ids[i]
    assert together["n"].nunique() > 2  # images stopped at different looks


def test_engine_sequential_counts_exactly_the_requested_draws(linear_images):
    """Counts handed to a procedure equal a draw-by-draw count over exactly its requested draws."""
    model, at = linear_images
    images, _ = at([0.1, 0.3])
    requests = [Draws("selection", 0.5, 7), Draws("estimation", 0.5, 70), Draws("estimation", 0.5, 300)]
    seen = {0: [], 1: []}

    def procedure(image):
        for request in requests:
            seen[image].append((request, (yield request)))
        return image

    results = Engine(model, batch_size=50).session().sequential(images, ["a", "b"], 4, [procedure(0), procedure(1)])
    assert results == [0, 1]
    for image, image_id in enumerate(["a", "b"]):
        for request, counts in seen[image]:
            eps = gaussian_draws(4, image_id, request.stage, 0, request.n, images.shape[1:])
            expected = np.bincount(model(images[image] + 0.5 * eps).argmax(1).numpy(), minlength=2)
            np.testing.assert_array_equal(counts, expected)

    def backwards():
        yield Draws("estimation", 0.5, 100)
        yield Draws("estimation", 0.5, 50)

    with pytest.raises(ValueError, match="only ask for more"):
        Engine(model).session().sequential(images[:1], ["a"], 0, [backwards()])


def test_sequential_smooth_reduce_with_one_whole_patch_is_sequential_cohen(linear_images):
    model, at = linear_images
    images, labels = at([0.1, 0.3, 0.6])
    common = {"sigma": 0.5, "n0": 50, "n": 5_000, "mode": "sequential", "radii": [0.25, 0.5]}
    rows = pipeline.certify(model, images, labels, [Cohen(**common), SmoothReduce(patch_size=4, **common)],
                            seed=2).to_pandas()
    cohen, reduce = rows[rows.certifier == "cohen"], rows[rows.certifier == "smooth_reduce"]
    for column in ("prediction", "radius", "n", "count"):
        np.testing.assert_array_equal(cohen[column].to_numpy(), reduce[column].to_numpy())


def test_sequential_settings_are_checked_and_recorded():
    with pytest.raises(ValueError, match="needs radii"):
        Cohen(sigma=0.25, mode="sequential")
    with pytest.raises(ValueError, match="apply only with mode"):
        Cohen(sigma=0.25, radii=[0.5])
    with pytest.raises(ValueError, match="drop radii"):
        Cohen(sigma=0.25, mode="max_radius", radii=[0.5])
    with pytest.raises(ValueError, match="first_look"):
        Cohen(sigma=0.25, mode="sequential", radii=[0.5], n=50)
    with pytest.raises(ValueError, match="look_ratio"):
        TopK(sigma=0.25, mode="sequential", radii=[0.5], look_ratio=1)
    with pytest.raises(ConfigError, match=r"certifiers\[0\].*test"):
        validate({"certifiers": [{"name": "cohen", "sigma": 0.25, "mode": "sequential", "radii": [0.5],
                                  "test": "peek"}]})
    assert "radii" not in Cohen(sigma=0.25).setting  # fixed-N settings read as before
    certifier = Cohen(sigma=0.25, mode="sequential", radii=[0.5, 0.25, 0.5])
    assert certifier.radii == (0.25, 0.5)
    assert "radii=(0.25, 0.5)" in certifier.setting and "min_gain" not in certifier.setting
    params = json.loads(json.dumps(certifier.params()))
    assert params["radii"] == [0.25, 0.5] and params["test"] == "mixture"


def test_sequential_looks_reuse_the_fixed_certifiers_draws_with_the_same_certificates(linear_images):
    """Run beside fixed-N Cohen at the same sigma, a sequential certifier takes its selection draws and the
    looks up to N from Cohen's forward passes: the same certificates, fewer passes, counted in the rows."""
    model, at = linear_images
    images, labels = at([0.05, 0.2, 0.26, 0.45, 0.6, 0.9, 0.3])
    ids = [f"img{i}" for i in range(len(images))]
    fixed = Cohen(sigma=0.5, n0=30, n=1_000)
    sequential = [Cohen(sigma=0.5, n0=30, n=5_000, mode="sequential", radii=[0.25, 0.5], test="looks"),
                  TopK(sigma=0.5, k=1, n=5_000, mode="sequential", radii=[0.25, 0.5])]
    columns = ["image_id", "setting", "prediction", "radius", "p_lower", "count", "n", "forward_passes"]
    passes = {}

    def certified(certifiers):
        counted = CountingModel(model)
        rows = pd.DataFrame(certify_rows(Engine(counted, batch_size=64), images, labels, certifiers, seed=1,
                                         image_ids=ids))
        passes[len(certifiers)] = counted.rows
        return rows[rows.setting != fixed.setting].reset_index(drop=True)

    alone, beside = certified(sequential), certified([fixed, *sequential])
    assert beside[columns].equals(alone[columns])
    shared = [json.loads(params).get("shared_passes", 0) for params in beside["params"]]
    # the selection draws and every look up to the fixed certifier's n came from its passes
    reused_looks = max(n for n in sequential[0].looks() if n <= 1_000)
    expected = [(30 if row.certifier == "cohen" else 0) + min(row.n, reused_looks) for row in beside.itertuples()]
    assert shared == expected
    assert passes[3] == passes[2] + len(images) * (30 + 1_000) - sum(shared)
