"""`pipeline report` and `pipeline compare` on damaged or mismatched input: a results file that is not result
rows (truncated, other columns) is named in one line with exit 2, never a traceback; the brief
says when a run is not finished; compare lists the settings it could not pair, warns when the sources hold
different images, and shows an undefined interval as n/a with the reason."""

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_report import CERTIFIERS, results

from pipeline import cli, compare
from pipeline.certifiers import Cohen
from pipeline.storage import open_location


def write_run(folder, table: pa.Table, manifest: dict | None = None) -> str:
    location = open_location(str(folder))
    location.join("results").write_parquet("part-0.parquet", table)
    if manifest is not None:
        location.write_json("manifest.json", manifest)
    return str(folder)


def truncated(path):
    path.write_bytes(path.with_name("part-0.parquet").read_bytes()[:200])


def other_columns(path):
    pq.write_table(pa.table({"x": [1.0, 2.0], "y": ["a", "b"]}), path)


@pytest.mark.parametrize(("plant", "says"), [
    (truncated, "cannot be read as result rows: ArrowInvalid"),  # row 53: a raw ArrowInvalid traceback
    (other_columns, "it lacks the result column(s) image_index, image_id"),  # row 54b: a TypeError in short_labels
])
def test_a_results_file_that_is_not_result_rows_is_named_in_one_line(tmp_path, capsys, plant, says):
    run = write_run(tmp_path / "a", results(images=6))
    planted = tmp_path / "a" / "results" / "planted.parquet"
    plant(planted)
    for command in (["report", run], ["compare", run, run], ["report", write_run(tmp_path / "b", results(images=4)),
                                                             "--compare", run]):
        assert cli.main(command) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith(f"pipeline: {planted} is not a file of result rows (")
        assert says in err and f"move it out of {tmp_path / 'a' / 'results'} or delete it" in err


@pytest.mark.parametrize(("manifest", "says"), [
    ({"run_id": "a", "status": "running"}, "NOT FINISHED: run a is running; the figures cover the"),
    ({"run_id": "a", "status": "failed", "reason": "StorageOutage: bucket unreachable"},
     "NOT FINISHED: run a is failed: StorageOutage: bucket unreachable;"),
    ({"run_id": "a", "status": "finished"}, None),
])
def test_the_brief_says_when_the_run_is_not_finished(tmp_path, capsys, manifest, says):
    """Row 73: the console brief of a run in progress read like a finished run's."""
    assert cli.main(["report", write_run(tmp_path / "a", results(images=6), manifest)]) == 0
    out = capsys.readouterr().out
    assert ("NOT FINISHED" in out) == (says is not None)
    if says:
        assert out.startswith(says)


def test_compare_lists_unpaired_settings_and_warns_of_other_images(tmp_path, capsys):
    """Row 74: a setting without a partner vanished without a word, two runs on disjoint datasets were compared
    with no warning, and a 1-image ACR interval read [+nan, +nan]."""
    a = write_run(tmp_path / "a", results(images=8, certifiers=CERTIFIERS[:2]))
    extra = Cohen(sigma=1e9, n0=100, n=2000)
    b = write_run(tmp_path / "b", results(images=8, certifiers=[CERTIFIERS[0], extra]))
    assert cli.main(["compare", a, b]) == 0
    out = capsys.readouterr().out
    assert "only in a: cohen sigma=0.5 (no setting of b pairs with it; not compared)" in out
    assert "only in b: cohen sigma=1000000000.0 (no setting of a pairs with it; not compared)" in out
    assert "share" not in out

    other = results(images=8, certifiers=CERTIFIERS[:1]).to_pylist()
    disjoint = write_run(tmp_path / "c", pa.Table.from_pylist([{**row, "image_id": "other/" + row["image_id"]}
                                                               for row in other], schema=results(1).schema))
    assert cli.main(["compare", a, disjoint]) == 0
    assert "warning: a (9 images) and c (9 images) share no image (image_id)" in capsys.readouterr().out
    half = write_run(tmp_path / "d", results(images=4, certifiers=CERTIFIERS[:1]))
    assert cli.main(["compare", a, half]) == 0
    assert "share only 5 images (image_id)" in capsys.readouterr().out


def test_an_interval_over_one_image_is_n_a_with_the_reason(tmp_path, capsys):
    one = results(images=1, certifiers=CERTIFIERS[:1]).slice(0, 1)  # without the error row
    a, b = write_run(tmp_path / "a", one), write_run(tmp_path / "b", results(images=8, certifiers=CERTIFIERS[:1]))
    frame = compare.differences(compare.load_source(a), compare.load_source(b))
    acr = frame.set_index("figure").loc["ACR"]
    assert acr["note"] == "n/a: Welch's t needs 2 or more images on each side (1 vs 9)"
    assert cli.main(["compare", a, b]) == 0
    out = capsys.readouterr().out
    assert "nan" not in out and "| n/a " in out
    assert "cohen sigma=0.25 ACR: n/a: Welch's t needs 2 or more images on each side (1 vs 9)" in out


def test_a_manifest_that_is_not_json_is_named(tmp_path, capsys):
    run = write_run(tmp_path / "a", results(images=4))
    (tmp_path / "a" / "manifest.json").write_text('{"run_id": "a",')
    assert cli.main(["report", run]) == 2
    assert f"{tmp_path / 'a' / 'manifest.json'} is not valid JSON" in capsys.readouterr().err
