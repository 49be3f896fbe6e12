"""The one format every router produces: a sparse token->expert assignment grouped by expert."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Routing:
    """Sparse (token, expert) pairs in COO form, grouped by expert.

    Attributes:
        token_index: (N,) int64, the token of each pair.
        expert_index: (N,) int64, the expert of each pair, non-decreasing.
        weight: (N,) float32 combine weight, differentiable where the router allows.
        tokens_per_expert: (E,) int64 count of pairs per expert.
        logits: (T, E) float32 router logits (weight and logits are float64 for float64 input).
        aux_loss: scalar tensor, the router's already-weighted auxiliary losses (0 when none).
        num_requested: pairs the router wanted before capacity drops (for the dropped fraction).
    """

    token_index: torch.Tensor
    expert_index: torch.Tensor
    weight: torch.Tensor
    tokens_per_expert: torch.Tensor
    logits: torch.Tensor
    aux_loss: torch.Tensor
    num_requested: int

    @property
    def num_tokens(self) -> int:
        """T, the number of routed tokens."""
        return self.logits.shape[0]

    @property
    def num_experts(self) -> int:
        """E, the number of experts."""
        return self.logits.shape[1]

    @property
    def dropped_fraction(self) -> float:
        """Fraction of requested pairs dropped by capacity (0 for dropless routers)."""
        if self.num_requested == 0:
            return 0.0
        return 1.0 - self.token_index.numel() / self.num_requested


def count_per_expert(expert_index: torch.Tensor, num_experts: int) -> torch.Tensor:
    """(E,) int64 number of entries of ``expert_index`` equal to each expert.

    Same result as ``torch.bincount(expert_index, minlength=E)``, without bincount's host sync on
    CUDA (it reads the maximum to size its output). Indices must lie in [0, E).
    """
    counts = torch.zeros(num_experts, dtype=torch.int64, device=expert_index.device)
    return counts.scatter_add_(0, expert_index, torch.ones_like(expert_index))


def group_by_expert(
    token_index: torch.Tensor,
    expert_index: torch.Tensor,
    weight: torch.Tensor,
    logits: torch.Tensor,
    aux_loss: torch.Tensor,
    num_requested: int | None = None,
) -> Routing:
    """Build a Routing from pairs in any order; a stable sort keeps token order within each expert."""
    order = torch.argsort(expert_index, stable=True)
    expert_index = expert_index[order]
    num_experts = logits.shape[1]
    return Routing(
        token_index=token_index[order],
        expert_index=expert_index,
        weight=weight[order],
        tokens_per_expert=count_per_expert(expert_index, num_experts),
        logits=logits,
        aux_loss=aux_loss,
        num_requested=token_index.numel() if num_requested is None else num_requested,
    )


def from_expert_major(
    token_index: torch.Tensor,
    weight: torch.Tensor,
    tokens_per_expert: torch.Tensor,
    logits: torch.Tensor,
    aux_loss: torch.Tensor,
    num_requested: int | None = None,
) -> Routing:
    """Build a Routing from pairs that are already grouped by expert (no sort needed)."""
    num_experts = logits.shape[1]
    expert_index = torch.repeat_interleave(
        torch.arange(num_experts, device=logits.device), tokens_per_expert, output_size=token_index.numel()
    )
    return Routing(
        token_index=token_index,
        expert_index=expert_index,
        weight=weight,
        tokens_per_expert=tokens_per_expert,
        logits=logits,
        aux_loss=aux_loss,
        num_requested=token_index.numel() if num_requested is None else num_requested,
    )
