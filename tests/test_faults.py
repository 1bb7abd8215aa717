"""The fault matrix, part two: object storage outages (a proxy in front of moto that drops every connection
while it is down), a killed actor worker, and a killed second node. Each run ends with every image exactly
once, values equal to an uninterrupted run, and a manifest that says what happened. (Driver kills, concurrent
runs of one id, sweep and training kills are in test_job, test_sweep and test_denoise.)"""

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import boto3
import pytest
import yaml
from test_job import config, rows

from pipeline.distributed.certify import run
from pipeline.storage import StorageOutage, open_location

pytestmark = pytest.mark.faults
ROOT = Path(__file__).resolve().parents[1]
CERTIFIERS = [{"name": "cohen", "sigma": 0.25, "n0": 20, "n": 400}]
DATASET = {"layout": "demo", "max": 24}


@pytest.fixture(scope="module")
def uninterrupted(ray_cluster, tmp_path_factory):
    """The rows of an uninterrupted local run of DATASET, which every faulted run must equal."""
    return rows(run(config(tmp_path_factory.mktemp("uninterrupted"), DATASET, certifiers=CERTIFIERS)).uri)


class Proxy:
    """A TCP proxy on 127.0.0.1 to `target`; while `down`, every connection it holds or gets is dropped."""

    def __init__(self, target: tuple[str, int]):
        self.target, self.down, self.connections, self.refused = target, threading.Event(), set(), 0
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def stop(self) -> None:
        self.down.set()
        self._drop()

    def _drop(self) -> None:
        for connection in list(self.connections):
            with contextlib.suppress(OSError):
                connection.close()

    def start(self) -> None:
        self.down.clear()

    def _accept(self) -> None:
        while True:
            client, _ = self.server.accept()
            if self.down.is_set():
                client.close()
                self.refused += 1
                continue
            upstream = socket.create_connection(self.target)
            self.connections |= {client, upstream}
            if self.down.is_set():  # stopped while this connection was being made: it must not outlive the stop
                self._drop()
                continue
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(source, sink), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                sink.sendall(data)
        for end in (source, sink):
            self.connections.discard(end)
            with contextlib.suppress(OSError):
                end.close()


@pytest.fixture
def outage(s3_endpoint):
    """(proxy, bucket, storage options through the proxy, a boto3 client that bypasses it)."""
    host, port = s3_endpoint.removeprefix("http://").split(":")
    proxy, bucket = Proxy((host, int(port))), f"outage-{uuid.uuid4().hex[:8]}"
    client = boto3.client("s3", endpoint_url=s3_endpoint)
    client.create_bucket(Bucket=bucket)
    yield proxy, bucket, {"endpoint_url": f"http://127.0.0.1:{proxy.port}"}, client
    proxy.start()


def result_files(client, bucket: str) -> int:
    listed = client.list_objects_v2(Bucket=bucket, Prefix="runs/run/results/")
    return len(listed.get("Contents", []))


def in_background(function) -> tuple[threading.Thread, dict]:
    outcome = {}

    def target() -> None:
        try:
            outcome["value"] = function()
        except Exception as error:
            outcome["error"] = error

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, outcome


def wait_until(condition, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def test_a_storage_outage_shorter_than_the_retry_time_is_ridden_out(outage, uninterrupted):
    proxy, bucket, storage, client = outage
    cfg = config(f"s3://{bucket}/runs", DATASET, images_per_batch=2, certifiers=CERTIFIERS,
                 storage={**storage, "retry_seconds": 120})
    thread, outcome = in_background(lambda: run(cfg).uri)
    wait_until(lambda: result_files(client, bucket) >= 2)
    proxy.stop()
    wait_until(lambda: proxy.refused >= 2)  # writers met the outage and retry (not a fixed 8 s that may miss it)
    time.sleep(1)
    proxy.start()
    thread.join(timeout=300)
    assert "error" not in outcome, outcome
    manifest = open_location(outcome["value"], **storage).read_json("manifest.json")
    assert manifest["status"] == "finished" and manifest["attempts"] == 1
    assert rows(outcome["value"], storage) == uninterrupted


def test_a_longer_outage_fails_in_one_line_marks_the_manifest_and_the_rerun_completes(outage, uninterrupted):
    proxy, bucket, storage, client = outage
    cfg = config(f"s3://{bucket}/runs", DATASET, images_per_batch=2, certifiers=CERTIFIERS,
                 storage={**storage, "retry_seconds": 3})

    class StoreBackWhenTheDriverRetries(logging.Handler):
        """Ends the outage once the driver is retrying its manifest write (after the run gave up)."""

        def emit(self, record: logging.LogRecord) -> None:
            if "manifest.json" in record.getMessage() and "unreachable" in record.getMessage():
                proxy.start()

    handler = StoreBackWhenTheDriverRetries()
    logging.getLogger("pipeline.storage").addHandler(handler)
    try:
        thread, outcome = in_background(lambda: run(cfg))
        wait_until(lambda: result_files(client, bucket) >= 1)
        proxy.stop()
        thread.join(timeout=300)
    finally:
        logging.getLogger("pipeline.storage").removeHandler(handler)
        proxy.start()  # the manifest is read back below whichever way the driver wrote it
    error = outcome.get("error")
    assert isinstance(error, StorageOutage) and "\n" not in str(error), outcome
    assert "unreachable for 3 s" in str(error) and "rerun the same command" in str(error)
    location = open_location(f"s3://{bucket}/runs/run", **storage)
    manifest = location.read_json("manifest.json")
    assert manifest["status"] == "failed" and "unreachable" in manifest["reason"]

    uri = run(cfg).uri  # the rerun goes on where the run stopped
    manifest = location.read_json("manifest.json")
    assert manifest["status"] == "finished" and manifest["attempts"] == 2 and manifest["counts"]["already_done"] > 0
    assert rows(uri, storage) == uninterrupted


def _job(cfg, tmp_path: Path, address: str) -> subprocess.Popen:
    path = tmp_path / f"{cfg.run_id}.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    return subprocess.Popen([sys.executable, str(ROOT / "jobs" / "certify.py"), "--config", str(path)],
                            env={**os.environ, "RAY_ADDRESS": address}, cwd=ROOT, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def test_a_killed_actor_worker_is_replaced_and_every_image_is_certified_once(ray_cluster, uninterrupted, kill_actors,
                                                                             tmp_path):
    cfg = config(tmp_path / "killed", DATASET, images_per_batch=2, certifiers=CERTIFIERS)
    job = _job(cfg, tmp_path, ray_cluster)
    results = tmp_path / "killed" / "run" / "results"
    wait_until(lambda: len(list(results.glob("part-*.parquet"))) >= 2 or job.poll() is not None)
    assert job.poll() is None, "the job ended before its actor could be killed"
    assert kill_actors("MapBatches(CertifyActor)") >= 1
    assert job.wait(timeout=300) == 0
    assert rows(str(tmp_path / "killed" / "run")) == uninterrupted


def test_a_killed_second_node_loses_nothing(uninterrupted, tmp_path):
    """A head node and a worker node on this host (Ray's own multi-node test cluster); the worker node is
    killed mid-run and the job ends with every image exactly once, equal to an uninterrupted run."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
    try:
        worker = cluster.add_node(num_cpus=2, resources={"second": 1})
        cluster.wait_for_nodes()
        cfg = config(tmp_path / "nodes", DATASET, images_per_batch=2, certifiers=CERTIFIERS,
                     actors={"count": 2, "cpus": 1})
        job = _job(cfg, tmp_path, cluster.address)
        results = tmp_path / "nodes" / "run" / "results"
        wait_until(lambda: len(list(results.glob("part-*.parquet"))) >= 2 or job.poll() is not None)
        assert job.poll() is None, "the job ended before the node could be killed"
        cluster.remove_node(worker, allow_graceful=False)
        assert job.wait(timeout=300) == 0
    finally:
        with contextlib.suppress(Exception):
            os.killpg(job.pid, signal.SIGKILL)
        cluster.shutdown()
    assert rows(str(tmp_path / "nodes" / "run")) == uninterrupted


def test_sigterm_to_the_driver_marks_the_run_interrupted_in_one_line(ray_cluster, uninterrupted, tmp_path):
    """Row 59: SIGTERM (what `ray job stop` sends the driver) met Ray's own handler, which aborted with a
    stack dump (exit 134) and left the manifest `running`. Now the driver stops as on Ctrl-C: one line, exit
    143, manifest `interrupted` with the reason, lease released; the rerun completes equal to an
    uninterrupted run."""
    cfg = config(tmp_path / "termed", DATASET, images_per_batch=2, certifiers=CERTIFIERS)
    path = tmp_path / "termed.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    with open(tmp_path / "stderr.txt", "w") as stderr:
        job = subprocess.Popen([sys.executable, str(ROOT / "jobs" / "certify.py"), "--config", str(path)],
                               env={**os.environ, "RAY_ADDRESS": ray_cluster}, cwd=ROOT, start_new_session=True,
                               stdout=subprocess.DEVNULL, stderr=stderr)
        results = tmp_path / "termed" / "run" / "results"
        wait_until(lambda: len(list(results.glob("part-*.parquet"))) >= 2 or job.poll() is not None)
        assert job.poll() is None, "the job ended before it could be stopped"
        job.send_signal(signal.SIGTERM)
        assert job.wait(timeout=120) == 143
    said = (tmp_path / "stderr.txt").read_text().strip().splitlines()
    assert said[-1] == ("pipeline: run run interrupted by SIGTERM; its manifest says interrupted; rerun the same "
                        "command to go on where it stopped"), said
    assert not any("Traceback" in line or "SIGTERM received" in line for line in said)
    location = open_location(str(tmp_path / "termed" / "run"))
    manifest = location.read_json("manifest.json")
    assert (manifest["status"], manifest["reason"]) == ("interrupted", "interrupted by SIGTERM")
    assert not (tmp_path / "termed" / "run" / "lease.json").exists()
    assert run(cfg).status == "finished" and rows(location.uri) == uninterrupted
