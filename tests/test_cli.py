"""The configuration and the command line, end to end on the demo set."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline import batch_probe, cli, results
from pipeline.config import ConfigError, load_config
from pipeline.models import load_demo_model
from pipeline.results import read_results
from pipeline.storage import open_location

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "jobs" / "configs" / "demo.yaml"
SMALL = ["dataset.skip=1", "dataset.max=8", "actors.count=1", "certifiers.0.n=200", "certifiers.1.n=200",
         "certifiers.3.n=200", "certifiers.4.n=500", "certifiers.4.m=500", "certifiers.6.n=2000"]


def test_demo_config_loads_and_overrides_apply():
    config = load_config(DEMO, ["certifiers.0.sigma=0.5", "seed=3"])
    cohen, topk, dssn, ssn, center, reduce, sequential = config.certifiers
    assert (cohen.name, cohen.sigma, topk.k, config.seed) == ("cohen", 0.5, 3, 3)
    assert (sequential.mode, sequential.radii, sequential.n) == ("sequential", (0.0, 0.25, 0.5), 10000)
    assert (dssn.name, dssn.levels, ssn.name, center.output) == ("dssn", 441, "ssn", "features")
    assert (reduce.placement, reduce.num_patches, reduce.noise) == ("random", 4, "shared")


@pytest.mark.parametrize(("override", "message"), [
    ("certifiers.0.name=smoothed", r"certifiers\[0\]\.name: unknown certifier 'smoothed'"),
    ("certifiers.0.sigma=-1", r"certifiers\[0\]: cohen: sigma must be a finite number > 0"),
    ("certifiers.1.k=0", r"certifiers\[1\]: topk: k must be an integer >= 1"),
    ("certifiers.0.sigmaa=0.5", r"certifiers\[0\]: unknown setting\(s\) \['sigmaa'\]"),
    ("certifiers=[]", "certifiers: give a non-empty list"),
    ("batchsize=10", r"unknown config key\(s\) \['batchsize'\]"),
    ("precision=int8", "precision must be one of"),
    ("dataset.layout=imagenet21k", "dataset.layout: unknown layout"),
    ("model.name=vit_tiny", "model.name: unknown model"),
    ("dataset.size=0", r"dataset\.size \(the centre-crop side\) must be an integer >= 1"),
    ("actors.gpus=-1", r"actors\.gpus must be a number >= 0"),
    ("run_id=a/b", "run_id must be letters"),
])
def test_invalid_configs_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(DEMO, [override])


def test_unreadable_config_and_weights_give_clear_errors(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("certifiers: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "bad.yaml")
    (tmp_path / "weights.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot load demo model weights"):
        load_demo_model(tmp_path / "weights.pt")


def test_certify_and_report_commands_write_results_and_a_report(ray_cluster, tmp_path, capfd, caplog):
    args = ["certify", "--config", str(DEMO), "--output", str(tmp_path), "--run-id", "small"]
    assert cli.main(args + [item for override in SMALL for item in ("--set", override)]) == 0
    out, err = capfd.readouterr()
    printed = (out + err).splitlines()
    assert len(printed) <= 40, "\n".join(printed)  # quiet: no Ray Data progress dumps or INFO logs
    assert not [line for line in printed if "logging_progress" in line or "streaming_executor" in line]
    assert any(line.startswith("Certified accuracy, l2 radius (8 images)") for line in printed)
    assert "certified: 8/8 images (100%)" in caplog.text  # the run's one progress display
    assert f"report: {tmp_path / 'small' / 'report' / 'index.html'}" in out
    table = read_results(open_location(str(tmp_path / "small")).join("results"))
    assert table.schema.equals(results.SCHEMA)
    assert table.num_rows == 56
    assert set(table.column("certifier").to_pylist()) == {"cohen", "topk", "dssn", "ssn", "center", "smooth_reduce"}
    assert set(table.column("run_id").to_pylist()) == {"small"}
    summary = (tmp_path / "small" / "report" / "summary.md").read_text()
    assert "| cohen sigma=0.25 n=200 " in summary and "ACR" in summary and "| cohen(sigma=0.25" in summary
    assert "median_eps_out" in summary and (tmp_path / "small" / "report" / "index.html").exists()
    manifest = json.loads((tmp_path / "small" / "manifest.json").read_text())
    assert manifest["status"] == "finished" and manifest["counts"]["images"] == 8
    assert manifest["packages"]["torch"] and manifest["config"]["seed"] == 0
    assert manifest["config"]["batch_size"] == "auto"  # each actor's probe chose its batch size, recorded
    assert manifest["batch"] and {entry["chosen_by"] for entry in manifest["batch"]} == {"probe"}
    for entry in manifest["batch"]:  # the choice is the fastest size probed (timings vary; the rule does not)
        rates = entry["probe"]["draws_per_s"]
        assert rates[str(entry["size"])] >= batch_probe.TIE * max(rates.values()) - 0.1  # rates kept to 0.1

    (tmp_path / "small" / "report" / "summary.md").unlink()
    assert cli.main(["report", str(tmp_path / "small"), "--radii", "0", "0.5"]) == 0
    assert "r=0.5" in (tmp_path / "small" / "report" / "summary.md").read_text()
    for norm in ("l1", "l2"):  # one plot per norm
        assert (tmp_path / "small" / "report" / f"curves_{norm}.png").read_bytes().startswith(b"\x89PNG")


def test_certify_job_rejects_a_bad_config_before_work(tmp_path):
    job = subprocess.run([sys.executable, str(ROOT / "jobs" / "certify.py"), "--config", str(DEMO),
                          "--output", str(tmp_path), "--set", "certifiers.0.alpha=2"],
                         capture_output=True, text=True, cwd=ROOT)
    assert job.returncode == 2
    assert "invalid configuration: certifiers[0]: cohen: alpha must lie in (0, 1)" in job.stderr
    assert not any(tmp_path.iterdir())


def test_help_reads_well():
    help_text = subprocess.run([sys.executable, "-m", "pipeline.cli", "certify", "--help"], capture_output=True,
                               text=True, cwd=ROOT).stdout
    for option in ("--config FILE", "--output URI", "--set KEY=VALUE", "certifiers.0.sigma=0.5"):
        assert option in help_text
    for family in ("demo_cnn", "torchvision.models.list_models()", "timm/<architecture>[.<tag>]",
                   "huggingface with model.weights a save_pretrained folder"):
        assert family in help_text  # the classifier families, each with how to list its names
