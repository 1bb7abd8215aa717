"""Running on clusters: the cluster files agree with pyproject.toml, `ray job submit` runs the job on a real
head node, and the nightly benchmark records nights and catches regressions without false alarms."""

import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import tomllib
import torch
import yaml
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from pipeline import cli, nightly
from pipeline.results import read_results
from pipeline.storage import open_location

ROOT = Path(__file__).resolve().parents[1]


def project():
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def pinned(requirement_name: str) -> str:
    for requirement in project()["dependencies"]:
        if re.match(rf"{requirement_name}[\[=<>!~ ]", requirement):
            return requirement
    raise AssertionError(requirement_name)


def test_cluster_files_agree_with_pyproject():
    python = SpecifierSet(project()["requires-python"])
    ray = SpecifierSet(pinned("ray").split("]", 1)[1])
    torch_pin = pinned("torch").split("==", 1)[1].split(",")[0]
    aws = yaml.safe_load((ROOT / "cluster" / "aws.yaml").read_text())
    raycluster = yaml.safe_load((ROOT / "cluster" / "kuberay" / "raycluster.yaml").read_text())
    rayjob = yaml.safe_load((ROOT / "cluster" / "kuberay" / "rayjob.yaml").read_text())
    runtime_env = yaml.safe_load((ROOT / "cluster" / "runtime_env.yaml").read_text())

    images = [aws["docker"]["image"]]
    images += [c["image"] for group in [raycluster["spec"]["headGroupSpec"], *raycluster["spec"]["workerGroupSpecs"]]
               for c in group["template"]["spec"]["containers"]]
    images += [c["image"] for group in [rayjob["spec"]["rayClusterSpec"]["headGroupSpec"],
                                        *rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"]]
               for c in group["template"]["spec"]["containers"]]
    for image in images:
        match = re.fullmatch(r"rayproject/ray:([\d.]+)-py(\d)(\d+)(-gpu)?", image)
        assert match, image
        assert Version(match.group(1)) in ray, image
        assert Version(f"{match.group(2)}.{match.group(3)}") in python, image
    for version in (raycluster["spec"]["rayVersion"], rayjob["spec"]["rayClusterSpec"]["rayVersion"]):
        assert Version(version) in ray
    assert any(f"torch=={torch_pin}" in command for command in aws["setup_commands"])
    assert runtime_env["pip"] == project()["dependencies"]
    assert yaml.safe_load(rayjob["spec"]["runtimeEnvYAML"])["pip"] == project()["dependencies"]
    entrypoint = rayjob["spec"]["entrypoint"].split()
    assert entrypoint[:2] == ["python", "jobs/certify.py"] and (ROOT / entrypoint[1]).exists()
    assert (ROOT / entrypoint[entrypoint.index("--config") + 1]).exists()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def port_open(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.skipif(shutil.which("ray", path=str(Path(sys.executable).parent)) is None, reason="no ray CLI")
def test_ray_job_submit_runs_the_certification_job_on_a_head_node(tmp_path):
    port, dashboard, agent, agent_grpc, metrics, runtime_env_agent = (free_port() for _ in range(6))
    temp = Path(f"/tmp/rt{secrets.token_hex(3)}")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "RAY_AUTH_MODE": "token",
           "RAY_AUTH_TOKEN": secrets.token_hex(16)}
    env.pop("RAY_ADDRESS", None)
    head = subprocess.Popen(["ray", "start", "--head", "--block", f"--port={port}", "--node-ip-address=127.0.0.1",
                             f"--dashboard-port={dashboard}", "--dashboard-host=127.0.0.1", f"--temp-dir={temp}",
                             # its own agent ports, so that it runs beside the tests' local Ray instance
                             f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
                             f"--metrics-export-port={metrics}", f"--runtime-env-agent-port={runtime_env_agent}",
                             "--num-cpus=4", "--include-dashboard=true"],
                            env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        address = f"http://127.0.0.1:{dashboard}"
        deadline = time.monotonic() + 120
        while not port_open(dashboard):  # cheap: each `ray job list` below is a Python start-up importing Ray
            assert time.monotonic() < deadline and head.poll() is None, "the head node did not come up"
            time.sleep(0.2)
        while subprocess.run(["ray", "job", "list", "--address", address], env=env, capture_output=True).returncode:
            assert time.monotonic() < deadline and head.poll() is None, "the head node did not come up"
            time.sleep(1)
        command = ["ray", "job", "submit", "--address", address, "--working-dir", str(ROOT), "--",
                   "python", "jobs/certify.py", "--config", "jobs/configs/demo.yaml", "--output", str(tmp_path),
                   "--run-id", "submitted", "--set", "dataset.skip=1", "--set", "dataset.max=4",
                   "--set", "actors.count=1", "--set", "batch_size=256",  # no probe: not what this test is about
                   "--set", "certifiers=[{name: cohen, sigma: 0.25, n0: 10, n: 50}]"]
        deadline = time.monotonic() + 120
        while True:  # the dashboard answers before the node's job agent is up: retry until it takes the job
            submitted = subprocess.run(command, env=env, capture_output=True, text=True, timeout=400)
            if "No available agent" not in submitted.stderr + submitted.stdout or time.monotonic() > deadline:
                break
            time.sleep(2)
        assert submitted.returncode == 0, submitted.stdout[-3000:] + submitted.stderr[-3000:]
        assert "succeeded" in submitted.stdout
        table = read_results(open_location(str(tmp_path / "submitted")).join("results"))
        assert table.num_rows == 4 and set(table["status"].to_pylist()) == {"ok"}
    finally:  # the node's processes share its process group; a graceful stop would take about 30 s
        os.killpg(head.pid, signal.SIGKILL)
        head.wait(timeout=60)
        shutil.rmtree(temp, ignore_errors=True)


def synthetic_night(rng, p: float, images: int = 500) -> pd.DataFrame:
    successes = int(rng.binomial(images, p))
    return pd.DataFrame([{"model": "m", "setting": "s", "figure": "certified_accuracy@0.25",
                          "value": successes / images, "successes": successes, "count": images, "kind": "proportion",
                          "worse_when": "lower"}])


def test_no_false_alarm_on_sampling_noise_and_a_real_drop_is_caught():
    """300 pairs of nights that differ only by sampling noise (p = 0.8, 500 images): each comparison false-
    alarms with probability <= 0.001, so more than 3 alarms would happen with probability < 3e-4."""
    rng = np.random.default_rng(0)
    alarms = sum(bool(nightly.compare(synthetic_night(rng, 0.8), synthetic_night(rng, 0.8))["regression"].any())
                 for _ in range(300))
    assert alarms <= 3
    assert nightly.compare(synthetic_night(rng, 0.65), synthetic_night(rng, 0.8))["regression"].all()
    assert not nightly.compare(synthetic_night(rng, 0.9), synthetic_night(rng, 0.8))["regression"].any()


def test_nightly_records_nights_reuses_a_rerun_date_and_names_a_changed_suite_and_a_damaged_night(
        ray_cluster, tmp_path, capsys):
    """Nights are recorded and compared with the last one. Rerunning a date reuses its runs: no throughput is
    measured (not 40x faster) and the next date raises no throughput alarm against it. Other weights under the
    same label (row 88) are not compared: exit 4, naming the change. A regression against an earlier night
    fails the night (exit 1). An unreadable earlier figures.parquet still gives tonight's report, naming that
    night, and exit 3."""
    def main(argv: list[str]) -> int:
        return cli.main(["nightly", *argv])

    from pipeline.models import load_demo_model

    degraded = load_demo_model()
    with torch.no_grad():
        degraded.head.weight.copy_(torch.randn_like(degraded.head.weight))
    torch.save(degraded.state_dict(), tmp_path / "degraded.pt")
    settings = ["--config", str(ROOT / "jobs" / "configs" / "nightly_demo.yaml"), "--set", f"output={tmp_path}",
                "--set", "run.dataset.max=20", "--set", "run.certifiers.0.n=300", "--set", "run.actors.count=1",
                "--set", "run.batch_size=256"]  # no probe per night: any batch size gives the same certificates
    broken = ["--set", f"models.0.model.weights={tmp_path / 'degraded.pt'}"]
    nights = tmp_path / "nightly"
    assert main([*settings, "--date", "2026-11-20"]) == 0
    assert main([*settings, "--date", "2026-11-20"]) == 0
    rerun = pd.read_parquet(nights / "2026-11-20" / "figures.parquet")
    assert nightly.is_reused(rerun).sum() == len(nightly.THROUGHPUT_FIGURES)
    assert "Throughput not measured for demo_cnn" in (nights / "2026-11-20" / "report.md").read_text()
    assert main([*settings, "--date", "2026-11-21"]) == 0
    assert "REGRESSION" not in capsys.readouterr().out
    assert "not compared: the earlier night certified no images" in (nights / "2026-11-21" / "report.md").read_text()
    figures = pd.read_parquet(nights / "2026-11-21" / "figures.parquet")
    assert {"images_per_s", "device_seconds_per_image", "cost_per_image", "acr"} <= set(figures["figure"])
    assert figures["model_sha256"].nunique() == 1 and figures["model_sha256"].notna().all()

    assert main([*settings, *broken, "--date", "2026-11-22"]) == 4
    printed = capsys.readouterr().out
    assert "NOT COMPARED: no figure of tonight matches the night 2026-11-21 (the suite changed)" in printed
    assert "not compared: the entry of demo_cnn changed: model.weights: null -> " in printed
    assert "(sha256 of the state dict)" in printed and "REGRESSION" not in printed
    assert "NOT COMPARED" in (nights / "2026-11-22" / "report.md").read_text()
    for date in ("2026-11-20", "2026-11-21", "2026-11-22"):
        assert {"figures.parquet", "environment.json", "report.md", "accuracy.png"} <= {
            p.name for p in (nights / date).iterdir()}

    # an earlier night that certified every image at every radius: cohen with n=300 cannot reach 0.5 tonight
    accuracy = rerun["figure"].str.startswith("certified_accuracy@")
    better = rerun.assign(successes=rerun["successes"].where(~accuracy, rerun["count"]),
                          value=rerun["value"].where(~accuracy, 1.0))
    better.to_parquet(nights / "2026-11-20" / "figures.parquet")
    assert main([*settings, "--date", "2026-11-21"]) == 1
    printed = capsys.readouterr().out
    assert "REGRESSION demo_cnn cohen(sigma=0.25" in printed and "certified_accuracy@0.5" in printed

    (nights / "2026-11-21" / "figures.parquet").write_bytes(b"not a parquet file")
    (nights / "2026-11-22" / "report.md").unlink()
    assert main([*settings, *broken, "--date", "2026-11-22"]) == 3
    printed = capsys.readouterr().out
    assert "COULD NOT COMPARE with the night 2026-11-21" in printed and "figures.parquet is unreadable" in printed
    assert "magic bytes" in printed
    report = (nights / "2026-11-22" / "report.md").read_text()
    assert "Not compared with 2026-11-21" in report and "2026-11-21/figures.parquet" in report


def synthetic_results(images: int) -> pa.Table:
    """Result rows of one setting, every image certified correct at radius 0.5."""
    return pa.table({"image_id": [f"image{k}" for k in range(images)], "setting": ["s"] * images,
                     "correct": [True] * images, "status": ["ok"] * images, "radius": [0.5] * images,
                     "abstained": [False] * images, "forward_passes": [100] * images})


def test_nightly_throughput_is_tonights_work_and_a_reused_night_is_never_compared():
    """20 images in the run, 5 of them certified tonight in 10 s on 2 devices: 0.5 images/s, while accuracy
    is over all 20. A night that certified none has NaN throughput, compared with nothing either way."""
    results = synthetic_results(20)
    measured = nightly.figures("m", results, [0.0], 10.0, 2, 0.5, certified_tonight=5)
    value = measured.set_index("figure")["value"]
    assert (value["images_per_s"], value["device_seconds_per_image"], value["certified_accuracy@0"]) == (0.5, 4.0, 1)
    reused = nightly.figures("m", results, [0.0], 0.5, 2, 0.5, certified_tonight=0)
    assert list(reused.loc[nightly.is_reused(reused), "figure"]) == list(nightly.THROUGHPUT_FIGURES)
    for tonight, last in ((reused, measured), (measured, reused)):
        compared = nightly.compare(tonight, last).set_index("figure")
        assert not compared["regression"].any()
        assert compared.loc["images_per_s", "reason"].startswith("not compared")
    slower = nightly.figures("m", results, [0.0], 10.0, 2, 0.5, certified_tonight=1)
    assert nightly.compare(slower, measured).set_index("figure").loc["images_per_s", "regression"]


LISTENING = """
import os
from pipeline.distributed import init_ray
import ray

init_ray()
ray.get([ray.remote(lambda: os.getpid()).remote() for _ in range(4)])
children = {}
for entry in os.listdir("/proc"):
    if entry.isdigit():
        try:
            parent = int(open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()[1])
        except OSError:
            continue
        children.setdefault(parent, []).append(int(entry))
tree, todo = set(), [os.getpid()]
while todo:
    pid = todo.pop()
    tree.add(pid)
    todo += children.get(pid, [])
sockets = set()
for pid in tree:
    try:
        sockets |= {os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")}
    except OSError:
        continue
for table in ("tcp", "tcp6"):
    for line in open(f"/proc/net/{table}").read().splitlines()[1:]:
        fields = line.split()
        if fields[3] == "0A" and f"socket:[{fields[9]}]" in sockets:  # a listening socket of this run
            print(table, fields[1])
"""


def test_a_local_ray_instance_listens_on_loopback_only():
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    env.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)
    listed = subprocess.run([sys.executable, "-c", LISTENING], env=env, cwd=ROOT, capture_output=True, text=True,
                            timeout=300, check=True).stdout.split("\n")
    addresses = [line.split() for line in listed if line]
    assert len(addresses) >= 5, listed  # GCS, raylet, agents, workers, dashboard
    loopback = {"tcp": "0100007F", "tcp6": "0000000000000000FFFF00000100007F"}  # 127.0.0.1, ::ffff:127.0.0.1
    exposed = [f"{table} {address}" for table, address in addresses
               if address.split(":")[0] not in (loopback[table], "00000000000000000000000001000000")]
    assert not exposed, f"listening beyond loopback: {exposed}"
