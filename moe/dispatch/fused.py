"""``FusedDispatcher`` (registered as "triton"): permute and combine through the Triton kernels
(deterministic, no host sync)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moe.dispatch.base import Dispatched, Dispatcher, weighted_scatter_add
from moe.dispatch.placement import ExpertPlacement
from moe.dispatch.registry import register_dispatcher
from moe.kernel_support import kernels_usable
from moe.routing import Routing


@dataclass(frozen=True)
class FusedState:
    """What ``FusedDispatcher.combine`` needs: the token-major inverse index (None on the torch fallback)
    and the input dtype to return in."""

    rows_by_token: torch.Tensor | None
    token_ptr: torch.Tensor | None
    x_dtype: torch.dtype


@register_dispatcher("triton")
class FusedDispatcher(Dispatcher):
    """Permute/combine with ``moe.kernels``: each token gathers its own rows, so both passes are deterministic.

    Args:
        num_experts: experts of the layer (all held locally).
        expert_dtype: cast the permuted rows to this dtype inside the permute kernel (e.g. bf16 experts
            on a float32 residual stream); combine casts back to the input's dtype. None keeps x's dtype.

    Falls back to the pure-torch gather and scatter-add where the kernels cannot run (CPU without the Triton
    interpreter, or triton not installed). Cost: one read and one write of the N permuted rows per pass,
    plus a stable sort of the N token indices for the inverse index. In an ``MoELayer`` built with
    ``dispatcher="triton"`` the top-k router also selects with the Triton kernel (``TopKRouter.triton_topk``).
    """

    triton_topk = True

    def __init__(self, num_experts: int, expert_dtype: torch.dtype | None = None):
        if expert_dtype is not None and not isinstance(expert_dtype, torch.dtype):
            raise TypeError(f"expert_dtype must be a torch.dtype or None, got {expert_dtype!r}")
        super().__init__(ExpertPlacement(num_experts))
        self.expert_dtype = expert_dtype

    def permute(self, x: torch.Tensor, routing: Routing) -> Dispatched[FusedState]:
        """Rows (N, H) in expert order (in ``expert_dtype``) with their (E,) counts."""
        if not kernels_usable(x):
            rows = x.index_select(0, routing.token_index)
            rows = rows if self.expert_dtype is None else rows.to(self.expert_dtype)
            state = FusedState(rows_by_token=None, token_ptr=None, x_dtype=x.dtype)
            return Dispatched(rows=rows, tokens_per_expert=routing.tokens_per_expert, state=state)
        from moe.kernels import permute_rows, token_major_index

        rows_by_token, token_ptr = token_major_index(routing.token_index, routing.num_tokens)
        rows = permute_rows(x, routing.token_index, rows_by_token, token_ptr, self.expert_dtype)
        state = FusedState(rows_by_token=rows_by_token, token_ptr=token_ptr, x_dtype=x.dtype)
        return Dispatched(rows=rows, tokens_per_expert=routing.tokens_per_expert, state=state)

    def combine(self, expert_out: torch.Tensor, dispatched: Dispatched[FusedState], routing: Routing) -> torch.Tensor:
        """(T, H) sum over each token's pairs of ``weight * expert_out`` in a fixed order; no pairs gives 0."""
        state = dispatched.state
        if state.rows_by_token is None:
            return weighted_scatter_add(expert_out, routing).to(state.x_dtype)
        from moe.kernels import combine_rows

        return combine_rows(
            expert_out, routing.weight, routing.token_index, state.rows_by_token, state.token_ptr, state.x_dtype
        )
