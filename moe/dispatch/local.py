"""Single-process permute (gather rows into expert order) and combine (weighted scatter-add)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moe.routing import Routing


@dataclass
class Dispatched:
    """Rows in expert order for the local experts, and what combine needs to undo the permute."""

    rows: torch.Tensor
    tokens_per_expert: torch.Tensor
    state: object = None


class LocalDispatcher:
    """Gathers ``x[token_index]`` for the experts and scatter-adds ``weight * y`` back per token."""

    def permute(self, x: torch.Tensor, routing: Routing) -> Dispatched:
        """Rows (N, H) in expert order with their (E,) counts."""
        return Dispatched(rows=x.index_select(0, routing.token_index), tokens_per_expert=routing.tokens_per_expert)

    def combine(self, expert_out: torch.Tensor, dispatched: Dispatched, routing: Routing) -> torch.Tensor:
        """(T, H) sum over each token's pairs of ``weight * expert_out``; tokens with no pair get 0."""
        weighted = expert_out * routing.weight.unsqueeze(-1).to(expert_out.dtype)
        out = expert_out.new_zeros(routing.num_tokens, expert_out.shape[-1])
        return out.index_add(0, routing.token_index, weighted)
