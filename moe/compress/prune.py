"""Expert pruning: frequency, routing-score, reconstruction (Lu et al. 2024), REAP (Lasby et al. 2025), random."""

from __future__ import annotations

import copy
import itertools
import math

import torch
from torch import nn

from moe.compress.calibration import Calibration, all_expert_outputs, collect_inputs, dense_weights
from moe.compress.surgery import keep_experts
from moe.layer import MoELayer, moe_layers

PRUNE_METHODS = ("frequency", "score", "reconstruction", "reap", "random")
BUDGETS = ("layer", "global")


def target_count(num_experts, current: int, layer_name: str) -> int:
    """Experts to keep: an int in [1, current], or a fraction in (0, 1] rounded to the nearest count (>= 1)."""
    if isinstance(num_experts, bool) or not isinstance(num_experts, (int, float)):
        raise TypeError(f"num_experts must be an int or a fraction in (0, 1], got {num_experts!r}")
    if isinstance(num_experts, float):
        if not 0.0 < num_experts <= 1.0:
            raise ValueError(f"num_experts as a fraction must be in (0, 1], got {num_experts}")
        return max(1, round(num_experts * current))
    if not 1 <= num_experts <= current:
        raise ValueError(f"num_experts must be in [1, {current}] for layer '{layer_name}', got {num_experts}")
    return num_experts


def _checked_layers(model: nn.Module, calibration: Calibration, layers) -> list[tuple[str, MoELayer]]:
    """The MoE layers to compress (``layers``, default: every calibrated one), checked against the calibration."""
    found = moe_layers(model)
    if layers is None:
        found = [(name, layer) for name, layer in found if name in calibration.layers]
        if not found:
            raise ValueError(
                f"none of the model's MoE layers was calibrated (calibrated: {sorted(calibration.layers)})"
            )
    else:
        wanted = set(layers)
        unknown = wanted - {name for name, _ in found}
        if unknown:
            raise ValueError(f"unknown layers {sorted(unknown)}; MoE layers: {[name for name, _ in found]}")
        found = [(name, layer) for name, layer in found if name in wanted]
    for name, layer in found:
        stats = calibration[name]
        if stats.num_experts != layer.num_experts:
            raise ValueError(
                f"calibration of layer '{name}' has {stats.num_experts} experts but the layer has "
                f"{layer.num_experts}: calibrate again after changing the model"
            )
    return found


def _ranked(importance: torch.Tensor) -> list[int]:
    """Expert ids by decreasing importance; ties keep the lower id first."""
    order = sorted(range(importance.numel()), key=lambda e: (-float(importance[e]), e))
    return order


def _importance(method: str, calibration: Calibration, name: str, generator: torch.Generator) -> torch.Tensor:
    stats = calibration[name]
    if method == "frequency":
        return stats.frequency
    if method == "score":
        total = stats.score_mass.sum()
        return stats.score_mass / total if total > 0 else torch.full_like(stats.score_mass, 1 / stats.num_experts)
    if method == "reap":
        return stats.reap_saliency
    return torch.rand(stats.num_experts, generator=generator, dtype=torch.float64)


def global_allocation(importances: dict[str, torch.Tensor], floors: dict[str, int], total: int) -> dict[str, list[int]]:
    """Experts kept per layer under one global budget of ``total``: each layer keeps its ``floors[name]``
    most important, the rest of the budget goes to the largest importances across layers.

    Importances must be comparable across layers (each layer's normalised shares). Ties: layer order,
    then the lower id. Lists are in the order the experts were admitted.
    """
    keep: dict[str, list[int]] = {}
    candidates = []
    for index, (name, importance) in enumerate(importances.items()):
        order = _ranked(importance)
        keep[name] = order[: floors[name]]
        candidates += [(-float(importance[e]), index, e, name) for e in order[floors[name] :]]
    room = total - sum(len(v) for v in keep.values())
    if room < 0:
        raise ValueError(f"a global budget of {total} experts is below the layers' floors {sum(floors.values())}")
    for _, _, expert, name in sorted(candidates)[:room]:
        keep[name].append(expert)
    return keep


def _global_keep(found, targets, method, calibration, generator) -> dict[str, list[int]]:
    """Keep sum(targets) experts in all: each layer its top_k most important, then the best of the rest by share."""
    importances = {name: _importance(method, calibration, name, generator) for name, _ in found}
    floors = {name: layer.router.min_experts for name, layer in found}
    return global_allocation(importances, floors, sum(targets.values()))


def reconstruction_error(
    layer: MoELayer,
    keep: list[int],
    inputs: torch.Tensor,
    target: torch.Tensor,
    expert_outputs: torch.Tensor,
    token_ids: torch.Tensor | None = None,
) -> float:
    """‖target − routed output of ``layer`` restricted to ``keep``‖_F on cached ``inputs``.

    Removing experts equals masking their logits to −∞: the router is copied, sliced to ``keep`` and
    run on ``inputs``; ``expert_outputs`` (E, N, H) are every expert's outputs on those rows.
    """
    router = copy.deepcopy(layer.router)
    router.keep_experts(keep)
    routing = router(inputs, seq_len=None, token_ids=token_ids)
    weights = dense_weights(routing).to(expert_outputs.dtype)
    routed = torch.einsum("nk,knh->nh", weights, expert_outputs[keep])
    return float(torch.linalg.vector_norm((target - routed).double()))


def _candidate_subsets(num_experts: int, size: int, max_subsets: int, first: list[int], generator) -> list[list[int]]:
    """All ``size``-subsets when there are at most ``max_subsets``, else ``first`` plus random distinct ones."""
    total = math.comb(num_experts, size)
    if total <= max_subsets:
        return [list(s) for s in itertools.combinations(range(num_experts), size)]
    chosen = {tuple(sorted(first))}
    while len(chosen) < max_subsets:
        chosen.add(tuple(sorted(torch.randperm(num_experts, generator=generator)[:size].tolist())))
    return [list(s) for s in sorted(chosen)]


@torch.no_grad()
def _reconstruction_keep(model, calibration, name, layer, count, progressive, max_subsets, generator) -> list[int]:
    stats = calibration[name]
    if stats.inputs.shape[0] == 0:
        raise ValueError(
            f"layer '{name}' has no cached inputs: raise the calibration memory_budget (now "
            f"{calibration.memory_budget} bytes)"
        )
    device = layer.experts.w_in.device
    if progressive:
        inputs = collect_inputs(model, calibration, name, stats.inputs.shape[0]).to(device)
    else:
        inputs = stats.inputs.to(device)
    dtype = layer.experts.w_in.dtype
    inputs = inputs.to(dtype)
    target = stats.outputs.to(device)
    if layer.shared_experts is not None:
        shared = layer.shared_experts(inputs)
        if layer.shared_expert_gate is not None:
            shared = shared * torch.sigmoid(layer.shared_expert_gate(inputs))
        target = target - shared.float()
    token_ids = None if stats.token_ids is None else stats.token_ids.to(device)
    expert_outputs = all_expert_outputs(layer, inputs).float()
    first = sorted(_ranked(stats.frequency)[:count])
    subsets = _candidate_subsets(layer.num_experts, count, max_subsets, first, generator)
    errors = [reconstruction_error(layer, s, inputs, target, expert_outputs, token_ids) for s in subsets]
    return subsets[min(range(len(subsets)), key=lambda i: (errors[i], i))]


def prune(
    model: nn.Module,
    calibration: Calibration,
    method: str = "frequency",
    num_experts: float | None = None,
    *,
    budget: str = "layer",
    progressive: bool = False,
    max_subsets: int = 1000,
    seed: int = 0,
    layers=None,
) -> dict[str, list[int]]:
    """Remove experts from every calibrated MoE layer of ``model`` in place; return each layer's kept ids.

    Methods:
        ``frequency``: drop the experts selected least often on the calibration data (F-prune).
        ``score``: drop the experts with the least router-probability mass Σ_t softmax(z_t)_e (S-prune).
            Both: calibration statistics only; cost O(E log E) per layer.
        ``reconstruction``: "Not All Experts are Equal" (Lu et al., 2024): among subsets of the target
            size, keep the one minimising ‖Z − Z_pruned‖_F on the cached layer inputs X and outputs Z,
            where pruning masks the removed experts' logits to −∞ (the router is sliced and re-run).
            All C(E, K) subsets when that is at most ``max_subsets``, else ``max_subsets`` sampled
            subsets (seeded) that always include the frequency choice. Needs cached inputs/outputs
            (calibration memory budget). Cost per layer: E expert passes on N cached rows plus, per
            subset, a router pass on N rows and an N·K·H combine. ``progressive``: layers in model
            order, each reading inputs from the model with earlier layers already pruned (one model
            forward per layer) and reconstructing the original model's outputs.
        ``reap``: REAP (Lasby et al. 2025, read from the authors' code): drop the experts with the least
            saliency S_e = mean over the tokens routed to e of softmax(z)_e · ‖f_e(x)‖₂ (router probability
            times the norm of the expert's output). Calibration: one running sum per expert (every expert
            runs on every calibration token anyway); cost O(E log E) per layer.
        ``random``: a uniformly random subset (baseline, ``seed``).

    Args:
        num_experts: experts to keep per layer (int) or fraction (float in (0, 1]); never below the
            layer's top_k (raises).
        budget: ``layer`` keeps ``num_experts`` in every layer; ``global`` keeps the same total but
            distributes it by the experts' normalised frequency / score across layers (each layer keeps
            at least its top_k); ``reconstruction`` supports only ``layer``.
        layers: restrict to these layer names (default: every MoE layer).
    """
    if method not in PRUNE_METHODS:
        raise ValueError(f"method must be one of {PRUNE_METHODS}, got {method!r}")
    if budget not in BUDGETS:
        raise ValueError(f"budget must be one of {BUDGETS}, got {budget!r}")
    if num_experts is None:
        raise ValueError("num_experts (per-layer count or fraction) is required")
    if isinstance(max_subsets, bool) or not isinstance(max_subsets, int) or max_subsets < 1:
        raise ValueError(f"max_subsets must be an int >= 1, got {max_subsets!r}")
    if progressive and method != "reconstruction":
        raise ValueError(f"progressive=True applies to method='reconstruction', got method={method!r}")
    if budget == "global" and method in ("reconstruction", "reap"):
        raise ValueError(f"budget='global' supports frequency, score and random; {method} is layer-wise")
    found = _checked_layers(model, calibration, layers)
    targets = {}
    for name, layer in found:
        targets[name] = target_count(num_experts, layer.num_experts, name)
        if targets[name] < layer.router.min_experts:
            raise ValueError(
                f"layer '{name}' routes top_k={layer.router.min_experts} experts per token; "
                f"num_experts={num_experts} would keep {targets[name]}"
            )
    generator = torch.Generator().manual_seed(seed)
    if budget == "global":
        plan = _global_keep(found, targets, method, calibration, generator)
        return {name: keep_experts(layer, plan[name]) for name, layer in found}
    kept = {}
    for name, layer in found:
        if method == "reconstruction":
            keep = _reconstruction_keep(
                model, calibration, name, layer, targets[name], progressive, max_subsets, generator
            )
        else:
            keep = _ranked(_importance(method, calibration, name, generator))[: targets[name]]
        kept[name] = keep_experts(layer, keep)
    return kept
