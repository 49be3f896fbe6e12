"""Differentiable permute and combine built on the row kernels, with deterministic forward and backward.

Both take the routing's expert-major pairs plus a token-major inverse index (``token_major_index``), so
each token gathers its own rows in a fixed order instead of scatter-adding with atomics:

- permute: forward copies each token's row to its pair rows (optionally casting), reading it once; backward
  sums each token's row gradients.
- combine: forward sums ``weight * y`` over each token's rows; backward copies the token gradient to each
  of its rows (times the weight) and takes one dot product per row for the weight gradient.
"""

from __future__ import annotations

import torch

from .rows import scatter_rows, segment_sum


def token_major_index(token_index: torch.Tensor, num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows_by_token (N,), token_ptr (T+1,)): row positions sorted by token, and each token's slice of them.

    Token t's rows are ``rows_by_token[token_ptr[t]:token_ptr[t+1]]`` in increasing (expert) order. One stable
    sort of N keys and a binary search; no host synchronisation.
    """
    key = token_index.to(torch.int32) if num_tokens < 2**31 else token_index
    rows_by_token = torch.argsort(key, stable=True)
    sorted_tokens = key.index_select(0, rows_by_token)
    boundaries = torch.arange(num_tokens + 1, device=token_index.device, dtype=key.dtype)
    token_ptr = torch.searchsorted(sorted_tokens, boundaries)
    return rows_by_token, token_ptr


class _Permute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, token_index, rows_by_token, token_ptr, out_dtype):
        ctx.save_for_backward(rows_by_token, token_ptr)
        ctx.x_dtype = x.dtype
        rows, _ = scatter_rows(x, rows_by_token, token_ptr, token_index.numel(), out_dtype=out_dtype)
        return rows

    @staticmethod
    def backward(ctx, grad_rows):
        rows_by_token, token_ptr = ctx.saved_tensors
        grad_x = segment_sum(grad_rows, rows_by_token, token_ptr, out_dtype=ctx.x_dtype)
        return grad_x, None, None, None, None


class _Combine(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, weight, token_index, rows_by_token, token_ptr, out_dtype):
        ctx.save_for_backward(y, weight, rows_by_token, token_ptr)
        return segment_sum(y, rows_by_token, token_ptr, weight=weight, out_dtype=out_dtype)

    @staticmethod
    def backward(ctx, grad_out):
        y, weight, rows_by_token, token_ptr = ctx.saved_tensors
        need_weight_grad = ctx.needs_input_grad[1]
        grad_y, grad_weight = scatter_rows(
            grad_out,
            rows_by_token,
            token_ptr,
            y.shape[0],
            scale=weight,
            other=y if need_weight_grad else None,
            out_dtype=y.dtype,
        )
        return grad_y, grad_weight, None, None, None, None


def permute_rows(
    x: torch.Tensor,
    token_index: torch.Tensor,
    rows_by_token: torch.Tensor,
    token_ptr: torch.Tensor,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """(N, H) rows ``x[token_index]`` in ``out_dtype`` (default x's); differentiable in x, deterministically."""
    return _Permute.apply(x, token_index, rows_by_token, token_ptr, out_dtype or x.dtype)


def combine_rows(
    y: torch.Tensor,
    weight: torch.Tensor,
    token_index: torch.Tensor,
    rows_by_token: torch.Tensor,
    token_ptr: torch.Tensor,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """(T, H): each token's float32 sum of ``weight[r] * y[r]`` over its rows r; differentiable in y and weight."""
    return _Combine.apply(y, weight, token_index, rows_by_token, token_ptr, out_dtype or y.dtype)
