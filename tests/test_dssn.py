"""l1 certification with splitting noise: the authors' certificates, exactness, enumeration, soundness."""

import itertools
import math

import numpy as np
import pytest
import torch
from conftest import Affine
from scipy import stats as sps
from torch import nn

import pipeline
from pipeline.certifiers import DSSN, SSN, dssn
from pipeline.engine import Draws, Engine
from pipeline.noise import (
    DRAWS_PER_BLOCK,
    DerandomizedSplitting,
    SplittingAugment,
    dssn_levels,
    dssn_table,
    dssn_template,
)


@pytest.mark.parametrize(("sigma", "levels"), [(0.5, 441), (3.5, 3091)])
def test_reproduces_the_authors_dssn_certificates(reference, sigma, levels):
    folder = reference / "dssn" / f"cifar10_derandomized_sigma{sigma}"
    votes = np.load(folder / "preds.npy") * levels  # stored as counts / L
    counts = np.rint(votes).astype(np.int64)
    assert np.abs(votes - counts).max() < 1e-4 and (counts.sum(axis=1) == levels).all()
    assert dssn_levels(sigma, 255) == levels
    certificates = [dssn.certify_from_counts(row, q=255) for row in counts]
    np.testing.assert_array_equal([c[0] for c in certificates], np.load(folder / "predicted_labels.npy"))
    np.testing.assert_allclose([c[1] for c in certificates], np.load(folder / "radius_l1.npy"), rtol=0, atol=1e-6)


def enumerate_reference(x: np.ndarray, sigma: float, q: int = 255) -> np.ndarray:
    """The spec's DSSN samples, written out in float64 numpy: one row per offset j = 0..L-1."""
    levels = dssn_levels(sigma, q)
    template = np.random.RandomState(0).randint(levels, size=x.size).reshape(x.shape)
    rows = []
    for j in range(levels):
        split = ((template + j) % levels + 0.5) / q
        upper = split + (levels / q) * np.ceil(q * (x - split) / levels)
        rows.append((np.minimum(upper, 1) + np.maximum(upper - levels / q, 0)) / 2)
    return np.stack(rows)


def float64_cell_centre(k, m, levels: int, q: int) -> np.ndarray:
    """The noisy value for input level k and cut level m, the float64 formula written out: the cell's upper
    end is (m + 0.5 + L ceil((k - m - 0.5) / L)) / q, the value the centre of the cell clipped to [0, 1]."""
    k, m = np.asarray(k, dtype=np.float64), np.asarray(m, dtype=np.float64)
    upper = (m + 0.5 + levels * np.ceil((k - m - 0.5) / levels)) / q
    return (np.minimum(upper, 1.0) + np.maximum(upper - levels / q, 0.0)) / 2


def float64_apply(image: torch.Tensor, rows: torch.Tensor, levels: int, q: int) -> torch.Tensor:
    """The float64 `DerandomizedSplitting.apply` that the lookup table replaced."""
    level = torch.round(image.double() * q)
    cell = torch.floor((level - rows.double() - 1) / levels) + 1
    upper = (rows.double() + 0.5 + levels * cell) / q
    return (upper.clamp(max=1.0) + (upper - levels / q).clamp(min=0.0)) / 2


def same_bits(a, b) -> bool:
    a, b = np.asarray(a), np.asarray(b)
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


@pytest.mark.parametrize("sigma", [0.12, 0.25, 0.5, 1.0, 3.5])
def test_fp32_noise_is_the_float64_formula_rounded_once_for_every_level_pair(sigma):
    """Every (input level k = 0..255, cut level m = 0..L-1): the table, and fill + apply on an image that
    holds every level once, give the float64 formula rounded to fp32, bit for bit."""
    q = 255
    levels = dssn_levels(sigma, q)
    k, m = np.meshgrid(np.arange(q + 1), np.arange(levels), indexing="ij")
    expected = float64_cell_centre(k, m, levels, q).astype(np.float32)
    assert same_bits(dssn_table(levels, q).numpy(), expected)

    noise = DerandomizedSplitting((1, 16, 16), sigma=sigma, q=q, template="reference")
    image = (torch.arange(q + 1, dtype=torch.float32) / q).view(1, 16, 16)
    blocks = math.ceil(levels / DRAWS_PER_BLOCK)
    rows = torch.empty(blocks * DRAWS_PER_BLOCK, 1, 16, 16)
    for block in range(blocks):
        part = rows[block * DRAWS_PER_BLOCK:(block + 1) * DRAWS_PER_BLOCK]
        noise.fill(part, 0, "x", "dssn", block)
        noise.apply(image, part)
    template = dssn_template(q + 1, levels)
    cuts = (template[None, :] + np.arange(levels)[:, None]) % levels  # [j, i]: every m once per coordinate
    expected_rows = float64_cell_centre(np.arange(q + 1)[None, :], cuts, levels, q).astype(np.float32)
    assert same_bits(rows[:levels].view(levels, -1).numpy(), expected_rows)


@pytest.mark.parametrize("sigma", [0.25, 3.5])
def test_apply_on_random_images_equals_the_float64_apply_bit_for_bit(sigma):
    generator = torch.Generator().manual_seed(1)
    noise = DerandomizedSplitting((3, 8, 8), sigma=sigma, q=255, template="reference")
    rows = torch.empty(DRAWS_PER_BLOCK, 3, 8, 8)
    draws = torch.arange(DRAWS_PER_BLOCK, dtype=torch.float64).view(-1, 1, 1, 1)
    for block in (0, 21, 42):
        image = torch.randint(0, 256, (3, 8, 8), generator=generator).float() / 255
        noise.fill(rows, 0, "x", "dssn", block)
        raw = rows.clone()  # v + (j mod L): its cut level is that mod L
        expected_raw = noise.template.double() + torch.remainder(draws + block * DRAWS_PER_BLOCK, noise.levels)
        assert same_bits(raw.numpy(), expected_raw.float().numpy())
        cuts = torch.remainder(raw, noise.levels)
        for dtype in (torch.float16, torch.bfloat16):  # a lower-precision input rounds once, as before
            out = torch.empty(rows.shape, dtype=dtype).to(memory_format=torch.channels_last)
            noise.apply(image, raw, out)
            expected = float64_apply(image, cuts, noise.levels, 255).to(dtype)
            assert same_bits(out.float().numpy(), expected.float().numpy())
        noise.apply(image, rows)
        assert same_bits(rows.numpy(), float64_apply(image, cuts, noise.levels, 255).float().numpy())
    images = torch.randint(0, 256, (5, 3, 8, 8), generator=generator).float() / 255
    shifts = torch.randint(noise.levels, (5,), generator=torch.Generator().manual_seed(2))
    cuts = torch.remainder(noise.template.double() + shifts.view(-1, 1, 1, 1).double(), noise.levels)
    augmented = SplittingAugment("dssn", sigma)(images, torch.Generator().manual_seed(2))
    assert same_bits(augmented.numpy(), float64_apply(images, cuts, noise.levels, 255).float().numpy())


class Recorder(nn.Module):
    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, x):
        self.seen.append(x.clone())
        return torch.stack([x.flatten(1).mean(1), 1 - x.flatten(1).mean(1)], dim=1)


@pytest.mark.parametrize("batch_size", [1, 7, 64, 1000])
def test_enumeration_visits_every_offset_once(batch_size):
    images = torch.randint(0, 256, (2, 1, 3, 3)).float() / 255
    recorder = Recorder()
    draws = Draws("dssn", 0.4, dssn_levels(0.4, 255), noise="dssn", options=(("q", 255), ("template", "reference")))
    Engine(recorder, batch_size=batch_size).session().count(images, ["a", "b"], 0, [draws])
    seen = torch.cat(recorder.seen[1:]).double().numpy()  # the first call is the clean probe
    expected = np.concatenate([enumerate_reference(image.double().numpy(), 0.4) for image in images])
    assert seen.shape == expected.shape == (2 * dssn_levels(0.4, 255), 1, 3, 3)
    np.testing.assert_allclose(seen, expected, atol=1e-6)


def test_training_noise_is_the_certification_noise():
    image = torch.randint(0, 256, (1, 3, 4, 4)).float() / 255
    enumerated = torch.as_tensor(enumerate_reference(image[0].double().numpy(), 0.5)).float()
    augment = SplittingAugment("dssn", 0.5)
    for _ in range(16):
        noisy = augment(image)[0]
        assert (noisy - enumerated).flatten(1).abs().amax(1).min() < 1e-6


def l1_sphere(dimension: int, steps: int):
    """Every integer vector with l1 norm exactly `steps`."""
    for support in range(1, min(dimension, steps) + 1):
        for coordinates in itertools.combinations(range(dimension), support):
            for parts in itertools.combinations(range(1, steps), support - 1):
                sizes = np.diff([0, *parts, steps])
                for signs in itertools.product((-1, 1), repeat=support):
                    delta = np.zeros(dimension, dtype=np.int64)
                    delta[list(coordinates)] = sizes * np.array(signs)
                    yield delta


def test_no_flip_inside_the_certified_l1_radius_and_a_flip_just_outside():
    """A 3-class linear model on 1x4x4 inputs, sigma 0.05 (L = 44): the smoothed classifier is computed
    exactly by enumeration. Every grid perturbation with l1 norm up to the certified radius (all of those
    on the boundary, all inside) keeps the prediction; the search outside finds the nearest flip."""
    sigma, q = 0.05, 255
    noise = DerandomizedSplitting((1, 4, 4), sigma=sigma, q=q, template="reference")
    levels = noise.levels
    assert levels == 44
    shifts = torch.remainder(noise.template.double() + torch.arange(levels, dtype=torch.float64).view(-1, 1, 1, 1),
                             levels)

    rng = np.random.default_rng(3)
    weight = torch.as_tensor(rng.normal(size=(3, 16)))

    def smoothed(points: np.ndarray) -> np.ndarray:  # points: integer levels [P, 16] -> predictions [P]
        predictions = []
        for chunk in np.array_split(points, max(1, len(points) // 512)):
            images = torch.as_tensor(chunk / q).view(-1, 1, 1, 4, 4)
            rows = shifts.expand(len(chunk), *shifts.shape).clone()
            noise.apply(images, rows)
            votes = model(rows.reshape(-1, 1, 4, 4)).argmax(1).view(len(chunk), levels)
            counts = torch.stack([(votes == c).sum(1) for c in range(3)], dim=1)
            predictions.append(counts.argmax(1).numpy())  # ties go to the smaller index, as in the certificate
        return np.concatenate(predictions)

    for _ in range(200):  # an input near a decision boundary, so that the certified radius is small
        x = rng.integers(80, 176, size=16)
        bias = -(weight @ torch.as_tensor(x / q)) + torch.as_tensor(rng.normal(scale=0.1, size=3))
        model = Affine(weight, bias)
        images = torch.as_tensor(x / q, dtype=torch.float32).view(1, 1, 4, 4)
        row = pipeline.certify(model.float(), images, None, [DSSN(sigma=sigma, q=q)]).to_pylist()[0]
        model.double()
        steps = round(row["radius"] * q)
        if 1 <= steps <= 3:
            break
    else:
        pytest.fail("no input with a certified radius of 1 to 3 levels")
    assert smoothed(x[None])[0] == row["prediction"]

    for m in range(1, steps + 1):  # every grid point inside and on the certified ball
        inside = x + np.stack(list(l1_sphere(16, m)))
        assert (smoothed(inside) == row["prediction"]).all(), m

    flip_at = None
    for m in range(steps + 1, steps + 60):
        sphere = np.stack(list(l1_sphere(16, m))) if m == steps + 1 else None
        if sphere is None:
            directions = rng.normal(size=(3000, 16))
            sphere = np.round(directions / np.abs(directions).sum(1, keepdims=True) * m).astype(np.int64)
        if (smoothed(np.clip(x + sphere, 0, q)) != row["prediction"]).any():
            flip_at = m
            break
    assert flip_at is not None and flip_at > steps


def test_ssn_never_certifies_beyond_the_truth_more_often_than_alpha():
    """f(x) = 1[x~_0 > 1/2] under SSN with lambda = 1/2: the smoothed probability of class 1 is exactly x_0,
    and the smoothed classifier's true l1 radius is |x_0 - 1/2|. Over m images a certificate overstates it
    at most Binomial(m, alpha) often; the test fails above the 1 - 1e-6 quantile (false alarm < 1e-6).
    A point-estimate radius fails the same check, which shows the check has power."""

    class FirstPixel(nn.Module):
        def forward(self, x):
            score = x.flatten(1)[:, 0] - 0.5
            return torch.stack([-score, score], dim=1)

    sigma = 0.5 / math.sqrt(3)  # lambda = 1/2
    m, n, alpha = 300, 400, 0.05
    rng = torch.Generator().manual_seed(0)
    images = torch.rand(m, 1, 2, 2, generator=rng)
    x0 = images[:, 0, 0, 0].double().numpy()
    truth = np.abs(x0 - 0.5)
    table = pipeline.certify(FirstPixel(), images, None, [SSN(sigma=sigma, n0=20, n=n, alpha=alpha)], seed=2)
    rows = table.to_pandas()
    certified = ~rows.abstained.to_numpy()
    wrong = rows.prediction.to_numpy() != (x0 > 0.5)
    failures = certified & (wrong | (rows.radius.to_numpy() > truth))
    threshold = sps.binom.ppf(1 - 1e-6, m, alpha)
    assert certified.sum() > m / 2
    assert failures.sum() <= threshold
    p_hat = rows["count"].to_numpy() / n
    naive = (p_hat > 0.5) & (2 * 0.5 * (p_hat - 0.5) > truth)
    assert naive.sum() > threshold


def test_dssn_rejects_inputs_and_settings_outside_its_model():
    with pytest.raises(ValueError, match=r"image off-grid is not on the 1/255 grid \(largest deviation 0\.000"):
        pipeline.certify(Recorder(), torch.full((1, 1, 2, 2), 0.5 + 1e-3), None, [DSSN(sigma=0.5)],
                         image_ids=["off-grid"])
    with pytest.raises(ValueError, match=r"sigma=0\.001 is too small for q=255: L = .* = 0 levels"):
        DSSN(sigma=0.001)
    with pytest.raises(ValueError, match="q must be an integer >= 1"):
        DSSN(sigma=0.5, q=0)
    with pytest.raises(ValueError, match="alpha must be 0"):
        DSSN(sigma=0.5, alpha=0.001)
    with pytest.raises(ValueError, match="template must be"):
        DSSN(sigma=0.5, template="random")


def test_template_is_recorded_and_the_reference_one_matches_numpy():
    np.testing.assert_array_equal(dssn_template(12, 441), np.random.RandomState(0).randint(441, size=12))
    assert not np.array_equal(dssn_template(12, 441, 7), dssn_template(12, 441))
    images = torch.randint(0, 256, (1, 1, 2, 2)).float() / 255
    row = pipeline.certify(Recorder(), images, None, [DSSN(sigma=0.5)]).to_pylist()[0]
    assert row["norm"] == "l1" and row["alpha"] == 0.0 and not row["abstained"] and row["n"] == 441
    assert '"template_identity": "reference(d=4, L=441) sha256:' in row["params"]
    assert "the 1/255 grid" in row["params"]
