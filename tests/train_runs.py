"""Run ``moe-train`` in a subprocess (under torchrun for several processes) and read its records."""

import json
import os
import subprocess
import sys
from pathlib import Path

# moe-train overrides for a 2-layer, 32-wide model on batches of 4 x 32 tokens: a few milliseconds a step.
TINY_MODEL = [
    "data.batch_size=4",
    "data.eval_batches=2",
    "model.seq_len=32",
    "model.num_layers=2",
    "model.hidden_size=32",
    "model.num_heads=2",
    "model.ffn_hidden_size=32",
]

# A 4-expert model trained 6 steps with a checkpoint at step 3 (the multi-process equivalence tests); the batch
# size per rank is the caller's.
PARALLEL_RUN = [
    "model.seq_len=32",
    "model.num_layers=2",
    "model.hidden_size=32",
    "model.num_heads=2",
    "model.ffn_hidden_size=64",
    "model.num_experts=4",
    "data.eval_batches=2",
    "trainer.max_steps=6",
    "trainer.log_interval=1",
    "trainer.eval_interval=0",
    "trainer.ckpt_interval=3",
    "trainer.device=cpu",
    "trainer.threads=1",
    "logger.progress=lines",
    "trainer.export_safetensors=false",
]


def run_moe_train(run_dir: Path, nproc: int, overrides: list[str]) -> list[dict]:
    """Train with ``overrides`` in ``run_dir`` on ``nproc`` CPU processes; return the train records of metrics.jsonl."""
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc > 1 else []
    command = [sys.executable, *launcher, "-m", "moe.train", *overrides, f"hydra.run.dir={run_dir}"]
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=300, check=False, env=dict(os.environ, OMP_NUM_THREADS="1")
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if r["kind"] == "train"]
