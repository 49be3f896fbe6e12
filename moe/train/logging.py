"""Run logging: console progress, ``metrics.jsonl``, optional wandb, and the expert-load heat-map."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def format_train_record(record: dict) -> str:
    """One human-readable line for a training record."""
    imbalance = record["load_imbalance"]
    return (
        f"step {record['step']:>6d} | loss {record['loss']:.4f} | lr {record['lr']:.2e} | "
        f"aux {record['aux_loss']:.4f} | {record['tokens_per_s']:,.0f} tok/s | "
        + (f"MFU {record['mfu']:.1%} | " if record.get("mfu") is not None else "")
        + f"load max/mean {'-' if imbalance is None else format(imbalance, '.2f')}"
    )


class RunLogger:
    """Writes every record to ``metrics.jsonl`` (rank 0 only) and shows progress.

    ``progress``: "bar" (tqdm), "lines" (one log line per training record) or "auto" (bar on a TTY).
    ``wandb_config``: None, or the run config to start a wandb run with (offline unless WANDB_MODE is set).
    """

    def __init__(
        self,
        run_dir: Path,
        *,
        max_steps: int,
        start_step: int,
        progress: str = "auto",
        wandb_config: dict | None = None,
        project: str = "moe",
        run_name: str | None = None,
        enabled: bool = True,
    ):
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self.bar = None
        self.wandb_run = None
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        use_bar = progress == "bar" or (progress == "auto" and sys.stderr.isatty())
        if use_bar:
            from tqdm import tqdm

            self.bar = tqdm(total=max_steps, initial=start_step, unit="step", dynamic_ncols=True)
        if wandb_config is not None:
            import wandb

            mode = None if "WANDB_MODE" in os.environ else "offline"
            self.wandb_run = wandb.init(
                project=project, name=run_name, dir=str(self.run_dir), config=wandb_config, mode=mode, resume="allow"
            )

    def write(self, record: dict) -> None:
        """Append one record (a dict with ``kind`` and ``step``) to metrics.jsonl and forward it."""
        if not self.enabled:
            return
        with open(self.metrics_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self.wandb_run is not None:
            flat = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
            self.wandb_run.log({f"{record['kind']}/{k}": v for k, v in flat.items()}, step=record["step"])
        if record["kind"] == "train":
            if self.bar is not None:
                self.bar.set_postfix_str(format_train_record(record).split(" | ", 1)[1])
            else:
                print(format_train_record(record), flush=True)
        elif record["kind"] == "eval":
            message = f"step {record['step']:>6d} | val_loss {record['val_loss']:.4f}"
            if record.get("val_bits_per_byte") is not None:
                message += f" | val bits/byte {record['val_bits_per_byte']:.3f}"
            self.message(message)

    def advance(self, steps: int = 1) -> None:
        """Move the progress bar on by ``steps`` optimizer steps."""
        if self.bar is not None:
            self.bar.update(steps)

    def message(self, text: str) -> None:
        """Print ``text`` without breaking the progress bar."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        """Close the bar and the wandb run."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.wandb_run is not None:
            self.wandb_run.finish()
            self.wandb_run = None


def read_metrics(path: Path) -> list[dict]:
    """Records of a metrics.jsonl; for a resumed run the last record of each (kind, step) wins, in step order."""
    latest: dict[tuple[str, int], dict] = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                record = json.loads(line)
                latest[(record["kind"], record["step"])] = record
    return sorted(latest.values(), key=lambda r: (r["step"], r["kind"]))


def plot_expert_load(metrics_path: Path, out_path: Path) -> Path | None:
    """Save a PNG heat-map (one panel per MoE layer: expert x logged step, colour = share of routed tokens).

    Returns None when the records hold no expert load (a dense model).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    records = [r for r in read_metrics(metrics_path) if r["kind"] == "train" and r.get("expert_load")]
    if not records:
        return None
    layers = list(records[0]["expert_load"])
    steps = [r["step"] for r in records]
    first, last = (steps[0], steps[-1]) if len(steps) > 1 else (steps[0] - 0.5, steps[0] + 0.5)
    fig, axes = plt.subplots(len(layers), 1, figsize=(8, 1.2 + 1.4 * len(layers)), squeeze=False, sharex=True)
    for ax, layer in zip(axes[:, 0], layers):
        load = np.array([r["expert_load"][layer] for r in records]).T
        image = ax.imshow(
            load,
            aspect="auto",
            interpolation="nearest",
            cmap="viridis",
            extent=(first, last, load.shape[0] - 0.5, -0.5),
        )
        ax.set_title(layer, fontsize=9, loc="left")
        ax.set_ylabel("expert")
        ax.yaxis.get_major_locator().set_params(integer=True)
        fig.colorbar(image, ax=ax, fraction=0.03, pad=0.01).set_label("share", fontsize=8)
    axes[-1, 0].set_xlabel("step")
    fig.suptitle("share of routed tokens per expert (rows) over training")
    fig.tight_layout()
    out_path = Path(out_path)
    tmp = out_path.with_name(f".{out_path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, out_path)
    return out_path
