"""The next certifier in its own file: a new noise, a new norm and an output certifier, defined in
`tests/toy_certifiers.py` and registered, certify through the engine, and the report and compare handle
their rows with no other edit (tables per norm, the largest-radius marker, the output histogram)."""

import math

import numpy as np
import pytest
from scipy.stats import norm as gaussian
from toy_certifiers import TOYS, Laplace, ToyLaplace, ToyLinf, ToyLipschitz

import pipeline
from pipeline import compare, report
from pipeline.certifiers import REGISTRY, Certificate, Certifier, Cohen, register
from pipeline.certifiers.base import Cost
from pipeline.data.demo import load_demo
from pipeline.models import load_demo_model
from pipeline.noise import make_noise
from pipeline.results import RowContext, result_row, to_table
from pipeline.storage import open_location

LAPLACE, LINF, LIPSCHITZ = ToyLaplace(sigma=0.5, n=1000), ToyLinf(sigma=0.5, n=1000), ToyLipschitz(sigma=0.5)
CERTIFIERS = [Cohen(sigma=0.25, n0=100, n=1000), LAPLACE, LINF, LIPSCHITZ]


def certificate(certifier: Certifier, rng, label: int) -> Certificate:
    """A plausible certificate of the certifier's kind: an output bound, or a mostly correct class with a
    radius below the setting's largest."""
    if certifier.kind == "output":
        return certifier.run(None, None, ["one"], 0)[0]
    prediction = label if rng.random() < 0.85 else -1
    radius = 0.0 if prediction == -1 else float(rng.uniform(0, certifier.max_radius(10)))
    return Certificate(prediction=prediction, radius=radius, cost=Cost(certifier.n, certifier.n0))


def results(seed: int = 0, images: int = 30):
    rng = np.random.default_rng(seed)
    context = RowContext(seed=seed, run={"run_id": f"toys{seed}"}, num_classes=10)
    labels = rng.integers(0, 10, images).tolist()
    return to_table([result_row(certifier, certificate(certifier, rng, label), index, f"img{index}", label, 0.1,
                                context) for index, label in enumerate(labels) for certifier in CERTIFIERS])


def test_toys_register_and_declare_their_kind_norm_and_largest_radius():
    for toy in TOYS:
        assert register(toy) is toy and REGISTRY[toy.name] is toy
    assert register(ToyLinf) is ToyLinf  # registering again is harmless; another class under a taken name is not
    with pytest.raises(ValueError, match="taken by ToyLinf"):
        register(type("Impostor", (ToyLaplace,), {"name": "toy_linf"}))
    assert [(toy.kind, toy.norm) for toy in (LAPLACE, LINF, LIPSCHITZ)] == [
        ("counting", "l1"), ("counting", "linf"), ("output", "l2")]
    unanimous = 0.001 ** (1 / 1000)  # the Clopper–Pearson lower bound of 1000 successes in 1000
    assert LAPLACE.max_radius() == pytest.approx(-0.5 / math.sqrt(2) * math.log(2 * (1 - unanimous)))
    assert LINF.max_radius() == pytest.approx(0.5 * gaussian.ppf(unanimous) / math.sqrt(3 * 32 * 32))
    assert LIPSCHITZ.max_radius() is None and LIPSCHITZ.targets == ()
    assert isinstance(make_noise("laplace", (3, 4, 4), "cpu", 0.5), Laplace)


def test_report_writes_a_table_per_norm_the_largest_radius_marker_and_the_output_histogram(tmp_path):
    table = results()
    text = report.write_report(table, open_location(str(tmp_path)))
    files = {path.name for path in tmp_path.iterdir()}
    assert {"curves_l1.png", "curves_l2.png", "curves_linf.png", "eps_out.png", "index.html"} <= files
    for norm in ("l1", "l2", "linf"):
        assert f"## Certified accuracy, {norm} radius" in text
    assert "## Output certificates" in text and "toy_lipschitz" in text

    rows = report.combined_rows([report.Source("toys", table)])
    radii = report.table_radii(rows, "linf")  # no default radii for linf: a grid up to the largest radius
    assert radii[0] == 0.0 and len(radii) >= 4 and max(radii) <= LINF.max_radius(10)
    axes = report.curves_figure(rows, "linf").axes[0]
    markers = [line.get_xdata()[0] for line in axes.get_lines() if line.get_marker() == "^"]
    assert markers == [pytest.approx(LINF.max_radius(10))]
    assert f"median eps_out {math.sqrt(2 / math.pi) * 0.25 / 0.5:.3g} at eps_in 0.25" in report.brief(table)


def test_compare_pairs_the_toy_settings_of_two_runs():
    a, b = report.Source("a", results(seed=0)), report.Source("b", results(seed=1))
    differences = compare.differences(a, b)
    assert {"l1", "l2", "linf"} <= set(differences["norm"])
    linf = differences[differences["norm"] == "linf"]
    assert "ACR" in set(linf["figure"]) and (linf["low"] <= linf["difference"]).all()
    assert "linf (30 vs 30 images)" in compare.format_differences(differences, a, b)


def test_toys_certify_through_the_engine_on_their_own_noise():
    images, labels, ids = load_demo("test")
    images = images[:4].float() / 255
    toys = [ToyLaplace(sigma=0.25, n0=32, n=256), ToyLinf(sigma=0.25, n0=32, n=256), ToyLipschitz(sigma=0.25)]
    table = pipeline.certify(load_demo_model(), images, labels[:4].tolist(), toys, image_ids=ids[:4],
                             batch_size=256)
    rows = table.to_pandas()
    assert (rows["status"] == "ok").all() and len(rows) == 12
    assert list(rows.groupby("certifier", sort=False)["kind"].first()) == ["counting", "counting", "output"]
    assert list(rows.groupby("certifier", sort=False)["norm"].first()) == ["l1", "linf", "l2"]
    laplace = rows[rows["certifier"] == "toy_laplace"]
    assert (laplace["forward_passes"] == 32 + 256).all() and (laplace["max_radius"] >= laplace["radius"]).all()
    gaussian = pipeline.certify(load_demo_model(), images, labels[:4].tolist(),
                                [Cohen(sigma=0.25, n0=32, n=256, gaussian="real")], image_ids=ids[:4],
                                batch_size=256).to_pandas()
    assert list(laplace["count"]) != list(gaussian["count"])  # the Laplace draws, not the Gaussian ones
