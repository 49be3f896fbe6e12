"""``moe-train`` as a user runs it: the Hydra CLI, SIGTERM pre-emption, and 2-process DDP under torchrun."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from moe.train.checkpoint import list_checkpoints, load_checkpoint
from moe.train.logging import read_metrics

from train_runs import TINY_MODEL


def tiny_args(corpus: Path, run_dir: Path, *extra: str) -> list[str]:
    return [
        "data=text",
        f"data.path={corpus}",
        f"data.cache_dir={run_dir.parent / 'cache'}",
        *TINY_MODEL,
        "optim.warmup_steps=2",
        "trainer.device=cpu",
        "trainer.log_interval=1",
        "trainer.eval_interval=0",
        "trainer.threads=1",
        "logger.progress=lines",
        f"hydra.run.dir={run_dir}",
        *extra,
    ]


def run_cli(args: list[str], launcher=(sys.executable, "-m", "moe.train"), timeout=240):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "0"}
    return subprocess.run([*launcher, *args], check=False, capture_output=True, text=True, env=env, timeout=timeout)


def train_losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(run_dir / "metrics.jsonl") if r["kind"] == "train"]


@pytest.mark.slow
def test_cli_smoke_run_writes_the_run_directory(corpus, tmp_path):
    run_dir = tmp_path / "run"
    result = run_cli(tiny_args(corpus, run_dir, "trainer.max_steps=3", "router=topk"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "==== moe-train summary ====" in result.stdout
    assert "bits/byte vs unigram entropy" in result.stdout
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["last_checkpoint"].endswith("ckpt-00000003.pt")
    for name in ("metrics.jsonl", "model.safetensors", "expert_load.png", ".hydra/config.yaml"):
        assert (run_dir / name).is_file(), name
    assert len(train_losses(run_dir)) == 3


@pytest.mark.slow
def test_cli_rejects_an_invalid_value_before_any_work(corpus, tmp_path):
    run_dir = tmp_path / "run"
    result = run_cli(tiny_args(corpus, run_dir, "trainer.device=tpu"))
    assert result.returncode != 0
    assert (
        "moe-train: invalid config: trainer.device='tpu' is not valid; valid choices: ['auto', 'cpu', 'cuda']"
        in result.stderr
    )
    assert "Traceback" not in result.stderr
    assert not (run_dir / "metrics.jsonl").exists() and not (run_dir / "checkpoints").exists()
    assert not (tmp_path / "cache").exists()


@pytest.mark.slow
def test_sigterm_checkpoints_exits_cleanly_and_resumes(corpus, tmp_path):
    run_dir = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = tiny_args(corpus, run_dir, "trainer.max_steps=100000", "trainer.ckpt_interval=0")
    process = subprocess.Popen(
        [sys.executable, "-m", "moe.train", *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and process.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
            break
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["stopped_by"] == "SIGTERM" and summary["steps"] >= 3
    (checkpoint,) = list_checkpoints(run_dir / "checkpoints")
    assert load_checkpoint(checkpoint)["step"] == summary["steps"]
    assert "SIGTERM: saved" in stdout

    resumed = run_cli(tiny_args(corpus, run_dir, f"trainer.max_steps={summary['steps'] + 2}"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {checkpoint} at step {summary['steps']}" in resumed.stdout
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == summary["steps"] + 2


@pytest.mark.slow
@pytest.mark.distributed
def test_two_process_ddp_matches_one_process_with_the_same_global_batch(corpus, tmp_path):
    """gloo DDP with 2 x 2 sequences per step gives the 1-process losses with 4 sequences per step.

    The Switch load-balancing loss is off: it is not additive over token shards (it multiplies two
    sums over tokens), so each rank's share differs from the 1-process value; the z-loss is additive.
    """
    common = ["trainer.max_steps=4", "router.kwargs.load_balancing_coef=0.0", "trainer.export_safetensors=false"]
    one, two = tmp_path / "one", tmp_path / "two"
    single = run_cli(tiny_args(corpus, one, *common))
    assert single.returncode == 0, single.stderr[-3000:]
    torchrun = (
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "moe.train",
    )
    double = run_cli(tiny_args(corpus, two, *common, "data.batch_size=2"), launcher=torchrun)
    assert double.returncode == 0, double.stderr[-3000:]
    a, b = train_losses(one), train_losses(two)
    assert len(a) == len(b) == 4
    assert b == pytest.approx(a, rel=1e-5, abs=1e-6)
    assert json.loads((two / "summary.json").read_text())["world_size"] == 2
