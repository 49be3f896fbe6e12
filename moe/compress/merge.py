"""Expert merging: M-SMoE (Li et al., ICLR 2024), HC-SMoE (Chen et al., ICML 2025) and all-to-one averaging."""

from __future__ import annotations

import torch
from torch import nn

from moe.compress.calibration import Calibration
from moe.compress.prune import BUDGETS, _checked_layers, _ranked, global_allocation, target_count
from moe.compress.surgery import align_to, merge_groups
from moe.layer import MoELayer

MERGE_METHODS = ("msmoe", "hc_smoe", "average")
LINKAGES = ("average", "single")


def msmoe_groups(frequency: torch.Tensor, logit_cosine: torch.Tensor, num_groups: int) -> list[list[int]]:
    """M-SMoE grouping: the ``num_groups`` most frequent experts are dominant; every other expert joins
    the dominant expert whose router-logit column is most cosine-similar (ties: the lower id).

    Cost: O(E log E + E·G). Groups are listed in order of their dominant expert's id.
    """
    dominant = sorted(_ranked(frequency)[:num_groups])
    groups = {d: [d] for d in dominant}
    for expert in range(frequency.numel()):
        if expert in groups:
            continue
        best = max(dominant, key=lambda d: (float(logit_cosine[expert, d]), -d))
        groups[best].append(expert)
    return [sorted(groups[d]) for d in dominant]


def hierarchical_groups(features: torch.Tensor, num_groups: int, linkage: str = "average") -> list[list[int]]:
    """HC-SMoE grouping: agglomerative clustering of the rows of ``features`` (E, D) by Euclidean distance
    with ``average`` or ``single`` linkage, cut at exactly ``num_groups`` clusters (``scipy.cluster.hierarchy``).

    Cost: O(E²·D) distances plus O(E²) to O(E³) linkage. Groups are listed by their lowest member.
    """
    if linkage not in LINKAGES:
        raise ValueError(f"linkage must be one of {LINKAGES}, got {linkage!r}")
    from scipy.cluster.hierarchy import cut_tree
    from scipy.cluster.hierarchy import linkage as scipy_linkage

    num_experts = features.shape[0]
    if num_groups == num_experts:
        return [[e] for e in range(num_experts)]
    if num_groups == 1:
        return [list(range(num_experts))]
    tree = scipy_linkage(features.double().cpu().numpy(), method=linkage, metric="euclidean")
    labels = cut_tree(tree, n_clusters=num_groups).reshape(-1).tolist()
    groups: dict[int, list[int]] = {}
    for expert, label in enumerate(labels):
        groups.setdefault(label, []).append(expert)
    return sorted(groups.values())


def _align_groups(layer: MoELayer, groups: list[list[int]], frequency: torch.Tensor) -> None:
    """Align every member's hidden units to its group's most frequent member (function preserving)."""
    for group in groups:
        reference = min(group, key=lambda e: (-float(frequency[e]), e))
        for expert in group:
            if expert != reference:
                align_to(layer, reference, expert)


def merge(
    model: nn.Module,
    calibration: Calibration,
    method: str = "hc_smoe",
    num_experts: float | None = None,
    *,
    linkage: str = "average",
    align: bool | None = None,
    budget: str | None = None,
    layers=None,
) -> dict[str, list[list[int]]]:
    """Merge the experts of every calibrated MoE layer in place; return each layer's groups (original ids).

    Each group becomes one expert, the frequency-weighted average of its members' weights, and the
    router becomes a ``MergedRouter``: it keeps the original E logits and selection and maps each
    chosen expert to its group, so a token sent to any member reaches the merged expert and members'
    weights add up (see ``MergedRouter`` for why router rows are not averaged).

    Methods:
        ``msmoe``: the merge step of MC-SMoE (Li et al., ICLR 2024). Dominant experts = the most
            frequent (how many per layer: ``budget``); the others join the dominant expert with the most
            similar router-logit column (cosine over calibration tokens); members are permutation-aligned
            to the group's most frequent expert by weight matching (``linear_sum_assignment``) before
            averaging.
            Calibration: selection counts and the logit Gram matrix. Cost: O(E·G) grouping plus one
            O(F³) assignment per merged member.
        ``hc_smoe``: HC-SMoE (Chen et al., ICML 2025). Hierarchical clustering (``linkage`` average or
            single, Euclidean) of each expert's mean output over all calibration inputs, then a
            frequency-weighted merge (no alignment unless ``align=True``). Calibration: mean outputs
            (every expert on every token) and counts. Cost: O(E²·H) plus the linkage.
        ``average``: every expert into one, frequency-weighted (MoE to dense); ``num_experts`` must be
            1. Calibration: counts. Cost: O(E·H·F).

    Args:
        num_experts: merged experts per layer (int) or fraction (float in (0, 1]).
        align: permutation-align members before averaging; default True for ``msmoe`` only.
        budget: how many groups each layer gets. ``layer``: ``num_experts`` in every layer. ``global``
            (``msmoe`` only, and its default, as in the MC-SMoE reference): layers × ``num_experts``
            dominant experts in all, chosen by normalised frequency ranked across all layers, at least
            one per layer, so a layer with rarely used experts merges more and a busy layer less.
    """
    if method not in MERGE_METHODS:
        raise ValueError(f"method must be one of {MERGE_METHODS}, got {method!r}")
    if linkage not in LINKAGES:
        raise ValueError(f"linkage must be one of {LINKAGES}, got {linkage!r}")
    if method == "average":
        if num_experts not in (None, 1):
            raise ValueError(f"method='average' merges all experts into one; num_experts must be 1, got {num_experts}")
        num_experts = 1
    if num_experts is None:
        raise ValueError("num_experts (per-layer count or fraction) is required")
    budget = ("global" if method == "msmoe" else "layer") if budget is None else budget
    if budget not in BUDGETS:
        raise ValueError(f"budget must be one of {BUDGETS}, got {budget!r}")
    if budget == "global" and method != "msmoe":
        raise ValueError(f"budget='global' applies to method='msmoe', got method={method!r}")
    align = method == "msmoe" if align is None else bool(align)
    found = _checked_layers(model, calibration, layers)
    counts = {name: target_count(num_experts, layer.num_experts, name) for name, layer in found}
    if budget == "global":
        frequencies = {name: calibration[name].frequency for name, _ in found}
        plan = global_allocation(frequencies, dict.fromkeys(counts, 1), sum(counts.values()))
        counts = {name: len(kept) for name, kept in plan.items()}
    result = {}
    for name, layer in found:
        stats = calibration[name]
        count = counts[name]
        if method == "msmoe":
            groups = msmoe_groups(stats.frequency, stats.logit_cosine(), count)
        elif method == "hc_smoe":
            groups = hierarchical_groups(stats.mean_output, count, linkage)
        else:
            groups = [list(range(layer.num_experts))]
        if align:
            _align_groups(layer, groups, stats.frequency)
        merge_groups(layer, groups, stats.selection_count)
        result[name] = groups
    return result
