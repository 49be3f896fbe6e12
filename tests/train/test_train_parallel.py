"""moe-train under torchrun on CPU/gloo: expert parallelism and FSDP2 reproduce the DDP loss curve; checkpoints
saved with ep_size=2 resume with ep_size=1 (one process) and ep_size=4 (four processes)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from moe.train.strategies import strategy_class

from train_runs import PARALLEL_RUN, run_moe_train

SMALL = PARALLEL_RUN
GLOBAL_BATCH = 8


def _train(run_dir: Path, nproc: int, *overrides: str) -> list[tuple[int, float]]:
    """Run moe-train (torchrun when nproc > 1) and return its (step, loss) records."""
    records = run_moe_train(run_dir, nproc, [*SMALL, f"data.batch_size={GLOBAL_BATCH // nproc}", *overrides])
    return [(r["step"], r["loss"]) for r in records]


def _assert_same_curve(actual, expected, label):
    assert [s for s, _ in actual] == [s for s, _ in expected], label
    for (step, loss), (_, ref) in zip(actual, expected):
        assert abs(loss - ref) <= 1e-4, f"{label}: step {step} loss {loss} vs {ref}"


@pytest.fixture(scope="module")
def ddp_reference(tmp_path_factory):
    """The loss curve of plain DDP (ep_size=1) on two ranks, shared by the tests below."""
    return _train(tmp_path_factory.mktemp("ddp") / "run", 2, "parallel.ep_size=1")


@pytest.mark.distributed
@pytest.mark.slow
def test_expert_parallel_training_matches_and_resumes_across_layouts(tmp_path, ddp_reference):
    reference = ddp_reference
    expert_parallel = _train(tmp_path / "ep2", 2, "parallel.ep_size=2")
    assert len(reference) == 6
    _assert_same_curve(expert_parallel, reference, "ep_size=2 vs ep_size=1")

    checkpoint = tmp_path / "ep2" / "checkpoints" / "ckpt-00000003.pt"
    one_process = _train(tmp_path / "resume1", 1, "parallel.ep_size=1", f"trainer.resume={checkpoint}")
    _assert_same_curve(one_process, expert_parallel[3:], "ep_size=2 checkpoint resumed with ep_size=1")
    four_ranks = _train(tmp_path / "resume4", 4, "parallel.ep_size=4", f"trainer.resume={checkpoint}")
    _assert_same_curve(four_ranks, expert_parallel[3:], "ep_size=2 checkpoint resumed with ep_size=4")


@pytest.mark.distributed
@pytest.mark.slow
def test_fsdp_with_expert_parallel_and_accumulation_matches_ddp(tmp_path):
    """Two micro-batches per step: DDP's no_sync, FSDP2's set_requires_gradient_sync, one expert reduction."""
    reference = _train(tmp_path / "ddp", 2, "parallel.ep_size=1", "trainer.grad_accum=2")
    fsdp = _train(tmp_path / "fsdp", 2, "parallel.ep_size=2", "trainer.strategy=fsdp", "trainer.grad_accum=2")
    _assert_same_curve(fsdp, reference, "fsdp + ep_size=2 vs ddp, grad_accum=2")
    checkpoint = tmp_path / "fsdp" / "checkpoints" / "ckpt-00000003.pt"
    # FSDP-sharded experts now (ep_size=1): loading slices nothing and shards every tensor as a DTensor.
    resumed = _train(
        tmp_path / "resume",
        2,
        "parallel.ep_size=1",
        "trainer.strategy=fsdp",
        "trainer.grad_accum=2",
        f"trainer.resume={checkpoint}",
    )
    _assert_same_curve(resumed, fsdp[3:], "fsdp + ep_size=2 checkpoint resumed with fsdp + ep_size=1")


def test_plan_rejects_bad_layouts():
    import torch

    with pytest.raises(ValueError, match="world size 2 must be a multiple of ep_size=4"):
        strategy_class("ddp")(4, 2, torch.device("cpu"))
    with pytest.raises(ValueError, match="trainer.strategy='zero9' is not valid"):
        strategy_class("zero9")


@pytest.mark.distributed
@pytest.mark.slow
def test_submitit_tasks_train_expert_parallel(tmp_path, ddp_reference):
    """hydra-submitit-launcher with two tasks (local executor, the SLURM one's twin) runs EP without torchrun."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    sweep = tmp_path / "sweep"
    command = [
        sys.executable,
        "-m",
        "moe.train",
        "-m",
        "hydra/launcher=submitit_local",
        "hydra.launcher.tasks_per_node=2",
        "hydra.launcher.gpus_per_node=0",
        "hydra.launcher.timeout_min=5",
        f"hydra.sweep.dir={sweep}",
        *SMALL,
        f"data.batch_size={GLOBAL_BATCH // 2}",
        "parallel.ep_size=2",
    ]
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=300, check=False, env=dict(os.environ, OMP_NUM_THREADS="1")
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    records = [json.loads(line) for line in (sweep / "0" / "metrics.jsonl").read_text().splitlines()]
    _assert_same_curve(
        [(r["step"], r["loss"]) for r in records if r["kind"] == "train"],
        ddp_reference,
        "submitit 2 tasks, ep_size=2 vs torchrun ddp",
    )


def _torchrun(run_dir: Path, nproc: int, *overrides: str) -> subprocess.CompletedProcess:
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc > 1 else []
    command = [sys.executable, *launcher, "-m", "moe.train", *SMALL, *overrides, f"hydra.run.dir={run_dir}"]
    env = dict(os.environ, OMP_NUM_THREADS="1", HYDRA_FULL_ERROR="0")
    return subprocess.run(command, capture_output=True, text=True, timeout=300, check=False, env=env)


@pytest.mark.distributed
@pytest.mark.slow
def test_expert_parallel_run_prints_and_records_the_one_process_parameter_counts(tmp_path):
    counts = []
    for nproc, ep_size in ((1, 1), (2, 2)):
        result = _torchrun(tmp_path / f"ep{ep_size}", nproc, f"parallel.ep_size={ep_size}", "trainer.max_steps=2")
        assert result.returncode == 0, result.stderr[-3000:]
        printed = [line.split(";")[0] for line in result.stdout.splitlines() if line.startswith("model: ")]
        summary = json.loads((tmp_path / f"ep{ep_size}" / "summary.json").read_text())
        counts.append((printed, summary["num_params"], summary["num_active_params"]))
    assert counts[1] == counts[0] and len(counts[0][0]) == 1
    assert f"model: {counts[0][1]:,} parameters, {counts[0][2]:,} active per token" == counts[0][0][0]


@pytest.mark.distributed
@pytest.mark.slow
def test_a_bad_ep_size_under_torchrun_is_reported_once_without_a_traceback(tmp_path):
    result = _torchrun(tmp_path / "run", 2, "parallel.ep_size=3")
    assert result.returncode != 0
    message = "moe-train: invalid config: parallel.ep_size=3: world size 2 must be a multiple of ep_size=3"
    assert result.stderr.count(message) == 1, result.stderr
    assert "moe/train" not in result.stderr and "Error executing job" not in result.stderr
    assert not (tmp_path / "run").exists()
