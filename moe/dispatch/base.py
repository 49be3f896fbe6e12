"""The dispatcher interface: ``permute`` rows into expert order, ``combine`` expert outputs back per token."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Generic, TypeVar

import torch

from moe.dispatch.placement import ExpertPlacement
from moe.routing import Routing

State = TypeVar("State")


@dataclass(frozen=True)
class Dispatched(Generic[State]):
    """Rows in expert order for the local experts, their (L,) counts, and the dispatcher's own state
    (a frozen dataclass of what its ``combine`` needs to undo the permute; None when it needs nothing)."""

    rows: torch.Tensor
    tokens_per_expert: torch.Tensor
    state: State | None = None


class Dispatcher(ABC):
    """Moves routed rows to the experts (``permute``) and their outputs back to the tokens (``combine``).

    ``placement`` says which experts this process holds; the layer builds ``num_local_experts`` experts.
    Dispatchers have no parameters and no per-forward state outside the ``Dispatched`` they return.
    ``triton_topk``: an ``MoELayer`` that builds its top-k router by name turns on the router's Triton
    top-k selection with this dispatcher.
    """

    triton_topk: bool = False

    def __init__(self, placement: ExpertPlacement):
        if not isinstance(placement, ExpertPlacement):
            raise TypeError(f"placement must be a moe.dispatch.ExpertPlacement, got {type(placement).__name__}")
        self.placement = placement

    @property
    def num_local_experts(self) -> int:
        """Experts held by this process (``placement.num_local_experts``)."""
        return self.placement.num_local_experts

    @abstractmethod
    def permute(self, x: torch.Tensor, routing: Routing) -> Dispatched:
        """Rows (N_local, H) of ``x`` (T, H) grouped by local expert, with their (L,) counts."""

    @abstractmethod
    def combine(self, expert_out: torch.Tensor, dispatched: Dispatched, routing: Routing) -> torch.Tensor:
        """(T, H): for each token, the sum over its pairs of ``weight * expert_out``; tokens with no pair get 0."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.placement})"


def weighted_scatter_add(rows: torch.Tensor, routing: Routing) -> torch.Tensor:
    """(T, H) sum of ``routing.weight * rows`` into each pair's token, for rows (N, H) in the routing's order."""
    weighted = rows * routing.weight.unsqueeze(-1).to(rows.dtype)
    out = rows.new_zeros(routing.num_tokens, rows.shape[-1])
    return out.index_add(0, routing.token_index, weighted)
