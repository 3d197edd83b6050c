"""The GPU benchmark script runs end to end (tiny shape, CPU), so it is ready when a GPU is."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).parents[1] / "bench" / "gpu.py"


def test_gpu_bench_smoke(tmp_path):
    out = tmp_path / "gpu.json"
    argv = ["--size", "tiny", "--device", "cpu", "--dtype", "float32", "--num-samples", "8"]
    proc = subprocess.run(
        [sys.executable, SCRIPT, *argv, "--ref-batches", "2", "--out", out],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "2"},
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["settings"]["num_samples"] == 8 and report["settings"]["num_probes"] == 8
    assert report["dowser"]["seconds"] > report["dowser"]["generation_s"] > 0
    ref = report["reference"]
    assert ref["batches_run"] == 2 and ref["weights_compared"] == 8
    assert ref["max_relative_difference"] < 1e-5  # the same scores as the reference
    sparse, dense = report["steps"]["sparse-adamw"], report["steps"]["adamw"]
    assert 0 < sparse["state_bytes"] < 0.5 * dense["state_bytes"]  # 10 % of the entries
    assert "targets" not in report  # the targets are for the 7B shape on a GPU
