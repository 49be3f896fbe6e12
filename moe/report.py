"""``moe-report SWEEP_DIR``: compare the runs of a ``moe-train -m`` sweep in a markdown table and a loss plot.

Every directory below SWEEP_DIR with a ``metrics.jsonl`` is a run; its label is its Hydra overrides
(``.hydra/overrides.yaml``) or, failing that, its path. Writes ``report.md`` and ``loss_curves.png``
into SWEEP_DIR (or ``--out``) and prints the table; ``report.md`` links each run's ``moe-inspect``
report and figures where they exist.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path

from moe.train.logging import read_metrics


def find_runs(sweep_dir: Path) -> list[Path]:
    """Run directories (those holding a metrics.jsonl) below ``sweep_dir``, sorted by path."""
    return sorted(p.parent for p in Path(sweep_dir).rglob("metrics.jsonl"))


def run_overrides(run_dir: Path) -> list[str]:
    """The run's command-line overrides from ``.hydra/overrides.yaml``, hydra.* left out ([] if none)."""
    path = run_dir / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return []
    from omegaconf import OmegaConf

    return [str(o) for o in OmegaConf.load(path) if not str(o).lstrip("+~").startswith("hydra")]


def run_labels(runs: list[Path], sweep_dir: Path) -> tuple[list[str], list[str]]:
    """(label per run, overrides shared by all runs): a label is the run's own overrides (what the sweep
    varied), else its path relative to the sweep."""
    overrides = [run_overrides(run) for run in runs]
    shared = set.intersection(*(set(o) for o in overrides)) if len(runs) > 1 else set()
    labels = []
    for run, items in zip(runs, overrides):
        own = [o for o in items if o not in shared]
        relative = run.relative_to(sweep_dir).as_posix()
        labels.append(" ".join(own) if own else (relative if relative != "." else run.name))
    return labels, [o for o in overrides[0] if o in shared]


def summarize_run(run_dir: Path, label: str) -> dict:
    """One table row: label, size, progress, final validation numbers, speed and load balance."""
    records = read_metrics(run_dir / "metrics.jsonl")
    summary_path = run_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    evals = [r for r in records if r["kind"] == "eval"]
    trains = [r for r in records if r["kind"] == "train"]
    val_loss = summary.get("final_val_loss", evals[-1]["val_loss"] if evals else None)
    bits = summary.get("val_bits_per_byte")
    entropy = summary.get("val_unigram_entropy_bits")
    return {
        "run": label,
        "path": run_dir,
        "params": summary.get("num_params"),
        "active_params": summary.get("num_active_params"),
        "steps": summary.get("steps", trains[-1]["step"] if trains else 0),
        "finished": bool(summary) and not summary.get("stopped_by"),
        "val_loss": val_loss,
        "bits_per_byte": bits,
        "ratio_to_unigram": bits / entropy if bits is not None and entropy else None,
        "tokens_per_s": summary.get("tokens_per_s"),
        "load_imbalance": summary.get("final_load_imbalance", trains[-1].get("load_imbalance") if trains else None),
        "records": records,
    }


def _fmt(value, spec: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value, spec)


def markdown_table(rows: list[dict]) -> str:
    """Rows sorted by final validation loss, as a markdown table."""
    header = (
        "| run | params (active) | steps | val loss | val bits/byte | ÷ unigram entropy | tokens/s "
        "| load max/mean |\n|---|---|---|---|---|---|---|---|"
    )
    lines = [header]
    for row in sorted(rows, key=lambda r: (r["val_loss"] is None, r["val_loss"] or 0.0)):
        params = "-" if row["params"] is None else f"{row['params'] / 1e6:.2f}M ({row['active_params'] / 1e6:.2f}M)"
        steps = f"{row['steps']}" + ("" if row["finished"] else " (unfinished)")
        lines.append(
            f"| {row['run']} | {params} | {steps} | {_fmt(row['val_loss'], '.4f')} | "
            f"{_fmt(row['bits_per_byte'], '.3f')} | {_fmt(row['ratio_to_unigram'], '.3f')} | "
            f"{_fmt(row['tokens_per_s'], ',.0f')} | {_fmt(row['load_imbalance'], '.2f')} |"
        )
    return "\n".join(lines) + "\n"


def plot_losses(rows: list[dict], out_path: Path) -> Path:
    """Training loss (thin) and validation loss (markers) against step, one colour per run; PNG via Agg."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5))
    for index, row in enumerate(rows):
        colour = f"C{index % 10}"
        trains = [r for r in row["records"] if r["kind"] == "train"]
        evals = [r for r in row["records"] if r["kind"] == "eval"]
        ax.plot([r["step"] for r in trains], [r["loss"] for r in trains], color=colour, alpha=0.5, linewidth=1)
        ax.plot([r["step"] for r in evals], [r["val_loss"] for r in evals], "o-", color=colour, label=row["run"])
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token): train thin, validation with markers")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    out_path = Path(out_path)
    tmp = out_path.with_name(f".{out_path.name}.tmp.png")
    fig.savefig(tmp, dpi=100, bbox_inches="tight")
    plt.close(fig)
    os.replace(tmp, out_path)
    return out_path


def inspect_links(rows: list[dict], out_dir: Path) -> str:
    """A markdown list linking each run's ``inspect/report.md`` and figures (``moe-inspect``), "" if none has one."""
    lines = []
    for row in rows:
        folder = row["path"] / "inspect"
        if not (folder / "report.md").is_file():
            continue
        links = [f"[report]({Path(os.path.relpath(folder / 'report.md', out_dir)).as_posix()})"]
        for figure in sorted(folder.glob("*.png")):
            links.append(f"[{figure.stem}]({Path(os.path.relpath(figure, out_dir)).as_posix()})")
        lines.append(f"- {row['run']}: " + ", ".join(links))
    return "## Inside the runs (moe-inspect)\n\n" + "\n".join(lines) + "\n" if lines else ""


def report(sweep_dir: Path, out_dir: Path | None = None) -> str:
    """Write report.md and loss_curves.png for the runs under ``sweep_dir``; return the markdown."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise FileNotFoundError(f"sweep directory {sweep_dir} does not exist")
    runs = find_runs(sweep_dir)
    if not runs:
        raise ValueError(f"no run directories (with a metrics.jsonl) below {sweep_dir}")
    out_dir = Path(out_dir) if out_dir is not None else sweep_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    labels, shared = run_labels(runs, sweep_dir)
    rows = [summarize_run(run, label) for run, label in zip(runs, labels)]
    table = markdown_table(rows)
    if shared:
        table = f"Common overrides: `{' '.join(shared)}`\n\n{table}"
    plot = plot_losses(rows, out_dir / "loss_curves.png")
    text = f"# Sweep {sweep_dir}\n\n{table}\n![loss curves]({plot.name})\n"
    links = inspect_links(rows, out_dir)
    if links:
        text += f"\n{links}"
    tmp = out_dir / ".report.md.tmp"
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, out_dir / "report.md")
    return table


def main(argv: list[str] | None = None) -> None:
    """Console entry point of ``moe-report``."""
    parser = argparse.ArgumentParser(prog="moe-report", description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir", type=Path, help="a moe-train multirun directory (or any folder of runs)")
    parser.add_argument("--out", type=Path, default=None, help="where to write report.md and loss_curves.png")
    args = parser.parse_args(argv)
    try:
        table = report(args.sweep_dir, args.out)
    except (FileNotFoundError, ValueError) as error:
        parser.exit(2, f"moe-report: {error}\n")
    print(table, end="")
    print(f"wrote {(args.out or args.sweep_dir) / 'report.md'} and loss_curves.png")
