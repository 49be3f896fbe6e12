"""Run several compression methods on one checkpoint and tabulate validation loss before and after.

``python -m moe.compress.compare SOURCE OUT_DIR [--targets 6 4] [--calibration-batches 8]`` writes one
``moe-compress`` run directory per method and target under OUT_DIR, plus ``results.json`` and
``results.md`` (a markdown table; ``random`` is the median of its seeds, each seed also listed).
Cost: per run, one calibration pass, the method's own work and two validation passes.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from moe.compress.cli import CompressConfig, compress_checkpoint
from moe.train.checkpoint import atomic_write_bytes

PRUNE = ("frequency", "score", "reconstruction", "reap")
MERGE = ("msmoe", "hc_smoe")


def compare(
    source: str,
    out_dir: str | Path,
    targets=(6, 4),
    random_seeds=(0, 1, 2),
    calibration_batches: int = 8,
    device: str = "auto",
) -> list[dict]:
    """Compress ``source`` with every pruning and merging method at each target; return one row per run."""
    out_dir = Path(out_dir)
    runs = [("prune", m, None) for m in PRUNE] + [("merge", m, None) for m in MERGE]
    runs += [("prune", "random", seed) for seed in random_seeds]
    rows = []
    for target in targets:
        for action, method, seed in runs:
            name = f"{action}-{method}-{target}" + (f"-seed{seed}" if seed is not None else "")
            ccfg = CompressConfig(
                source=source,
                action=action,
                method=method,
                num_experts=target,
                seed=seed or 0,
                calibration_batches=calibration_batches,
                device=device,
            )
            summary = compress_checkpoint(ccfg, out_dir / name)
            rows.append(
                {
                    "target": target,
                    "action": action,
                    "method": method,
                    "seed": seed,
                    "val_loss_before": summary["before"]["val_loss"],
                    "val_loss_after": summary["after"]["val_loss"],
                    "params_before": summary["before"]["params"],
                    "params_after": summary["after"]["params"],
                    "active_params_after": summary["after"]["active_params_per_token"],
                    "compress_s": summary["timings_s"]["calibration_s"] + summary["timings_s"]["compress_s"],
                }
            )
            print(f"{name}: val loss {rows[-1]['val_loss_before']:.4f} -> {rows[-1]['val_loss_after']:.4f}", flush=True)
    return rows


def markdown_table(rows: list[dict]) -> str:
    """One line per (target, method); random seeds collapse to their median with the spread in brackets."""
    lines = [
        "| experts | method | val loss before | val loss after | Δ | params after | calibrate + compress (s) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for target in dict.fromkeys(r["target"] for r in rows):
        group = [r for r in rows if r["target"] == target]
        for row in [r for r in group if r["method"] != "random"]:
            lines.append(
                f"| {target} | {row['action']} {row['method']} | "
                f"{row['val_loss_before']:.4f} | {row['val_loss_after']:.4f} | "
                f"{row['val_loss_after'] - row['val_loss_before']:+.4f} | {row['params_after']:,} | "
                f"{row['compress_s']:.1f} |"
            )
        randoms = [r for r in group if r["method"] == "random"]
        if randoms:
            losses = [r["val_loss_after"] for r in randoms]
            median = statistics.median(losses)
            lines.append(
                f"| {target} | prune random (median of {len(losses)}: "
                f"{', '.join(f'{v:.4f}' for v in losses)}) | {randoms[0]['val_loss_before']:.4f} | {median:.4f} | "
                f"{median - randoms[0]['val_loss_before']:+.4f} | {randoms[0]['params_after']:,} | "
                f"{statistics.median(r['compress_s'] for r in randoms):.1f} |"
            )
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    """Command line: see the module docstring."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", help="moe-train checkpoint file or run directory")
    parser.add_argument("out_dir", help="new directory for the runs and the results")
    parser.add_argument("--targets", type=int, nargs="+", default=[6, 4])
    parser.add_argument("--calibration-batches", type=int, default=8)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    args = parser.parse_args(argv)
    out_dir = Path(args.out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise SystemExit(f"{out_dir} is not empty; choose a new directory")
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = compare(
        args.source, out_dir, tuple(args.targets), calibration_batches=args.calibration_batches, device=args.device
    )
    atomic_write_bytes(out_dir / "results.json", (json.dumps(rows, indent=2) + "\n").encode())
    table = markdown_table(rows)
    atomic_write_bytes(out_dir / "results.md", table.encode())
    print(table)


if __name__ == "__main__":
    main()
