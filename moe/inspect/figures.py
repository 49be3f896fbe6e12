"""PNG figures of ``moe-inspect`` (matplotlib, Agg backend): top tokens per expert, expert co-selection and
routing entropy."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from moe.inspect.stats import LayerRoutingStats


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    _pyplot().close(fig)
    os.replace(tmp, path)
    return path


def _shorten(text: str, limit: int = 14) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def plot_top_tokens(stats: LayerRoutingStats, spell: Callable[[int], str], layer: str, count: int, path: Path):
    """Experts (rows) by their most frequent tokens (columns); a cell shows the token, how many times the
    expert received it, and its colour the share of that token's occurrences sent to the expert."""
    plt = _pyplot()
    top = stats.top_tokens(count)
    shares = np.full((stats.num_experts, count), np.nan)
    for e, row in enumerate(top):
        for r, (_, _, share) in enumerate(row):
            shares[e, r] = share
    fig, ax = plt.subplots(figsize=(1.25 * count + 2.2, 0.6 * stats.num_experts + 1.4))
    image = ax.imshow(shares, aspect="auto", cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
    for e, row in enumerate(top):
        for r, (token, pairs, share) in enumerate(row):
            colour = "white" if share > 0.6 else "black"
            ax.text(r, e - 0.12, _shorten(spell(token)), ha="center", va="center", fontsize=10, color=colour)
            ax.text(r, e + 0.25, str(pairs), ha="center", va="center", fontsize=7, color=colour)
    ax.set_xticks(range(count), [f"#{r + 1}" for r in range(count)])
    ax.set_yticks(range(stats.num_experts), [f"expert {e}" for e in range(stats.num_experts)])
    ax.set_xlabel("rank by times received (cell: token, times received)")
    ax.set_title(f"{layer}: tokens each expert receives most often", fontsize=11)
    bar = fig.colorbar(image, ax=ax, fraction=0.03, pad=0.02)
    bar.set_label("share of the token's occurrences sent to this expert")
    return _save(fig, path)


def plot_coselection(stats: LayerRoutingStats, layer: str, path: Path):
    """E x E heat-map: share of tokens routed to both experts i and j (the diagonal, each expert's own
    share, is left out so the pairs keep the colour scale)."""
    plt = _pyplot()
    share = stats.coselection_share().numpy()
    pairs = share.copy()
    np.fill_diagonal(pairs, np.nan)
    size = stats.num_experts
    fig, ax = plt.subplots(figsize=(max(4.5, 0.45 * size + 2.5), max(3.8, 0.45 * size + 1.8)))
    finite = pairs[np.isfinite(pairs)]
    vmax = float(finite.max()) if finite.size and finite.max() > 0 else 1.0
    cmap = plt.get_cmap("magma").with_extremes(bad="lightgrey")
    image = ax.imshow(pairs, cmap=cmap, vmin=0, vmax=vmax, interpolation="nearest")
    ticks = range(0, size, max(1, size // 16))
    ax.set_xticks(list(ticks), [str(t) for t in ticks])
    ax.set_yticks(list(ticks), [str(t) for t in ticks])
    ax.set_xlabel("expert j")
    ax.set_ylabel("expert i")
    if size <= 12:
        for i in range(size):
            for j in range(size):
                if i != j:
                    colour = "black" if pairs[i, j] > 0.6 * vmax else "white"
                    ax.text(j, i, f"{pairs[i, j]:.2f}", ha="center", va="center", fontsize=7, color=colour)
    note = "" if finite.size and finite.max() > 0 else "\n(no token chose two experts)"
    ax.set_title(f"{layer}: experts chosen together{note}", fontsize=11)
    bar = fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    bar.set_label("share of tokens routed to both (diagonal left out)")
    return _save(fig, path)


def plot_entropy(stats: dict[str, LayerRoutingStats], path: Path):
    """Per layer: mean per-token entropy of the router's probabilities and entropy of the expert load, against
    the maximum log2(E)."""
    plt = _pyplot()
    names = list(stats)
    x = np.arange(len(names))
    token = [s.mean_token_entropy for s in stats.values()]
    load = [s.load_entropy for s in stats.values()]
    fig, ax = plt.subplots(figsize=(max(5.5, 1.1 * len(names) + 2.5), 4.2))
    ax.bar(x - 0.2, token, width=0.4, label="mean per-token entropy of router probabilities")
    ax.bar(x + 0.2, load, width=0.4, label="entropy of the expert load")
    for i, s in enumerate(stats.values()):
        ax.hlines(s.max_entropy, i - 0.45, i + 0.45, colors="black", linestyles="dashed")
    ax.plot([], [], "k--", label="maximum, log2(number of experts)")
    ax.set_xticks(x, names, rotation=30 if len(names) > 4 else 0, ha="right" if len(names) > 4 else "center")
    ax.set_ylabel("bits")
    ax.set_ylim(0, max(s.max_entropy for s in stats.values()) * 1.35)
    ax.set_title("routing entropy per MoE layer", fontsize=11)
    ax.legend(fontsize=8, loc="upper left")
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)
