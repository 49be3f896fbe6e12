"""``inspect_run``: collect a trained run's routing over validation batches, draw the figures and write
``inspect/report.md`` (with the numbers in ``inspect/routing.json``)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from moe.inspect.figures import plot_coselection, plot_entropy, plot_top_tokens
from moe.inspect.run import LoadedRun, RunError, load_run
from moe.inspect.stats import LayerRoutingStats

DEVICES = ("auto", "cpu", "cuda")


@dataclass
class InspectConfig:
    """``moe-inspect`` settings.

    ``run``: a ``moe-train`` run directory. Routing is collected in eval mode over ``batches`` validation
    batches of ``batch_size`` sequences (default: the run's ``data.batch_size``), the batches ``moe-train``
    evaluates on. ``top_tokens``: tokens shown per expert. ``out``: where to write (default ``<run>/inspect``).
    """

    run: str = "???"
    batches: int = 4
    batch_size: int | None = None
    top_tokens: int = 8
    device: str = "auto"
    out: str | None = None

    def __post_init__(self):
        for key in ("batches", "top_tokens"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key}={getattr(self, key)} is not valid; it must be >= 1")
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"batch_size={self.batch_size} is not valid; it must be >= 1")
        if self.device not in DEVICES:
            raise ValueError(f"device={self.device!r} is not valid; valid: {list(DEVICES)}")


@torch.no_grad()
def collect_routing(loaded: LoadedRun, batches: int, batch_size: int) -> dict[str, LayerRoutingStats]:
    """Run the model over the first ``batches`` validation batches; each MoE layer's routing statistics."""
    from moe.data import eval_batches
    from moe.layer import moe_layers

    layers = moe_layers(loaded.model)
    if not layers:
        raise RunError(f"run {str(loaded.run_dir)!r} is a dense model: it has no MoE layer to inspect")
    vocab_size = loaded.model.cfg.vocab_size
    stats = {name: LayerRoutingStats(layer.num_experts, vocab_size) for name, layer in layers}
    device = next(loaded.model.parameters()).device
    for x, _ in eval_batches(loaded.splits.val, batch_size, loaded.cfg.model.seq_len, batches):
        x = x.to(device)
        loaded.model(x)
        for name, layer in layers:
            stats[name].add(layer.last_routing, x)
    return stats


def _file_name(layer: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "._-" else "_" for ch in layer)


def _markdown(loaded: LoadedRun, stats: dict, figures: dict, top: dict, tokens: int, spell) -> str:
    cfg = loaded.cfg
    step = f"step {loaded.step}" if loaded.step is not None else "final weights"
    lines = [
        f"# Inside run `{loaded.run_dir}`",
        "",
        f"Router `{cfg.router.name}`, {cfg.model.num_experts} experts, top-{cfg.model.top_k}, "
        f"{len(stats)} MoE layers; weights `{loaded.weights.name}` ({step}). Routing collected in eval mode over "
        f"{tokens:,} validation tokens.",
        "",
        "## Routing entropy",
        "",
        "Mean per-token entropy of the router's probabilities (softmax of its logits) and entropy of the "
        "expert load, in bits; the maximum is log2(experts). Low per-token entropy: confident routing. "
        "Load entropy below the maximum: unbalanced experts.",
        "",
        "| layer | per-token entropy | load entropy | maximum | load max/mean |",
        "|---|---|---|---|---|",
    ]
    for name, s in stats.items():
        load = s.load
        imbalance = float(load.max() / load.mean()) if float(load.sum()) > 0 else float("nan")
        lines.append(
            f"| {name} | {s.mean_token_entropy:.3f} | {s.load_entropy:.3f} | {s.max_entropy:.3f} | {imbalance:.2f} |"
        )
    lines += ["", f"![routing entropy]({figures['entropy']})", ""]
    if figures.get("load_over_training"):
        lines += [
            "## Expert load over training",
            "",
            "Share of routed tokens per expert at each logged step (from metrics.jsonl).",
            "",
            f"![expert load over training]({figures['load_over_training']})",
            "",
        ]
    for name, s in stats.items():
        lines += [
            f"## {name}",
            "",
            "Tokens each expert receives most often (times received, share of that "
            "token's occurrences sent to the expert):",
            "",
            "| expert | load | top tokens |",
            "|---|---|---|",
        ]
        for e, row in enumerate(top[name]):
            cells = ", ".join(f"`{spell(t).replace('`', 'ˋ')}` {n} ({share:.0%})" for t, n, share in row)
            lines.append(f"| {e} | {float(s.load[e]):.3f} | {cells or '-'} |")
        lines += [
            "",
            f"![top tokens of {name}]({figures['top_tokens'][name]})",
            "",
            f"![experts chosen together in {name}]({figures['coselection'][name]})",
            "",
        ]
    return "\n".join(lines)


def inspect_run(icfg: InspectConfig) -> Path:
    """Write the figures, ``routing.json`` and ``report.md`` of ``icfg.run``; returns the report's path."""
    from moe.train.logging import plot_expert_load

    use_cuda = icfg.device == "cuda" or (icfg.device == "auto" and torch.cuda.is_available())
    if icfg.device == "cuda" and not torch.cuda.is_available():
        raise RunError("device='cuda' but no CUDA device is available; valid here: auto, cpu")
    loaded = load_run(Path(icfg.run), torch.device("cuda" if use_cuda else "cpu"))
    batch_size = icfg.batch_size or loaded.cfg.data.batch_size
    stats = collect_routing(loaded, icfg.batches, batch_size)
    out = Path(icfg.out).expanduser() if icfg.out else loaded.run_dir / "inspect"
    out.mkdir(parents=True, exist_ok=True)
    top = {name: s.top_tokens(icfg.top_tokens) for name, s in stats.items()}
    figures = {"entropy": plot_entropy(stats, out / "routing_entropy.png").name, "top_tokens": {}, "coselection": {}}
    metrics = loaded.run_dir / "metrics.jsonl"
    if metrics.is_file():
        over_training = plot_expert_load(metrics, out / "expert_load_over_training.png")
        figures["load_over_training"] = over_training.name if over_training else None
    for name, s in stats.items():
        stem = _file_name(name)
        figures["top_tokens"][name] = plot_top_tokens(
            s, loaded.spell, name, icfg.top_tokens, out / f"top_tokens_{stem}.png"
        ).name
        figures["coselection"][name] = plot_coselection(s, name, out / f"coselection_{stem}.png").name
    tokens = next(iter(stats.values())).tokens
    numbers = {
        "run": str(loaded.run_dir),
        "weights": str(loaded.weights),
        "step": loaded.step,
        "tokens": tokens,
        "layers": {
            name: {
                "mean_token_entropy_bits": s.mean_token_entropy,
                "load_entropy_bits": s.load_entropy,
                "max_entropy_bits": s.max_entropy,
                "load": s.load.tolist(),
                "coselection": s.coselection.tolist(),
                "top_tokens": [
                    [{"id": t, "token": loaded.spell(t), "count": n, "share": share} for t, n, share in row]
                    for row in top[name]
                ],
            }
            for name, s in stats.items()
        },
        "figures": figures,
    }
    (out / "routing.json").write_text(json.dumps(numbers, indent=1) + "\n", encoding="utf-8")
    report = out / "report.md"
    tmp = out / ".report.md.tmp"
    tmp.write_text(_markdown(loaded, stats, figures, top, tokens, loaded.spell) + "\n", encoding="utf-8")
    os.replace(tmp, report)
    return report
