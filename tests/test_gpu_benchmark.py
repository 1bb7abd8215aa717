"""benchmarks/gpu.py runs end to end (`--tiny`, on a CPU), so the GPU owner's one command cannot rot: every
section of its table is there, with finite numbers, and the job certified its images."""

import math
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_tiny_run_prints_every_section_with_finite_numbers(ray_cluster, tmp_path):
    out = tmp_path / "table.md"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_ADDRESS": ray_cluster}  # the job joins the tests' Ray
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--tiny", "--device", "cpu",
                           "--out", str(out)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    text = out.read_text()
    assert text in done.stdout
    header, *lines = text.splitlines()
    assert header.startswith("device cpu") and "torch " in header
    rows = [line.split("|")[1:-1] for line in lines if line.startswith("| ") and not line.startswith("| section")]
    sections = {cells[0].strip() for cells in rows}
    assert sections == {"forward", "floor", "engine", "counts", "job"}
    for cells in rows:
        value = float(cells[4].strip().replace(",", ""))
        assert math.isfinite(value), cells
        if cells[0].strip() in ("forward", "floor", "engine", "job"):
            assert value > 0, cells
    engine = [cells for cells in rows if cells[0].strip() == "engine"]
    assert any("compiled" in cells[1] for cells in engine) and any("eager" in cells[1] for cells in engine)
    assert all(re.search(r"\d", cells[6]) for cells in engine)  # each against the best floor
    job = next(cells for cells in rows if cells[0].strip() == "job")
    assert "status finished" in job[7] and float(job[6]) > 0
