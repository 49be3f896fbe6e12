"""Differentiable permute and combine built on the row kernels, with deterministic forward and backward.

Both take the routing's expert-major pairs plus a token-major inverse index (``token_major_index``), so
each token gathers its own rows in a fixed order instead of scatter-adding with atomics:

- permute: forward copies each token's row to its pair rows (optionally casting), reading it once; backward
  sums each token's row gradients.
- combine: forward sums ``weight * y`` over each token's rows; backward copies the token gradient to each
  of its rows (times the weight) and takes one dot product per row for the weight gradient.

Both are PyTorch custom operators (``moe::permute_rows``, ``moe::combine_rows``) with fake implementations and
registered backwards, so ``torch.compile`` traces them without a graph break, with dynamic token counts.
``token_index`` is taken for the callers' convenience; its length equals ``rows_by_token``'s.
"""

from __future__ import annotations

import torch

from moe.kernel_support import check_kernel_module_name

from .rows import scatter_rows, segment_sum

check_kernel_module_name(__name__)


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


@torch.library.custom_op("moe::permute_rows", mutates_args=())
def _permute_op(
    x: torch.Tensor, rows_by_token: torch.Tensor, token_ptr: torch.Tensor, out_dtype: torch.dtype
) -> torch.Tensor:
    rows, _ = scatter_rows(x, rows_by_token, token_ptr, rows_by_token.shape[0], out_dtype=out_dtype)
    return rows


@_permute_op.register_fake
def _(x, rows_by_token, token_ptr, out_dtype):
    return x.new_empty(rows_by_token.shape[0], x.shape[1], dtype=out_dtype)


def _permute_setup(ctx, inputs, output):
    x, rows_by_token, token_ptr, _ = inputs
    ctx.save_for_backward(rows_by_token, token_ptr)
    ctx.x_dtype = x.dtype


def _permute_backward(ctx, grad_rows):
    rows_by_token, token_ptr = ctx.saved_tensors
    return segment_sum(grad_rows, rows_by_token, token_ptr, out_dtype=ctx.x_dtype), None, None, None


_permute_op.register_autograd(_permute_backward, setup_context=_permute_setup)


@torch.library.custom_op("moe::combine_rows", mutates_args=())
def _combine_op(
    y: torch.Tensor, weight: torch.Tensor, rows_by_token: torch.Tensor, token_ptr: torch.Tensor, out_dtype: torch.dtype
) -> torch.Tensor:
    return segment_sum(y, rows_by_token, token_ptr, weight=weight, out_dtype=out_dtype)


@_combine_op.register_fake
def _(y, weight, rows_by_token, token_ptr, out_dtype):
    return y.new_empty(token_ptr.shape[0] - 1, y.shape[1], dtype=out_dtype)


def _combine_setup(ctx, inputs, output):
    y, weight, rows_by_token, token_ptr, _ = inputs
    ctx.save_for_backward(y, weight, rows_by_token, token_ptr)


def _combine_backward(ctx, grad_out):
    y, weight, rows_by_token, token_ptr = ctx.saved_tensors
    other = y if ctx.needs_input_grad[1] else None
    grad_y, grad_weight = scatter_rows(
        grad_out, rows_by_token, token_ptr, y.shape[0], scale=weight, other=other, out_dtype=y.dtype
    )
    return grad_y, grad_weight, None, None, None


_combine_op.register_autograd(_combine_backward, setup_context=_combine_setup)


def permute_rows(
    x: torch.Tensor,
    token_index: torch.Tensor,
    rows_by_token: torch.Tensor,
    token_ptr: torch.Tensor,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """(N, H) rows ``x[token_index]`` in ``out_dtype`` (default x's); differentiable in x, deterministically."""
    return _permute_op(x, rows_by_token, token_ptr, out_dtype or x.dtype)


def combine_rows(
    y: torch.Tensor,
    weight: torch.Tensor,
    token_index: torch.Tensor,
    rows_by_token: torch.Tensor,
    token_ptr: torch.Tensor,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """(T, H): each token's float32 sum of ``weight[r] * y[r]`` over its rows r; differentiable in y and weight."""
    return _combine_op(y, weight, rows_by_token, token_ptr, out_dtype or y.dtype)
