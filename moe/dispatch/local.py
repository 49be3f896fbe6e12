"""Single-process permute (gather rows into expert order) and combine (weighted scatter-add)."""

from __future__ import annotations

import torch

from moe.dispatch.base import Dispatched, Dispatcher, weighted_scatter_add
from moe.dispatch.placement import ExpertPlacement
from moe.dispatch.registry import register_dispatcher
from moe.routing import Routing


@register_dispatcher("local")
class LocalDispatcher(Dispatcher):
    """Gathers ``x[token_index]`` for the experts and scatter-adds ``weight * y`` back per token (pure torch)."""

    def __init__(self, num_experts: int):
        super().__init__(ExpertPlacement(num_experts))

    def permute(self, x: torch.Tensor, routing: Routing) -> Dispatched[None]:
        """Rows (N, H) in expert order with their (E,) counts."""
        return Dispatched(rows=x.index_select(0, routing.token_index), tokens_per_expert=routing.tokens_per_expert)

    def combine(self, expert_out: torch.Tensor, dispatched: Dispatched[None], routing: Routing) -> torch.Tensor:
        """(T, H) sum over each token's pairs of ``weight * expert_out``; tokens with no pair get 0."""
        return weighted_scatter_add(expert_out, routing)
