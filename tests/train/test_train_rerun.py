"""``moe-train`` as a user reruns it: the default run directory, Ctrl-C, sweeps, and refused starts."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from train.test_train_cli import tiny_args

from moe.train.checkpoint import list_checkpoints

pytestmark = pytest.mark.slow


def args_without_run_dir(corpus: Path, tmp_path: Path, *extra: str) -> list[str]:
    """``tiny_args`` leaving the run directory to the default."""
    return [a for a in tiny_args(corpus, tmp_path / "unused", *extra) if not a.startswith("hydra.run.dir=")]


def moe_train(args: list[str], cwd: Path, timeout: float = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "0"}
    command = [sys.executable, "-m", "moe.train", *args]
    return subprocess.run(command, check=False, capture_output=True, text=True, env=env, timeout=timeout, cwd=cwd)


def interrupt(args: list[str], cwd: Path, metrics_glob: str) -> subprocess.Popen:
    """Start ``moe-train``, press Ctrl-C (SIGINT) once it has written 3 records, return the finished process."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "moe.train", *args], env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and process.poll() is None:
        found = list(cwd.glob(metrics_glob))
        if found and len(found[0].read_text().splitlines()) >= 3:
            break
        time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    process.stdout_text, process.stderr_text = (s.decode() for s in process.communicate(timeout=120))
    return process


def snapshot(directory: Path) -> dict:
    return {p.relative_to(directory): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def test_ctrl_c_then_the_same_command_continues_the_run_in_the_default_directory(corpus, tmp_path):
    args = args_without_run_dir(corpus, tmp_path, "trainer.max_steps=100000", "trainer.ckpt_interval=0")
    process = interrupt(args, tmp_path, "outputs/*/metrics.jsonl")
    assert process.returncode == 130, process.stderr_text[-3000:]
    assert "Traceback" not in process.stderr_text and "KeyboardInterrupt" not in process.stderr_text
    assert "SIGINT: saved" in process.stdout_text
    assert "stopped by     SIGINT" in process.stdout_text and "rerun the same command" in process.stdout_text
    (run_dir,) = (tmp_path / "outputs").iterdir()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["stopped_by"] == "SIGINT"
    (checkpoint,) = list_checkpoints(run_dir / "checkpoints")
    longer = [a if a != "trainer.max_steps=100000" else f"trainer.max_steps={summary['steps'] + 2}" for a in args]
    resumed = moe_train(longer, tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {checkpoint} at step {summary['steps']}" in resumed.stdout
    assert [p.name for p in (tmp_path / "outputs").iterdir()] == [run_dir.name]
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == summary["steps"] + 2
    assert (run_dir / ".hydra" / "overrides.yaml").is_file()


def test_a_fresh_run_refuses_a_directory_with_checkpoints_and_run_names_another(corpus, tmp_path):
    args = args_without_run_dir(corpus, tmp_path, "trainer.max_steps=2")
    assert moe_train(args, tmp_path).returncode == 0
    refused = moe_train([*args, "trainer.resume=none"], tmp_path)
    assert refused.returncode == 1 and "run=<new name>" in refused.stderr
    assert "Traceback" not in refused.stderr
    named = moe_train([*args, "trainer.resume=none", "run=second"], tmp_path)
    assert named.returncode == 0, named.stderr[-3000:]
    assert list_checkpoints(tmp_path / "outputs" / "second" / "checkpoints")


def test_rerunning_a_sweep_continues_each_of_its_runs(corpus, tmp_path):
    args = args_without_run_dir(corpus, tmp_path, "router=topk,relu")
    first = moe_train(["-m", *args, "trainer.max_steps=2"], tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    runs = sorted(p.parent for p in (tmp_path / "multirun").rglob("summary.json"))
    assert len(runs) == 2
    again = moe_train(["-m", *args, "trainer.max_steps=3"], tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("resumed from") == 2
    assert sorted(p.parent for p in (tmp_path / "multirun").rglob("summary.json")) == runs
    assert [json.loads((run / "summary.json").read_text())["steps"] for run in runs] == [3, 3]


def test_a_refused_resume_leaves_the_run_directory_as_it_was(corpus, tmp_path):
    run_dir = tmp_path / "run"
    assert moe_train(tiny_args(corpus, run_dir, "trainer.max_steps=2"), tmp_path).returncode == 0
    before = snapshot(run_dir)
    refused = moe_train(tiny_args(corpus, run_dir, "trainer.max_steps=4", "model.num_experts=2"), tmp_path)
    assert refused.returncode == 1 and "model.num_experts: checkpoint=4, config=2" in refused.stderr
    assert snapshot(run_dir) == before


def test_a_start_refused_before_any_work_leaves_no_directory(corpus, tmp_path):
    refused = moe_train(args_without_run_dir(corpus, tmp_path, "model.num_experts=0"), tmp_path)
    assert refused.returncode == 1 and "model.num_experts" in refused.stderr
    assert not (tmp_path / "outputs").exists()
