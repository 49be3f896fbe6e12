"""Every figure of docs/performance.md in one run on one CUDA GPU: each benchmark writes its JSON and log.

Usage::

    python -m moe.bench.figures --out figures-<date>

Runs, in this order (most wanted first, each under its own time limit so one slow stage cannot starve the
rest): a profile of the e64 SwiGLU layer with kernels; ``moe.bench.layer`` on every shape, activation and
variant; the ReLU router's layer; ``moe.bench.train`` on ``model=small`` and ``model=medium`` next to their
dense equivalents; ``moe-train model=medium`` with its defaults, whose logged tokens/s are the trainer's own
(the run is killed after ``--train-seconds``: a medium checkpoint is ~59 GB); and ``moe.bench.ep`` at
``ep_size=1``. ``--only`` picks stages by name: all of them take about 15 minutes on one H200, so a machine
whose commands are limited to 10 minutes runs them in two calls.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from moe.bench.gpu_check import run_logged


def stages(out: Path, train_seconds: int) -> list[tuple[str, list[str], int]]:
    """(name, command, seconds allowed) of each stage, writing into ``out``."""
    py = sys.executable
    trainer_run = out / "moe_train_medium"
    return [
        ("profile", [py, "-m", "moe.bench.profile", "--shape", "e64", "--activation", "swiglu", "--kernels"], 25),
        (
            "layer",
            [
                py,
                "-m",
                "moe.bench.layer",
                "--out",
                str(out / "layer.json"),
                "--variants",
                "kernels,torch,grouped_mm,torchtitan,loop",
            ],
            140,
        ),
        (
            "train_small",
            [
                py,
                "-m",
                "moe.bench.train",
                "--out",
                str(out / "train_small.json"),
                "--variants",
                "kernels,kernels_compile,kernels_compile_blocks,torch_compile_blocks,dense_compile,dense_compile_blocks",
            ],
            140,
        ),
        (
            "train_medium",
            [
                py,
                "-m",
                "moe.bench.train",
                "--out",
                str(out / "train_medium.json"),
                "--model",
                "medium",
                "--variants",
                "kernels,kernels_compile_blocks,dense_compile_blocks",
            ],
            300,
        ),
        (
            "moe_train_medium",
            [
                "timeout",
                "-s",
                "KILL",
                str(train_seconds),
                py,
                "-m",
                "moe.train",
                "model=medium",
                "data.vocab_size=32768",
                "data.batch_size=8",
                "trainer.max_steps=100000",
                "trainer.log_interval=5",
                "trainer.eval_interval=0",
                "logger.progress=lines",
                f"hydra.run.dir={trainer_run}",
            ],
            train_seconds + 5,
        ),
        ("ep", [py, "-m", "moe.bench.ep", "--out", str(out / "ep1_e64.json"), "--shape", "e64", "--ep-sizes", "1"], 40),
        (
            "layer_relu",
            [
                py,
                "-m",
                "moe.bench.layer",
                "--out",
                str(out / "layer_relu.json"),
                "--router",
                "relu",
                "--variants",
                "kernels,torch",
                "--activations",
                "swiglu",
            ],
            90,
        ),
    ]


def trainer_rate(run_dir: Path) -> dict | None:
    """Median tokens/s and MFU of a run's logged train intervals after the first (which holds compilation)."""
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        return None
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    rates = [r for r in records if r.get("kind") == "train"][1:]
    if not rates:
        return None
    rates.sort(key=lambda r: r["tokens_per_s"])
    middle = rates[len(rates) // 2]
    return {"intervals": len(rates), "tokens_per_s": middle["tokens_per_s"], "mfu": middle.get("mfu")}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="results folder (must not exist)")
    parser.add_argument("--only", default=None, help="comma-separated stage names (default: all)")
    parser.add_argument("--train-seconds", type=int, default=80, help="how long moe-train model=medium runs")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if out.exists():
        raise SystemExit(f"figures: --out {out} already exists; give a new folder")
    plan = stages(out, args.train_seconds)
    names = [name for name, _, _ in plan]
    wanted = args.only.split(",") if args.only else names
    for name in wanted:
        if name not in names:
            raise SystemExit(f"figures: unknown stage {name!r}; valid: {names}")
    out.mkdir(parents=True)
    status = {}
    for name, command, seconds in plan:
        if name in wanted:
            status[name] = run_logged(command, out / f"{name}.log", seconds)
            print(f"figures: {name} exit {status[name]}", flush=True)
    summary = {"exit_status": status, "moe_train_medium": trainer_rate(out / "moe_train_medium")}
    (out / "figures.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
