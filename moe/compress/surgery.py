"""Structural edits of an MoELayer: keep a subset of experts, merge groups of experts, align hidden units."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
from torch import nn

from moe.compress.merged_router import MergedRouter
from moe.layer import MoELayer
from moe.validation import check_expert_indices


def _check_local(layer: MoELayer) -> None:
    local = layer.placement.num_local_experts
    if local != layer.num_experts or layer.experts.num_experts != layer.num_experts:
        raise ValueError(
            "compression needs all experts in one process (expert-parallel layers hold "
            f"{local} of {layer.num_experts}); gather the model first"
        )


def _set_expert_weights(layer: MoELayer, w_in: torch.Tensor, w_out: torch.Tensor) -> None:
    experts = layer.experts
    experts.w_in = nn.Parameter(w_in.contiguous(), requires_grad=experts.w_in.requires_grad)
    experts.w_out = nn.Parameter(w_out.contiguous(), requires_grad=experts.w_out.requires_grad)
    experts.num_experts = w_in.shape[0]
    layer.num_experts = w_in.shape[0]
    layer.dispatcher.placement = dataclasses.replace(layer.placement, num_experts=w_in.shape[0])


@torch.no_grad()
def keep_experts(layer: MoELayer, keep: Sequence[int]) -> list[int]:
    """Remove every expert of ``layer`` not in ``keep`` (weights, router rows, per-expert buffers).

    Keeps the layer consistent: ``num_experts`` everywhere equals ``len(keep)``; raises if
    ``top_k > len(keep)``. Keeping every expert leaves the function unchanged. Returns the sorted kept
    ids. The router restricts itself (``Router.keep_experts``): for a merged layer, ``keep`` names
    merged experts and the original experts of dropped groups leave the wrapped router.
    """
    _check_local(layer)
    keep = check_expert_indices(keep, layer.num_experts, f"layer '{layer.router.layer_name}'")
    layer.router.keep_experts(keep)
    index = torch.tensor(keep, device=layer.experts.w_in.device)
    _set_expert_weights(layer, layer.experts.w_in[index], layer.experts.w_out[index])
    return keep


def hidden_unit_features(layer: MoELayer, expert: int) -> torch.Tensor:
    """(F, ·) float32: each hidden unit's input column(s) (gate and up for SwiGLU) and output row."""
    experts = layer.experts
    ffn = experts.ffn_hidden_size
    w_in, w_out = experts.w_in[expert].float(), experts.w_out[expert].float()
    columns = [w_in[:, :ffn].T, w_in[:, ffn:].T] if experts.activation == "swiglu" else [w_in.T]
    return torch.cat(columns + [w_out], dim=1)


@torch.no_grad()
def permute_hidden_units(layer: MoELayer, expert: int, permutation: torch.Tensor) -> None:
    """Reorder expert ``expert``'s hidden units by ``permutation`` (F,); the expert's function is unchanged."""
    experts = layer.experts
    ffn = experts.ffn_hidden_size
    permutation = permutation.to(experts.w_in.device)
    if experts.activation == "swiglu":
        permutation_in = torch.cat([permutation, permutation + ffn])
    else:
        permutation_in = permutation
    experts.w_in[expert] = experts.w_in[expert][:, permutation_in]
    experts.w_out[expert] = experts.w_out[expert][permutation]


@torch.no_grad()
def align_to(layer: MoELayer, reference: int, expert: int) -> torch.Tensor:
    """Permute ``expert``'s hidden units to best match ``reference`` (weight matching), in place.

    MC-SMoE (Li et al., ICLR 2024): maximise Σ_j <u_ref_j, u_perm(j)> over permutations, where u are
    the hidden units' concatenated input and output weights, with ``scipy.optimize.linear_sum_assignment``.
    Exactly function preserving. Cost: an F x F similarity matrix (F·F·3H FLOPs) and an O(F³) assignment.
    Returns the permutation applied.
    """
    from scipy.optimize import linear_sum_assignment

    similarity = hidden_unit_features(layer, reference) @ hidden_unit_features(layer, expert).T
    _, columns = linear_sum_assignment(similarity.double().cpu().numpy(), maximize=True)
    permutation = torch.as_tensor(columns, dtype=torch.int64)
    permute_hidden_units(layer, expert, permutation)
    return permutation


@torch.no_grad()
def merge_groups(layer: MoELayer, groups: Sequence[Sequence[int]], member_weights: torch.Tensor) -> None:
    """Replace each group of experts with one expert: the ``member_weights``-weighted average of its members.

    ``groups`` partition the layer's experts; ``member_weights`` (E,) are normalised within each group
    (a group whose weights are all zero is averaged uniformly). The router becomes (or stays) a
    ``MergedRouter`` whose map sends every member to its group. Merged expert g sits at position g.
    """
    _check_local(layer)
    num_experts = layer.num_experts
    flat = [e for group in groups for e in group]
    if sorted(flat) != list(range(num_experts)):
        raise ValueError(f"groups {[list(g) for g in groups]} must partition the experts 0..{num_experts - 1}")
    if any(len(group) == 0 for group in groups):
        raise ValueError("groups must not be empty")
    if member_weights.shape != (num_experts,) or bool((member_weights < 0).any()):
        raise ValueError(f"member_weights must be (E={num_experts},) and non-negative, got {member_weights}")
    experts = layer.experts
    w_in, w_out = [], []
    expert_to_group = torch.empty(num_experts, dtype=torch.int64)
    for g, group in enumerate(groups):
        index = torch.tensor(list(group), device=experts.w_in.device)
        weights = member_weights.to(torch.float64)[list(group)]
        weights = torch.full_like(weights, 1.0 / len(group)) if weights.sum() == 0 else weights / weights.sum()
        weights = weights.to(device=experts.w_in.device)
        w_in.append(torch.einsum("m,mhf->hf", weights, experts.w_in[index].double()).to(experts.w_in.dtype))
        w_out.append(torch.einsum("m,mfh->fh", weights, experts.w_out[index].double()).to(experts.w_out.dtype))
        expert_to_group[list(group)] = g
    layer.router = MergedRouter.over(layer.router, expert_to_group)
    _set_expert_weights(layer, torch.stack(w_in), torch.stack(w_out))
