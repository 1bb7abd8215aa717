"""Center smoothing: the output bound on a linear map, the centre search, the statistics, the metrics."""

import json
import math

import numpy as np
import pytest
import torch
from conftest import CountingModel
from scipy import stats as sps
from torch import nn

import pipeline
from pipeline import distances
from pipeline.certification import certify_rows
from pipeline.certifiers import Center, Cohen, TopK, center
from pipeline.certifiers.base import ESTIMATION
from pipeline.data.demo import load_demo
from pipeline.distances import METRICS, get_metric
from pipeline.engine import Draws, Engine
from pipeline.models import load_demo_model
from pipeline.results import to_table


class LinearMap(nn.Module):
    def __init__(self, matrix):
        super().__init__()
        self.register_buffer("matrix", matrix)

    def forward(self, x):
        return x.flatten(1) @ self.matrix.T


@pytest.fixture(scope="module")
def linear():
    torch.manual_seed(0)
    return LinearMap(torch.randn(3, 16))


def test_eps_out_bounds_the_centre_shift_on_a_linear_map(linear):
    """f(x) = A x, l2 outputs. For each certified x, the centres at x + delta (random directions and the
    top right-singular vector of A, ||delta|| = eps_in) must lie within eps_out of the centre at x. A pair
    fails with probability <= alpha1 + alpha2 (the certificate) + alpha1 per centre at x + delta (3 of
    them): 0.025. Failures over m inputs are then at most Binomial(m, 0.025); the test fails above the
    1 - 1e-6 quantile, its false-alarm rate."""
    sigma, eps_in, count = 0.25, 0.125, 30
    certifier = Center(sigma=sigma, eps_in=eps_in, output="logits", metric="l2", n=2000, m=4000)
    engine = Engine(linear, batch_size=2048)
    generator = torch.Generator().manual_seed(1)
    images = 0.3 + 0.4 * torch.rand(count, 1, 4, 4, generator=generator)
    ids = [f"x{i}" for i in range(count)]
    rows = pipeline.certify(linear, images, None, [certifier], image_ids=ids, batch_size=2048).to_pylist()
    centres, _, _ = certifier.smooth(engine.session(), images, ids, 0, linear)

    worst = torch.linalg.svd(linear.matrix).Vh[0].view(1, 4, 4)
    directions = [worst, -worst, torch.randn(1, 4, 4, generator=generator)]
    shifted = torch.cat([images + eps_in * d / d.norm() for d in directions])
    shifted_ids = [f"x{i}+d{j}" for j in range(len(directions)) for i in range(count)]
    moved, _, fractions = certifier.smooth(engine.session(), shifted, shifted_ids, 0, linear)
    accepted = [center.check_passes(f, certifier.n, certifier.alpha1, certifier.delta) for f in fractions.tolist()]

    failures, ratios = 0, []
    for i, row in enumerate(rows):
        if row["abstained"]:
            continue
        gaps = [float((moved[j * count + i] - centres[i]).norm()) for j in range(len(directions))
                if accepted[j * count + i]]
        failures += any(gap > row["eps_out"] for gap in gaps)
        ratios += [gap / row["eps_out"] for gap in gaps]
    assert sum(not row["abstained"] for row in rows) >= count // 2
    assert failures <= sps.binom.ppf(1 - 1e-6, count, 0.025)
    assert max(ratios) > 0.05  # the shifts are not negligible against the bound


def test_exact_and_candidate_centres_agree_on_an_easy_distribution(linear):
    images = torch.full((2, 1, 4, 4), 0.5)
    engine = Engine(linear, batch_size=1024)
    exact = Center(sigma=0.25, eps_in=0.1, output="logits", n=2000, m=4000)
    candidates = Center(sigma=0.25, eps_in=0.1, output="logits", n=2000, m=4000, centers=30)
    centre_exact, radius_exact, _ = exact.smooth(engine.session(), images, ["a", "b"], 0, linear)
    centre_30, radius_30, _ = candidates.smooth(engine.session(), images, ["a", "b"], 0, linear)
    truth = linear(images)
    assert ((centre_exact - truth).norm(dim=1) < radius_exact).all()
    assert ((centre_30 - centre_exact).norm(dim=1) < radius_exact).all()
    assert torch.allclose(radius_30, radius_exact, rtol=0.25)


@pytest.mark.parametrize("name", sorted(METRICS))
def test_blockwise_distances_equal_dense_ones(monkeypatch, name):
    metric = get_metric(name)
    points = random_points(name, 40, torch.Generator().manual_seed(0))
    dense = torch.stack([metric.paired(points[i:i + 1].expand_as(points), points) for i in range(len(points))])
    monkeypatch.setattr(distances, "PAIRWISE_BUDGET", 50)
    monkeypatch.setattr(center, "ROW_BLOCK", 7)
    torch.testing.assert_close(metric.pairwise(points, points).float(), dense.float(), rtol=1e-5, atol=1e-5)
    medians = center.median_distances(metric, points, points)
    torch.testing.assert_close(medians.float(), dense.median(dim=1).values.float(), rtol=1e-5, atol=1e-5)


def test_quantile_is_the_conservative_order_statistic():
    distances = torch.randperm(10).float() + 1  # 1..10
    assert center.order_statistic(distances, 0.61) == 7.0  # ceil(6.1) = 7th smallest
    assert center.order_statistic(distances, 0.6) == 6.0
    values = torch.rand(1001, generator=torch.Generator().manual_seed(0))
    for level in (0.55, 0.734, 0.87):
        conservative = center.order_statistic(values, level)
        assert conservative == pytest.approx(np.quantile(values.numpy(), level, method="inverted_cdf"))
        assert conservative >= np.quantile(values.numpy(), level)


def test_abstention_follows_the_spec_conditions(linear):
    margin = math.sqrt(math.log(2 / 0.005) / (2 * 10_000))
    threshold = 0.5 - 0.05 + margin
    assert center.check_passes(threshold + 1e-9, 10_000, 0.005, 0.05)
    assert not center.check_passes(threshold - 1e-6, 10_000, 0.005, 0.05)
    assert not center.check_passes(1.0, 1000, 0.005, 0.05)  # Delta1 = 0.055 > delta: always abstains
    rows = pipeline.certify(linear, torch.rand(3, 1, 4, 4), None,
                            [Center(sigma=0.25, eps_in=0.1, output="logits", n=1000, m=4000)]).to_pylist()
    assert all(row["abstained"] and row["abstain_reason"].startswith("check failed") for row in rows)
    assert all(row["prediction"] is None and row["correct"] is None and row["radius"] == 0.0 for row in rows)


def test_largest_certifiable_radius_matches_the_spec():
    assert center.max_eps_in(1.0, 10**6, 0.05, 0.005) == pytest.approx(2.82, abs=0.005)
    assert center.max_eps_in(1.0, 10**4, 0.05, 0.005) == pytest.approx(2.01, abs=0.005)
    assert center.max_eps_in(1.0, 10**4, 0.08, 0.005) == pytest.approx(1.94, abs=0.005)
    assert center.quantile_level(1.0, 0.5, 10**12, 0.05, 0.005) == pytest.approx(0.734, abs=5e-4)


def random_points(name: str, count: int, generator: torch.Generator) -> torch.Tensor:
    if name == "total_variation":
        return torch.softmax(3 * torch.randn(count, 5, generator=generator), dim=1)
    if name in ("tv1", "tv2"):
        return torch.rand(count, 3, 5, 5, generator=generator)
    if name == "jaccard":
        corners = torch.rand(count, 2, generator=generator) * 10
        boxes = torch.cat([corners, corners + torch.rand(count, 2, generator=generator) * 6], dim=1)
        boxes[::5] = -1  # "no detection"
        return boxes
    return torch.randn(count, 6, generator=generator)


@pytest.mark.parametrize("name", sorted(METRICS))
def test_every_metric_satisfies_its_triangle_constant(name):
    metric = get_metric(name)
    generator = torch.Generator().manual_seed(1)
    a, b, c = (random_points(name, 3000, generator) for _ in range(3))
    ab, bc, ac = metric.paired(a, b), metric.paired(b, c), metric.paired(a, c)
    assert torch.isfinite(ab).all()
    assert (ac <= metric.triangle_constant * (ab + bc) + 1e-5).all()
    torch.testing.assert_close(ab, metric.paired(b, a))
    assert (metric.paired(a, a).abs() < 1e-3).all()


def test_jaccard_defines_empty_boxes():
    jaccard = get_metric("jaccard")
    empty, box, far = torch.tensor([[-1.0, -1, -1, -1]]), torch.tensor([[0.0, 0, 2, 2]]), torch.tensor([[5.0, 5, 6, 6]])
    assert jaccard.paired(empty, empty).item() == 0.0
    assert jaccard.paired(empty, box).item() == 1.0
    assert jaccard.paired(box, far).item() == 1.0
    assert jaccard.paired(box, torch.tensor([[1.0, 0, 3, 2]])).item() == pytest.approx(1 - 2 / 6)


def test_invalid_settings_give_clear_errors(linear):
    with pytest.raises(ValueError, match=r"eps_in=3.0 is beyond the largest certifiable radius 2\.0"):
        Center(sigma=1.0, eps_in=3.0, m=10_000)
    with pytest.raises(ValueError, match=r"m=10 is too small for alpha2=0\.005"):
        Center(sigma=1.0, eps_in=0.1, m=10)
    with pytest.raises(ValueError, match="metric must be one of"):
        Center(sigma=1.0, eps_in=0.1, metric="lpips")
    with pytest.raises(ValueError, match="output must be one of"):
        Center(sigma=1.0, eps_in=0.1, output="embedding")
    with pytest.raises(ValueError, match="needs a classifier composed with a denoiser"):
        pipeline.certify(linear, torch.rand(1, 1, 4, 4), None,
                         [Center(sigma=0.25, eps_in=0.1, output="denoised", n=2000, m=4000)])


def test_features_of_a_registry_model_are_its_penultimate_layer():
    from pipeline.models import WithFeatures, load_demo_model

    model = load_demo_model()
    images = torch.rand(2, 3, 32, 32)
    logits, features = WithFeatures(model)(images)
    with torch.no_grad():
        expected = model.features(model.normalize(images))
        torch.testing.assert_close(features, expected)
        torch.testing.assert_close(logits, model.head(expected))


class ClusterOrSpread(nn.Module):
    """A scalar input z (one pixel) mapped to 2-d outputs: 0.7 of the mass under N(x, 1) lands in a tight
    cluster near the origin (z below the 0.7-quantile), the rest is spread far apart along a line."""

    def __init__(self, split: float):
        super().__init__()
        self.split = split

    def forward(self, x):
        z = x.flatten(1)[:, 0]
        spread = torch.where(z < self.split, 0.01 * z, 100 * z)
        return torch.stack([spread, torch.zeros_like(z)], dim=1)


def broken_bound_pairs(certifier: Center, pairs: int) -> int:
    """Run pairs (x, x' = x + eps_in) on the cluster-or-spread map, each with fresh noise: the pairs where
    both are accepted and the centre at x' lies beyond the eps_out certified at x."""
    model = ClusterOrSpread(float(sps.norm.ppf(0.7)))
    engine = Engine(model, batch_size=4096)
    x = torch.zeros(pairs, 1, 1, 1)
    ids = [f"x{i}" for i in range(pairs)]
    moved_ids = [f"x'{i}" for i in range(pairs)]
    certificates = certifier.run(engine.session(), x, ids, 0)
    centres, _, _ = certifier.smooth(engine.session(), x, ids, 0, model)
    moved, _, fractions = certifier.smooth(engine.session(), x + certifier.eps_in, moved_ids, 0, model)
    broken = 0
    for i, certificate in enumerate(certificates):
        accepted = center.check_passes(float(fractions[i]), certifier.n, certifier.alpha1, certifier.delta)
        if not certificate.abstained and accepted:
            broken += float((moved[i] - centres[i]).norm()) > certificate.extra["eps_out"]
    return broken


def test_few_candidate_centres_are_refused_and_enough_hold_the_bound():
    """With k candidate centres the bound also needs one candidate inside a half-mass ball; all k miss it
    with probability up to (1/2 - delta)^k. On a map with 0.7 of the output mass in a tight cluster and the
    rest spread far apart, one candidate breaks the bound in about a fifth of the run pairs (the power of
    the experiment), so settings like that are refused; k = 18 (the fewest accepted at delta = 0.05) holds
    it. A pair breaks with probability <= alpha1 + alpha2 at x, + alpha1 for the centre at x', + 0.3^18:
    0.015; the test fails above the Binomial(pairs, 0.015) 1 - 1e-6 quantile (its false-alarm rate)."""
    settings = dict(sigma=1.0, eps_in=0.1, output="logits", n=2000, m=1000)
    for k in (1, 2, 3, 10, 17):
        with pytest.raises(ValueError, match=rf"centers={k} candidates all miss .* use centers >= 18"):
            Center(**settings, centers=k)
    with pytest.raises(ValueError, match=r"use centers >= 16 at delta=0\.08"):
        Center(**settings, centers=15, delta=0.08)
    pairs = 150
    tolerated = sps.binom.ppf(1 - 1e-6, pairs, 0.015)
    one = Center(**settings, centers=18)
    object.__setattr__(one, "centers", 1)  # past the refusal, to show what it guards against
    assert broken_bound_pairs(one, pairs) > tolerated

    enough = Center(**settings, centers=18)
    assert enough.failure_probability == pytest.approx(0.01 + 0.45 ** 18, rel=1e-12)
    assert broken_bound_pairs(enough, pairs) <= tolerated


def test_candidate_miss_probability_is_part_of_the_row():
    model = ClusterOrSpread(float(sps.norm.ppf(0.7)))
    rows = pipeline.certify(model, torch.zeros(2, 1, 1, 1), None, [
        Center(sigma=1.0, eps_in=0.1, output="logits", n=2000, m=1000, centers=30),
        Center(sigma=1.0, eps_in=0.1, output="logits", n=2000, m=1000)]).to_pylist()
    candidates, exact = rows[0], rows[1]
    assert candidates["alpha"] == pytest.approx(0.01 + 0.45 ** 30, rel=1e-12) and candidates["alpha"] > 0.01
    assert json.loads(candidates["params"])["candidate_miss"] == pytest.approx(0.45 ** 30)
    assert exact["alpha"] == 0.01  # (1/2 - delta)^n vanishes for the search over all n samples


def test_eps_in_at_the_largest_certifiable_radius_is_certified():
    """At eps_in = the largest certifiable radius, q = 1 in exact arithmetic; rounding puts it just above
    1 (sigma 1, m 1343), and the rank must still be m (the largest distance), not m + 1."""
    sigma, m = 1.0, 1343
    largest = center.max_eps_in(sigma, m, 0.05, 0.005)
    level = center.quantile_level(sigma, largest, m, 0.05, 0.005)
    assert math.ceil(level * m) == m + 1  # the rounding this guards against
    distances = torch.rand(m, generator=torch.Generator().manual_seed(0))
    assert center.order_statistic(distances, level) == float(distances.double().max())
    with pytest.raises(ValueError, match="quantile level must lie in"):
        center.order_statistic(distances, 1.01)
    model = LinearMap(torch.eye(2))
    rows = pipeline.certify(model, torch.full((1, 1, 1, 2), 0.5), None,
                            [Center(sigma=sigma, eps_in=largest, output="logits", n=2000, m=m)]).to_pylist()
    assert rows[0]["status"] == "ok" and not rows[0]["abstained"]
    assert rows[0]["eps_out"] > 0


@pytest.mark.parametrize("name", sorted(METRICS))
def test_every_metric_computes_in_at_least_fp32(name):
    """bf16 outputs (a bf16 model's) are compared at fp32 or better: the distances of the bf16 values
    equal those of the same values in fp32, never rounded to 8 bits of mantissa."""
    metric = get_metric(name)
    points = random_points(name, 64, torch.Generator().manual_seed(2))
    a, b = points[:32].bfloat16(), points[32:].bfloat16()
    low = metric.paired(a, b)
    assert low.dtype in (torch.float32, torch.float64)
    torch.testing.assert_close(low.double(), metric.paired(a.float(), b.float()).double(), rtol=1e-6, atol=1e-7)
    assert metric.pairwise(a, b).dtype in (torch.float32, torch.float64)
    assert metric.paired(a.double(), b.double()).dtype == torch.float64


def test_angular_eps_out_of_a_bf16_model_is_the_exact_order_statistic():
    """Through the engine at bf16: eps_out is 3 x the ceil(q m)-th of the fp32+ distances between the
    centre and the m bf16 outputs."""
    torch.manual_seed(3)
    model = LinearMap(torch.randn(8, 16))
    certifier = Center(sigma=0.25, eps_in=0.1, output="logits", metric="angular", n=4000, m=3000)
    engine = Engine(model, batch_size=1024, precision="bf16")
    images = 0.3 + 0.4 * torch.rand(2, 1, 4, 4)
    certificates = certifier.run(engine.session(), images, ["a", "b"], 0)
    centres, _, _ = certifier.smooth(engine.session(), images, ["a", "b"], 0, model)
    level = center.quantile_level(0.25, 0.1, 3000, 0.05, 0.005)
    outputs = torch.empty(2, 3000, 8)

    def keep(out, image, draw):
        outputs[image, draw] = out.float()

    engine.session().outputs(images, ["a", "b"], 0, Draws(ESTIMATION, 0.25, 3000), model, keep)
    for index, certificate in enumerate(certificates):
        cosine = torch.nn.functional.cosine_similarity(outputs[index].double(), centres[index:index + 1].double())
        distances = torch.arccos(cosine.clamp(-1, 1)) / math.pi
        expected = 3 * float(torch.sort(distances).values[math.ceil(level * 3000) - 1])
        assert not certificate.abstained
        assert certificate.extra["eps_out"] == pytest.approx(expected, rel=1e-6)


def test_center_beside_cohen_and_topk_gives_them_its_votes_and_changes_no_certificate():
    """Center's certification draws are Cohen's and TopK's estimation draws: one forward pass gives the
    features and the vote. Every certificate equals the one each certifier gives alone; the rows' forward
    passes less their shared passes add up to the passes the model ran (center's clean pass in its cost)."""
    images, labels, ids = load_demo("test")
    images, labels, ids = images[:4].float() / 255, labels[:4].tolist(), ids[:4]
    model = load_demo_model()
    certifiers = [Cohen(sigma=0.25, n0=50, n=300), TopK(sigma=0.25, k=2, n=600),
                  Center(sigma=0.25, eps_in=0.1, n=200, m=500),
                  Cohen(sigma=0.25, n0=50, n=2_000, mode="sequential", radii=[0.25])]
    certifiers = [certifier.for_inputs(on_grid=True) for certifier in certifiers]  # 8-bit images: sound noise
    columns = ["image_id", "setting", "prediction", "radius", "p_lower", "count", "n", "forward_passes", "eps_out"]
    counted = CountingModel(model)
    together = to_table(certify_rows(Engine(counted, batch_size=128), images, labels, certifiers, seed=0,
                                     image_ids=ids))
    alone = to_table([row for certifier in certifiers for row in certify_rows(Engine(model, batch_size=128), images,
                                                                              labels, [certifier], seed=0,
                                                                              image_ids=ids)])
    order = [("image_id", "ascending"), ("setting", "ascending")]
    assert together.sort_by(order).select(columns).equals(alone.sort_by(order).select(columns))
    rows = together.to_pylist()
    shared = {row["setting"]: json.loads(row["params"]).get("shared_passes", 0) for row in rows}
    assert shared[certifiers[0].setting] == 300  # all of Cohen's estimation draws came from center's passes
    assert shared[certifiers[1].setting] == 500  # TopK certifies the label: center's 500, then 100 of its own
    assert shared[certifiers[2].setting] == 0
    paid = sum(row["forward_passes"] - json.loads(row["params"]).get("shared_passes", 0) for row in rows)
    assert paid + 2 == counted.rows  # plus center's one probe of the output's shape and the class count's
