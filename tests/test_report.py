"""The report from result rows alone: short setting names, plots whose axes keep their width, the
self-contained HTML page, comparisons with other runs and published logs, and the progress display."""

import base64
import math
import re
from html.parser import HTMLParser

import numpy as np
import pyarrow as pa
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg

from pipeline import cli, compare, report
from pipeline.certifiers import DSSN, SSN, Center, Certificate, Cohen, TopK, cohen
from pipeline.certifiers.base import Cost
from pipeline.labels import parse_setting, short_labels
from pipeline.progress import Progress
from pipeline.results import RowContext, result_row, to_table
from pipeline.storage import open_location

SEQUENTIAL = Cohen(sigma=0.25, n=20_000, mode="sequential", radii=(0.0, 0.25, 0.5))
CERTIFIERS = [Cohen(sigma=0.25, n0=100, n=2000), Cohen(sigma=0.5, n0=100, n=2000), TopK(k=3, sigma=0.25, n=2000),
              SEQUENTIAL, DSSN(sigma=0.5), SSN(sigma=0.5, n=2000),
              Center(sigma=0.25, eps_in=0.25, n=2000, m=2000)]


def certificate(certifier, rng, label: int) -> Certificate:
    """A plausible certificate: mostly correct, radii below the setting's largest certifiable radius."""
    if certifier.name == "center":
        abstained = rng.random() < 0.2
        return Certificate(prediction=None, radius=0.0 if abstained else 0.25, cost=Cost(2000, 4000),
                           abstained=abstained, extra={
                               "eps_in": 0.25, "metric": "l2", "output": "features", "smoothing_error": rng.random(),
                               **({"abstain_reason": "check failed: 0.41 of 2000"} if abstained
                                  else {"eps_out": 3 + rng.random()})})
    prediction = label if rng.random() < 0.85 else (-1 if rng.random() < 0.5 else (label + 1) % 10)
    radius = 0.0 if prediction == -1 else float(rng.uniform(0, 0.6))
    return Certificate(prediction=prediction, radius=radius, cost=Cost(certifier.n if hasattr(certifier, "n") else 441,
                                                                       100), topk_labels=None)


def results(images: int = 40, seed: int = 0, run_id: str = "small", certifiers=CERTIFIERS) -> pa.Table:
    """Rows of every certifier for `images` images, built by the one row builder (no model needed)."""
    rng = np.random.default_rng(seed)
    context = RowContext(seed=0, run={"run_id": run_id, "model": "demo_cnn"}, num_classes=10)
    rows = []
    for index in range(images):
        label = int(rng.integers(0, 10))
        for certifier in certifiers:
            rows.append(result_row(certifier, certificate(certifier, rng, label), index, f"img{index}", label,
                                   float(rng.uniform(0.1, 1.0)), context))
    rows.append(result_row(CERTIFIERS[0], Certificate.failed("img-bad: cannot decode"), images, "img-bad", 3, 0.0,
                           context))
    return to_table(rows)


class Page(HTMLParser):
    """What the tests look for in the HTML: tags in order, image sources, headings and external links."""

    def __init__(self):
        super().__init__()
        self.tags, self.images, self.headings, self.links = [], [], [], []
        self._heading = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append(tag)
        if tag == "img":
            self.images.append(attrs["src"])
        for key in ("href", "src"):
            if key in attrs and re.match(r"(https?:)?//", attrs[key]):
                self.links.append(attrs[key])
        if tag in ("h2", "h3"):
            self._heading = ""

    def handle_data(self, data):
        if self._heading is not None:
            self._heading += data

    def handle_endtag(self, tag):
        if tag in ("h2", "h3") and self._heading is not None:
            self.headings.append((self._heading, len(self.tags)))
            self._heading = None


def test_short_labels_name_the_settings_that_differ_and_stay_unique():
    labels = short_labels([c.setting for c in CERTIFIERS])
    assert labels[CERTIFIERS[0].setting] == "cohen sigma=0.25 n=2000"
    assert labels[CERTIFIERS[1].setting] == "cohen sigma=0.5 n=2000"
    assert labels[SEQUENTIAL.setting] == "cohen sequential sigma=0.25 n=20000"
    assert labels[CERTIFIERS[2].setting] == "topk sigma=0.25 k=3"
    assert len(set(labels.values())) == len(labels) and max(map(len, labels.values())) <= 40
    twins = [Cohen(sigma=0.25, n=2000, alpha=0.001).setting, Cohen(sigma=0.25, n=2000, alpha=0.01).setting]
    assert sorted(short_labels(twins).values()) == ["cohen sigma=0.25 alpha=0.001", "cohen sigma=0.25 alpha=0.01"]
    assert parse_setting(SEQUENTIAL.setting)[1]["radii"] == "(0.0, 0.25, 0.5)"
    assert SEQUENTIAL.targets == (0.0, 0.25, 0.5) and CERTIFIERS[0].targets == ()


def test_max_radius_is_the_certificate_of_unanimous_draws_and_rows_record_it():
    cohen_max = Cohen(sigma=0.25, n=2000, n0=100, alpha=0.001).max_radius()
    assert cohen_max == pytest.approx(cohen.max_radius(0.25, 2000, 0.001))
    assert DSSN(sigma=0.5, q=255).max_radius() == pytest.approx(220 / 255)
    assert Cohen(sigma=0.25, n=20000, mode="sequential", radii=(0.5,)).max_radius() is None
    assert TopK(k=3, sigma=0.25, n=2000).max_radius() is None  # its bounds depend on the number of classes
    rows = results(images=2).to_pandas().groupby("setting").first()
    assert rows.loc[CERTIFIERS[0].setting, "max_radius"] == pytest.approx(cohen_max)
    assert rows.loc[CERTIFIERS[2].setting, "max_radius"] == pytest.approx(
        TopK(k=3, sigma=0.25, n=2000).max_radius(num_classes=10))
    sequential = rows.loc[SEQUENTIAL.setting]
    assert math.isnan(sequential["max_radius"]) and list(sequential["targets"]) == [0.0, 0.25, 0.5]
    assert list(rows.loc[CERTIFIERS[0].setting, "targets"]) == []
    kinds = [rows.loc[certifier.setting, "kind"] for certifier in CERTIFIERS]
    assert kinds == ["counting", "counting", "counting", "sampling", "counting", "counting", "output"]


def test_tables_use_short_names_and_a_sequential_setting_only_at_its_targets():
    rows = report.combined_rows([report.Source("small", results())])
    radii = report.table_radii(rows, "l2")
    assert radii == [0.0, 0.25, 0.5, 0.75, 1.0]  # cut at 1.35, the largest radius any l2 setting can certify
    table = report.accuracy_table(rows, "l2", [0.0, 0.25, 0.4, 0.5])
    sequential = table.loc["cohen sequential sigma=0.25 n=20000"]
    assert math.isnan(sequential["r=0.4"]) and math.isnan(sequential["ACR"]) and not math.isnan(sequential["r=0.5"])
    assert (table.drop(index=sequential.name)["r=0.4"].notna()).all()
    text = report.summary(results())
    assert "| cohen sigma=0.25 n=2000 " in text and "img-bad: cannot decode" in text
    legend = (r"\| cohen sigma=0\.25 n=2000\s+\| cohen\s+\| l2\s+\| gaussian\s+\| [^|]+\| "
              + re.escape(CERTIFIERS[0].setting))
    assert re.search(legend, text)  # the legend maps the name to its noise, what it covers and the full setting
    assert report.COVERS_NOTE in text and "| dssn " in text and "grid 1/255" in text


def test_report_html_is_self_contained_with_a_table_per_norm(tmp_path):
    location = open_location(str(tmp_path / "report"))
    manifest = {"run_id": "small", "status": "finished", "config": {"seed": 0, "dataset": {"layout": "demo"}}}
    report.write_report(results(), location, manifest=manifest)
    files = {path.name for path in (tmp_path / "report").iterdir()}
    assert {"index.html", "summary.md", "certified_accuracy.csv", "curves_l1.png", "curves_l2.png",
            "eps_out.png"} <= files
    page = Page()
    page.feed((tmp_path / "report" / "index.html").read_text())
    page.close()
    assert page.tags[0] == "html" and not page.links  # nothing to fetch
    assert len(page.images) == 3 and all(src.startswith("data:image/png;base64,") for src in page.images)
    assert all(base64.b64decode(src.split(",", 1)[1]).startswith(b"\x89PNG") for src in page.images)
    for norm in ("l1", "l2"):
        position = next(position for heading, position in page.headings if heading == f"{norm} radius")
        assert "table" in page.tags[position:position + 3], f"no table under the {norm} heading"
    headings = {heading for heading, _ in page.headings}
    assert {"Output certificates", "Cost, abstentions and errors", "Settings", "Run", "Error rows"} <= headings


def axes_width_fraction(figure) -> float:
    """The widest axes' tight bounding box (ticks and labels included) over the figure's width."""
    renderer = FigureCanvasAgg(figure).get_renderer()
    figure.draw(renderer)
    return max(axes.get_tightbbox(renderer).width for axes in figure.axes) / figure.bbox.width


@pytest.mark.parametrize("many", [False, True])
def test_plot_axes_keep_at_least_half_the_figure_width(many):
    certifiers = CERTIFIERS
    if many:  # eight more l2 settings that differ in several ways: a long legend
        certifiers = CERTIFIERS + [Cohen(sigma=s, n0=n0, n=n, alpha=a) for s in (0.12, 0.5) for n0 in (50, 100)
                                   for n, a in ((500, 0.01), (4000, 0.001))]
    rows = report.combined_rows([report.Source("small", results(certifiers=certifiers))])
    for norm in ("l1", "l2"):
        figure = report.curves_figure(rows, norm)
        assert axes_width_fraction(figure) >= 0.5
        axes = figure.axes[0]
        assert axes.get_xlim()[0] == 0 and axes.get_ylim()[0] == 0
        legend = figure.legends[0]
        renderer = FigureCanvasAgg(figure).get_renderer()
        assert legend.get_window_extent(renderer).y1 <= axes.get_tightbbox(renderer).y0 + 1  # below the axes


def test_newcombe_interval_reproduces_the_published_example():
    """Newcombe (1998), Statistics in Medicine 17:873, example (a): 56/70 against 48/80, method 10."""
    low, high = compare.newcombe_interval(48, 80, 56, 70)
    assert (round(low, 4), round(high, 4)) == (0.0524, 0.3339)


def test_compare_prints_differences_with_intervals_and_report_overlays_a_published_log(tmp_path, capsys, reference):
    for name, seed in (("a", 0), ("b", 1)):
        open_location(str(tmp_path / name)).join("results").write_parquet("part-0.parquet", results(seed=seed))
    assert cli.main(["compare", str(tmp_path / "a"), str(tmp_path / "b")]) == 0
    printed = capsys.readouterr().out
    assert "b - a: certified accuracy" in printed and "Newcombe" in printed
    assert re.search(r"\| cohen sigma=0\.25 n=2000\s+\| r=0\.25 .*\[[-+]\d\.\d{3}, [-+]\d\.\d{3}\]", printed)
    differences = compare.differences(compare.load_source(str(tmp_path / "a")),
                                      compare.load_source(str(tmp_path / "b")))
    assert (differences["low"] <= differences["difference"]).all()
    assert (differences["difference"] <= differences["high"]).all()

    log = reference / "cohen" / "imagenet_resnet50_sigma0.50.tsv"
    assert cli.main(["report", str(tmp_path / "a"), "--compare", f"{log},label=cohen2019"]) == 0
    html = (tmp_path / "a" / "report" / "index.html").read_text()
    assert "cohen2019" in html and "cohen sigma=0.5 n=100000" in html
    assert cli.main(["report", str(tmp_path / "a"), "--compare", str(tmp_path / "missing.tsv")]) == 2
    assert "neither a certify log file nor a run" in capsys.readouterr().err


def test_progress_off_a_terminal_writes_a_few_lines_not_one_per_batch():
    now = [0.0]
    lines = []
    with Progress(1000, "images", "certified", tty=False, emit=lines.append, clock=lambda: now[0]) as progress:
        for _ in range(500):
            now[0] += 1.0
            progress.update(2, failed=1 if _ == 7 else 0)
    assert 9 <= len(lines) <= 12, lines
    assert lines[-1].startswith("certified: 1000/1000 images (100%), 2.00 images/s") and "1 failed" in lines[-1]
    assert any("100/1000 images (10%)" in line and "ETA 7 min 30 s" in line for line in lines), lines


def test_progress_eta_leaves_out_the_start_up_and_a_slow_start_still_shows_life():
    now = [0.0]
    lines = []
    progress = Progress(100, "images", "certified", tty=False, emit=lines.append, clock=lambda: now[0])
    now[0] = 11.0
    progress._tick_once()
    assert lines == ["certified: 0/100 images (0%), elapsed 11 s, none finished yet, 0 failed"]
    now[0] = 120.0  # 110 s of start-up, then 10 images every 10 s
    progress.update(10)
    now[0] = 130.0
    progress.update(10)
    assert lines[-1].startswith("certified: 20/100 images (20%), 1.00 images/s") and "ETA 1 min 20 s" in lines[-1]
    progress.close()
