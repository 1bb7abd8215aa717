"""The nightly benchmark compares like with like, below Ray: figures of a changed suite entry (other weights
under the same label, another label, a certifier parameter) are listed as not compared with what changed,
never passed as "no regression"; the figures that still match are compared; the night's exit code says
which (0, 1, 4); an invalid suite is one line and exit 2. (tests/test_cluster.py runs real nights on Ray.)"""

import json
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pytest
import torch

from pipeline import cli, nightly
from pipeline.config import NightlySuite, read_yaml
from pipeline.nightly import suite as nights

ROOT = Path(__file__).resolve().parents[1]
DEMO_SUITE = ROOT / "jobs" / "configs" / "nightly_demo.yaml"
COHEN = "cohen(sigma=0.25, alpha=0.001, n0=100, n=1000, mode=certify)"
COHEN_CHANGED = "cohen(sigma=0.5, alpha=0.001, n0=100, n=1000, mode=certify)"
DSSN = "dssn(sigma=0.5, ...)"


def results(correct: dict[str, int], images: int = 16) -> pa.Table:
    """Result rows of the given settings over `images` images, the first `correct[setting]` certified
    correct at radius 0.6, the rest abstained."""
    rows = [{"image_id": f"image{k}", "setting": setting, "correct": k < hits, "status": "ok",
             "radius": 0.6 if k < hits else 0.0, "abstained": k >= hits, "forward_passes": 100, "norm": "l2",
             "targets": []} for setting, hits in correct.items() for k in range(images)]
    return pa.Table.from_pylist(rows)


def identity(weights: str = "aaaa", model: dict | None = None, max_images: int = 16) -> dict:
    return {"model_spec": json.dumps(model or {"name": "demo_cnn", "weights": None}, sort_keys=True),
            "model_sha256": weights * 6,
            "run_spec": json.dumps({"dataset": {"max": max_images}, "seed": 0}, sort_keys=True)}


def night(correct: dict[str, int], label: str = "demo_cnn", **entry) -> pd.DataFrame:
    return nightly.figures(label, results(correct), [0.0, 0.5], 10.0, 1, 0.5, certified_tonight=16,
                           identity=identity(**entry))


def test_an_unchanged_suite_is_compared_in_full():
    comparison = nightly.compare(night({COHEN: 16, DSSN: 16}), night({COHEN: 15, DSSN: 16}))
    assert not comparison["changed"].any() and not comparison["regression"].any()
    assert nightly.not_compared(comparison) == []


def test_other_weights_under_the_same_label_are_not_compared_and_the_change_is_named():
    """Row 88: the suite's model changed; DSSN's accuracy fell 1.0 -> 0.125 under the same setting string.
    An inner join used to pass this as 'no regression' over an empty table."""
    last = night({COHEN: 16, DSSN: 16}, weights="aaaa")
    tonight = night({COHEN: 2, DSSN: 2}, weights="bbbb", model={"name": "demo_cnn", "weights": "/ckpt/new.pt"})
    comparison = nightly.compare(tonight, last)
    assert comparison["changed"].all() and not comparison["regression"].any()
    (reason,) = nightly.not_compared(comparison)
    assert reason.startswith("not compared: the entry of demo_cnn changed: ")
    assert "weights aaaaaaaaaaaa -> bbbbbbbbbbbb" in reason and 'model.weights: null -> "/ckpt/new.pt"' in reason


def test_a_changed_certifier_setting_is_listed_and_the_matching_ones_are_still_compared():
    """Row 88 with only cohen's sigma changed: cohen's figures are on one night each, listed; DSSN (the same
    setting string) is compared, and its fall from 1.0 to 0.125 is a regression; throughput, which measures
    other work now, is not compared."""
    comparison = nightly.compare(night({COHEN_CHANGED: 16, DSSN: 2}), night({COHEN: 16, DSSN: 16}))
    reasons = nightly.not_compared(comparison)
    assert f"not compared: demo_cnn {COHEN_CHANGED} is only in the suite of tonight" in reasons
    assert f"not compared: demo_cnn {COHEN} is only in the suite of the earlier night" in reasons
    assert "not compared: the settings of demo_cnn changed, so its throughput measures other work" in reasons
    dssn = comparison[comparison["setting"] == DSSN].set_index("figure")
    assert not dssn["changed"].any() and dssn.loc["certified_accuracy@0", "regression"]


def test_a_renamed_model_and_a_changed_radius_are_named_per_night():
    comparison = nightly.compare(night({COHEN: 16}, label="demo_v2"), night({COHEN: 16}))
    assert set(nightly.not_compared(comparison)) == {"not compared: model demo_v2 is only in the suite of tonight",
                                                     "not compared: model demo_cnn is only in the suite of the "
                                                     "earlier night"}
    wider = nightly.figures("demo_cnn", results({COHEN: 16}), [0.0, 0.75], 10.0, 1, 0.5, 16, identity())
    reasons = nightly.not_compared(nightly.compare(wider, night({COHEN: 16})))
    assert reasons == [f"not compared: certified_accuracy@0.5 of demo_cnn {COHEN} is only in the suite of the "
                       f"earlier night", f"not compared: certified_accuracy@0.75 of demo_cnn {COHEN} is only in "
                       f"the suite of tonight"]


def test_a_night_that_recorded_no_identity_is_matched_on_the_label():
    older = night({COHEN: 16}).drop(columns=list(nightly.IDENTITY))
    comparison = nightly.compare(night({COHEN: 16}), older)
    assert not comparison["changed"].any()


def demo_suite(output: Path, *overrides: str) -> NightlySuite:
    return NightlySuite.from_dict(read_yaml(DEMO_SUITE, [f"output={output}", *overrides]))


def earlier_night(output: Path, figures: pd.DataFrame, date: str = "2026-12-01") -> None:
    folder = output / "nightly" / date
    folder.mkdir(parents=True)
    pa.parquet.write_table(pa.Table.from_pandas(figures, preserve_index=False), folder / "figures.parquet")


@pytest.mark.parametrize(("tonight", "code", "printed"), [
    (night({COHEN: 16, DSSN: 16}), nights.EXIT_OK, None),
    (night({COHEN: 16, DSSN: 16}, weights="bbbb"), nights.EXIT_SUITE_CHANGED,
     "NOT COMPARED: no figure of tonight matches the night 2026-12-01 (the suite changed)"),
    (night({COHEN_CHANGED: 16, DSSN: 16}), nights.EXIT_SUITE_CHANGED, "figures do not match the night 2026-12-01"),
    (night({COHEN_CHANGED: 16, DSSN: 2}), nights.EXIT_REGRESSION, f"REGRESSION demo_cnn {DSSN}"),
])
def test_the_nights_exit_code_and_report_say_what_was_compared(tmp_path, capsys, tonight, code, printed):
    import pyarrow.parquet  # noqa: F401 - pa.parquet for earlier_night

    earlier_night(tmp_path, night({COHEN: 16, DSSN: 16}))
    lines, got = nights.comparison_section(demo_suite(tmp_path), "2026-12-02", tonight)
    out = capsys.readouterr().out
    assert got == code
    report = "\n".join(lines)
    assert "## Against 2026-12-01" in report
    if printed is None:
        assert out == "" and "NOT COMPARED" not in report
    else:
        assert printed in out
    if code == nights.EXIT_SUITE_CHANGED:
        assert "## NOT COMPARED" in report and "not compared: " in report and "NOT COMPARED" in out


def test_an_invalid_suite_is_one_line_and_exit_2(tmp_path, capsys):
    """Row 87: `--set run.certifiers.0.sigma=-1` was a traceback with exit 1, the regression code."""
    code = cli.main(["nightly", "--config", str(DEMO_SUITE), "--set", f"output={tmp_path}", "--set",
                     "run.certifiers.0.sigma=-1", "--date", "2026-12-02"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("pipeline: invalid nightly suite: ") and "sigma" in err and "-1" in err
    assert "Traceback" not in err and not (tmp_path / "nightly").exists()


def test_the_entry_identity_tells_other_weights_under_the_same_path_apart(tmp_path):
    from pipeline.models import load_demo_model

    suite = demo_suite(tmp_path)
    model = load_demo_model()
    torch.save(model.state_dict(), tmp_path / "weights.pt")
    changed = demo_suite(tmp_path, f"models.0.model.weights={tmp_path / 'weights.pt'}")
    config = changed.run_config(changed.models[0], str(tmp_path))
    same = nights.entry_identity(config)
    assert same["model_sha256"] == nights.entry_identity(suite.run_config(suite.models[0], str(tmp_path)))[
        "model_sha256"]
    with torch.no_grad():
        model.head.weight.mul_(-1)
    torch.save(model.state_dict(), tmp_path / "weights.pt")
    other = nights.entry_identity(config)
    assert other["model_spec"] == same["model_spec"] and other["run_spec"] == same["run_spec"]
    assert other["model_sha256"] != same["model_sha256"]
    assert json.loads(same["run_spec"])["dataset"]["max"] == 60
