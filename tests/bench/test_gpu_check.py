"""The GPU check's bookkeeping, which must be right on the CPU too: junit counts and the refusal without CUDA."""

import subprocess
import sys

import pytest
import torch

from moe.bench.gpu_check import junit_counts

JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest" errors="1" failures="2"
skipped="3" tests="10" time="1.0"></testsuite></testsuites>"""


def test_junit_counts_treat_errors_as_failures(tmp_path):
    path = tmp_path / "junit.xml"
    path.write_text(JUNIT)
    assert junit_counts(path) == {"passed": 4, "failed": 3, "skipped": 3, "total": 10}
    assert junit_counts(tmp_path / "missing.xml")["total"] == 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_gpu_check_refuses_without_cuda_in_one_line(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "moe.bench.gpu_check", "--out", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    assert result.stderr.strip() == "gpu-check: needs a CUDA GPU (torch.cuda.is_available() is False)"
    assert not (tmp_path / "out").exists()


def test_a_stage_past_its_limit_is_interrupted_so_it_can_still_report(tmp_path):
    """SIGINT first: the stage's own KeyboardInterrupt handler (pytest's summary and junit) still runs."""
    from moe.bench.gpu_check import run_logged

    script = (
        "import time\n"
        "try:\n"
        "    print('started', flush=True); time.sleep(60)\n"
        "except KeyboardInterrupt:\n"
        "    print('summary written on interrupt', flush=True)\n"
    )
    log = tmp_path / "stage.log"
    assert run_logged([sys.executable, "-c", script], log, timeout=3) == 124
    text = log.read_text()
    assert "summary written on interrupt" in text and text.rstrip().endswith("gpu-check: timed out after 3 s")
    assert run_logged([sys.executable, "-c", "raise SystemExit(3)"], tmp_path / "quick.log", timeout=30) == 3
