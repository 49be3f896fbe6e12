"""``FusedDispatcher``: permute and combine through the Triton kernels (deterministic, no host sync)."""

from __future__ import annotations

import importlib.util
import os

import torch

from moe.dispatch.local import Dispatched, LocalDispatcher
from moe.routers import Router, build_router
from moe.routing import Routing

HAVE_TRITON = importlib.util.find_spec("triton") is not None


def kernels_usable(x: torch.Tensor) -> bool:
    """True when the Triton kernels can run on ``x``: triton installed and x on CUDA (or the interpreter on)."""
    return HAVE_TRITON and (x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1")


def build_kernel_router(name: str, hidden_size: int, num_experts: int, **kwargs) -> Router:
    """``build_router``, except that "topk" gives ``moe.kernels.FusedTopKRouter`` when triton is installed."""
    if name == "topk" and HAVE_TRITON:
        from moe.kernels import FusedTopKRouter

        return FusedTopKRouter(hidden_size, num_experts, **kwargs)
    return build_router(name, hidden_size, num_experts, **kwargs)


class FusedDispatcher(LocalDispatcher):
    """Permute/combine with ``moe.kernels``: each token gathers its own rows, so both passes are deterministic.

    Args:
        expert_dtype: cast the permuted rows to this dtype inside the permute kernel (e.g. bf16 experts
            on a float32 residual stream); combine casts back to the input's dtype. None keeps x's dtype.

    Falls back to ``LocalDispatcher`` (pure torch) where the kernels cannot run (CPU without the Triton
    interpreter, or triton not installed). Cost: one read and one write of the N permuted rows per pass,
    plus a stable sort of the N token indices for the inverse index.
    """

    def __init__(self, expert_dtype: torch.dtype | None = None):
        if expert_dtype is not None and not isinstance(expert_dtype, torch.dtype):
            raise TypeError(f"expert_dtype must be a torch.dtype or None, got {expert_dtype!r}")
        self.expert_dtype = expert_dtype

    def permute(self, x: torch.Tensor, routing: Routing) -> Dispatched:
        """Rows (N, H) in expert order (in ``expert_dtype``) with their (E,) counts."""
        if not kernels_usable(x):
            rows = super().permute(x, routing).rows
            rows = rows if self.expert_dtype is None else rows.to(self.expert_dtype)
            return Dispatched(rows=rows, tokens_per_expert=routing.tokens_per_expert, state=(None, None, x.dtype))
        from moe.kernels import permute_rows, token_major_index

        rows_by_token, token_ptr = token_major_index(routing.token_index, routing.num_tokens)
        rows = permute_rows(x, routing.token_index, rows_by_token, token_ptr, self.expert_dtype)
        state = (rows_by_token, token_ptr, x.dtype)
        return Dispatched(rows=rows, tokens_per_expert=routing.tokens_per_expert, state=state)

    def combine(self, expert_out: torch.Tensor, dispatched: Dispatched, routing: Routing) -> torch.Tensor:
        """(T, H) sum over each token's pairs of ``weight * expert_out`` in a fixed order; no pairs gives 0."""
        rows_by_token, token_ptr, x_dtype = dispatched.state
        if rows_by_token is None:
            return super().combine(expert_out, dispatched, routing).to(x_dtype)
        from moe.kernels import combine_rows

        return combine_rows(expert_out, routing.weight, routing.token_index, rows_by_token, token_ptr, x_dtype)
