"""The project's GPU check: the whole test suite with CUDA, then a short benchmark smoke run; one summary line.

Usage (on a machine with a CUDA GPU; ``make gpu-test`` runs exactly this)::

    python -m moe.bench.gpu_check --out gpu-check

CI has no GPU, so this is the guard for anything that touches ``kernels/``, ``moe/dispatch/``, ``moe/experts/``,
``moe/layer.py``, ``moe/model.py`` or the trainer's GPU path. It writes into ``--out`` (a new folder):
``pytest.log`` and ``junit.xml`` of the suite, ``layer.json`` and ``train.json`` of the benchmarks, and
``gpu_check.json`` with the counts, figures, device, versions and commit. It prints one line starting
``gpu-check: PASSED`` or ``gpu-check: FAILED`` and exits 0 only when every test passed (GPU tests included,
none skipped for want of a GPU) and both benchmarks ran without an error row.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
LAYER_SMOKE = ["--shapes", "e64", "--activations", "swiglu", "--variants", "kernels,torch", "--repeats", "5"]
TRAIN_SMOKE = ["--variants", "kernels,kernels_compile,dense_compile", "--warmup", "3", "--steps", "5"]


def run_logged(command: list[str], log: Path, timeout: int) -> int:
    """Run ``command`` in the repository with its output in ``log``; returns its exit status (124 when it ran
    past ``timeout`` seconds). Past the limit it gets SIGINT first, so that pytest still prints its summary of
    failures and writes its junit file, and is killed only if it has not exited 30 s later."""
    with open(log, "w", encoding="utf-8") as out:
        process = subprocess.Popen(command, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
        try:
            return process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            out.flush()
            out.write(f"\ngpu-check: timed out after {timeout} s\n")
            return 124


def junit_counts(junit: Path) -> dict:
    """passed / failed / skipped counts of a pytest junit file (errors count as failed)."""
    if not junit.is_file():
        return {"passed": 0, "failed": 0, "skipped": 0, "total": 0}
    suites = ET.parse(junit).getroot()
    suite = suites if suites.tag == "testsuite" else suites.find("testsuite")
    total, failed = int(suite.get("tests", 0)), int(suite.get("failures", 0)) + int(suite.get("errors", 0))
    skipped = int(suite.get("skipped", 0))
    return {"passed": total - failed - skipped, "failed": failed, "skipped": skipped, "total": total}


def _results(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return json.loads(path.read_text()).get("results", [])


def _commit() -> str:
    """The checked commit: ``$GPU_CHECK_COMMIT`` when set (a copied tree may carry a stale .git), else git's HEAD."""
    if os.environ.get("GPU_CHECK_COMMIT"):
        return os.environ["GPU_CHECK_COMMIT"]
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="results folder (must not exist)")
    parser.add_argument("--pytest-args", default="", help="extra pytest arguments, e.g. '-n 8' with pytest-xdist")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds allowed for each of the three stages")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("gpu-check: needs a CUDA GPU (torch.cuda.is_available() is False)")
    out = Path(args.out)
    if out.exists():
        raise SystemExit(f"gpu-check: --out {out} already exists; give a new folder")
    out.mkdir(parents=True)
    py = sys.executable
    suite_status = run_logged(
        [
            py,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "-rfEs",
            f"--junitxml={out / 'junit.xml'}",
            *args.pytest_args.split(),
        ],
        out / "pytest.log",
        args.timeout,
    )
    counts = junit_counts(out / "junit.xml")
    layer_status = run_logged(
        [py, "-m", "moe.bench.layer", "--out", str(out / "layer.json"), *LAYER_SMOKE], out / "layer.log", args.timeout
    )
    train_status = run_logged(
        [py, "-m", "moe.bench.train", "--out", str(out / "train.json"), *TRAIN_SMOKE], out / "train.log", args.timeout
    )
    layer_rows, train_rows = _results(out / "layer.json"), _results(out / "train.json")
    bench_errors = [r.get("variant", "?") + ": " + r["error"] for r in layer_rows + train_rows if "error" in r]
    gpu_skips = [line for line in (out / "pytest.log").read_text().splitlines() if "needs a CUDA GPU" in line]
    passed = (
        suite_status == 0
        and counts["failed"] == 0
        and counts["total"] > 0
        and not gpu_skips
        and layer_status == 0
        and train_status == 0
        and layer_rows
        and train_rows
        and not bench_errors
    )
    figures = [
        f"layer {r['shape']} {r['activation']} {r['variant']} {r['tflops']:.0f} TFLOP/s"
        for r in layer_rows
        if "tflops" in r
    ]
    figures += [
        f"train {r['variant']} {r['tokens_per_s'] / 1e3:.0f}k tokens/s"
        + (f" ({r['moe_over_dense']:.2f} of dense)" if r.get("moe_over_dense") else "")
        for r in train_rows
        if "tokens_per_s" in r
    ]
    record = {
        "passed": bool(passed),
        "tests": counts,
        "test_exit_status": suite_status,
        "gpu_tests_skipped": len(gpu_skips),
        "bench_exit_status": {"layer": layer_status, "train": train_status},
        "bench_errors": bench_errors,
        "figures": figures,
        "device": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "commit": _commit(),
    }
    (out / "gpu_check.json").write_text(json.dumps(record, indent=2) + "\n")
    verdict = "PASSED" if passed else "FAILED"
    print(
        f"gpu-check: {verdict}: tests {counts['passed']} passed, {counts['failed']} failed, {counts['skipped']} "
        f"skipped; benchmarks {'ok' if not bench_errors and layer_rows and train_rows else 'FAILED'} "
        f"({'; '.join(figures) or 'no figures'}); {record['device']}, torch {record['torch']}, "
        f"commit {record['commit']}"
    )
    if bench_errors:
        print("benchmark errors: " + " | ".join(bench_errors))
    raise SystemExit(0 if passed else 1)


if __name__ == "__main__":
    main()
