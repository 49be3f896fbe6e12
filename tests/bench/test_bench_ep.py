"""The EP benchmark script runs in one process without torchrun and writes a complete JSON (no timings asserted)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest


@pytest.mark.distributed
def test_ep_benchmark_runs_on_one_process(tmp_path):
    out = tmp_path / "ep.json"
    command = [
        sys.executable,
        "-m",
        "moe.bench.ep",
        "--device",
        "cpu",
        "--shape",
        "tiny",
        "--sizes-mib",
        "0.0625,1",
        "--warmup",
        "1",
        "--repeats",
        "2",
        "--out",
        str(out),
    ]
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=120, check=False, env=dict(os.environ, OMP_NUM_THREADS="1")
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "EP dispatcher at ep_size 1 vs local dispatcher" in result.stdout
    report = json.loads(out.read_text())
    assert report["world_size"] == 1 and report["backend"] == "gloo"
    assert [round(row["size_mib"], 4) for row in report["all_to_all"]] == [0.0625, 1.0]
    assert [(row["dispatcher"], row["ep_size"]) for row in report["layer"]] == [("local", 1), ("expert_parallel", 1)]
    for row in report["layer"]:
        assert row["ms"] > 0 and row["tokens_per_s_per_gpu"] == pytest.approx(256 / (row["ms"] * 1e-3))
    assert report["ep1_overhead_vs_local"] == pytest.approx(report["layer"][1]["ms"] / report["layer"][0]["ms"] - 1)
