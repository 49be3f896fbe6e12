"""Row-movement kernels over a token-major index: copy each token's row out to its pairs (permute) and sum
each token's pair rows (combine), no atomics.

``scatter_rows`` writes ``out[r] = scale[r] * src[t]`` for each pair row r of token t (optionally also
``dot[r] = <src[t], other[r]>``) and ``segment_sum`` writes
``out[t] = sum_p weight[rows[p]] * src[rows[p]]`` over ``p in [ptr[t], ptr[t + 1])`` in that fixed order,
accumulating in float32. Each output row is written by exactly one program, so every result is bitwise
reproducible. Both are memory bound: one read of the rows they touch and one write.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moe.kernel_support import check_kernel_module_name

check_kernel_module_name(__name__)


def next_power_of_2(n: int) -> int:
    """Smallest power of two >= n (plain Python, so torch.compile can trace it)."""
    return 1 << max(0, n - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    """Ceiling of a / b for positive ints."""
    return -(-a // b)


def _block_cols(width: int) -> int:
    return min(1024, next_power_of_2(width))


@triton.jit
def _scatter_rows_kernel(
    src_ptr,
    rows_ptr,
    seg_ptr,
    scale_ptr,
    other_ptr,
    out_ptr,
    dot_ptr,
    width,
    src_stride,
    other_stride,
    out_stride,
    HAS_SCALE: tl.constexpr,
    HAS_DOT: tl.constexpr,
    BLOCK_COLS: tl.constexpr,
):
    token = tl.program_id(0)
    begin = tl.load(seg_ptr + token)
    end = tl.load(seg_ptr + token + 1)
    src_row = src_ptr + token.to(tl.int64) * src_stride
    for p in range(begin, end):
        row = tl.load(rows_ptr + p).to(tl.int64)
        if HAS_SCALE:
            scale = tl.load(scale_ptr + row).to(tl.float32)
        dot = tl.zeros([BLOCK_COLS], dtype=tl.float32)
        for start in range(0, width, BLOCK_COLS):
            cols = start + tl.arange(0, BLOCK_COLS)
            mask = cols < width
            values = tl.load(src_row + cols, mask=mask, other=0.0)
            if HAS_DOT:
                other = tl.load(other_ptr + row * other_stride + cols, mask=mask, other=0.0)
                dot += values.to(tl.float32) * other.to(tl.float32)
            if HAS_SCALE:
                values = values.to(tl.float32) * scale
            tl.store(out_ptr + row * out_stride + cols, values.to(out_ptr.dtype.element_ty), mask=mask)
        if HAS_DOT:
            tl.store(dot_ptr + row, tl.sum(dot, axis=0))


@triton.jit
def _segment_sum_kernel(
    src_ptr,
    weight_ptr,
    rows_ptr,
    seg_ptr,
    out_ptr,
    width,
    src_stride,
    out_stride,
    HAS_WEIGHT: tl.constexpr,
    BLOCK_COLS: tl.constexpr,
):
    token = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
    col_mask = cols < width
    begin = tl.load(seg_ptr + token)
    end = tl.load(seg_ptr + token + 1)
    acc = tl.zeros([BLOCK_COLS], dtype=tl.float32)
    for p in range(begin, end):
        row = tl.load(rows_ptr + p).to(tl.int64)
        values = tl.load(src_ptr + row * src_stride + cols, mask=col_mask, other=0.0).to(tl.float32)
        if HAS_WEIGHT:
            values = values * tl.load(weight_ptr + row).to(tl.float32)
        acc += values
    tl.store(out_ptr + token.to(tl.int64) * out_stride + cols, acc.to(out_ptr.dtype.element_ty), mask=col_mask)


def _scatter_rows_launch(
    src: torch.Tensor,
    rows: torch.Tensor,
    segment_ptr: torch.Tensor,
    num_rows: int,
    *,
    scale: torch.Tensor | None = None,
    other: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Eager launch of ``_scatter_rows_kernel`` (see ``scatter_rows``)."""
    if src.stride(-1) != 1:
        src = src.contiguous()
    width = src.shape[1]
    out = torch.empty(num_rows, width, dtype=out_dtype or src.dtype, device=src.device)
    dot = None
    if other is not None:
        other = other.contiguous()
        dot = torch.empty(num_rows, dtype=torch.float32, device=src.device)
    num_tokens = segment_ptr.numel() - 1
    if num_rows == 0 or num_tokens == 0:
        return out, dot
    _scatter_rows_kernel[(num_tokens,)](
        src,
        rows,
        segment_ptr,
        scale if scale is not None else src,
        other if other is not None else src,
        out,
        dot if dot is not None else out,
        width,
        src.stride(0),
        other.stride(0) if other is not None else 0,
        out.stride(0),
        HAS_SCALE=scale is not None,
        HAS_DOT=other is not None,
        BLOCK_COLS=_block_cols(width),
    )
    return out, dot


def _segment_sum_launch(
    src: torch.Tensor,
    rows: torch.Tensor,
    segment_ptr: torch.Tensor,
    *,
    weight: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Eager launch of ``_segment_sum_kernel`` (see ``segment_sum``)."""
    if src.stride(-1) != 1:
        src = src.contiguous()
    num_tokens, width = segment_ptr.numel() - 1, src.shape[1]
    out = torch.empty(num_tokens, width, dtype=out_dtype or src.dtype, device=src.device)
    if num_tokens == 0:
        return out
    block_cols = _block_cols(width)
    grid = (num_tokens, cdiv(width, block_cols))
    _segment_sum_kernel[grid](
        src,
        weight if weight is not None else src,
        rows,
        segment_ptr,
        out,
        width,
        src.stride(0),
        out.stride(0),
        HAS_WEIGHT=weight is not None,
        BLOCK_COLS=block_cols,
    )
    return out


# PyTorch custom operators over the launchers: Dynamo and Inductor treat each as one opaque node with a known
# output shape (the fake implementations below), so a compiled layer traces into one graph, also when the
# token count is dynamic. The launchers above stay the eager implementation.


@torch.library.custom_op("moe::scatter_rows", mutates_args=())
def _scatter_rows_op(
    src: torch.Tensor,
    rows: torch.Tensor,
    segment_ptr: torch.Tensor,
    num_rows: int,
    scale: torch.Tensor | None,
    other: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    out, dot = _scatter_rows_launch(src, rows, segment_ptr, num_rows, scale=scale, other=other, out_dtype=out_dtype)
    # A custom op returns tensors only: without ``other`` the dot output is an empty float32 tensor.
    return out, dot if dot is not None else src.new_empty(0, dtype=torch.float32)


@_scatter_rows_op.register_fake
def _(src, rows, segment_ptr, num_rows, scale, other, out_dtype):
    out = src.new_empty(num_rows, src.shape[1], dtype=out_dtype)
    return out, src.new_empty(num_rows if other is not None else 0, dtype=torch.float32)


@torch.library.custom_op("moe::segment_sum", mutates_args=())
def _segment_sum_op(
    src: torch.Tensor,
    rows: torch.Tensor,
    segment_ptr: torch.Tensor,
    weight: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    return _segment_sum_launch(src, rows, segment_ptr, weight=weight, out_dtype=out_dtype)


@_segment_sum_op.register_fake
def _(src, rows, segment_ptr, weight, out_dtype):
    return src.new_empty(segment_ptr.shape[0] - 1, src.shape[1], dtype=out_dtype)


def scatter_rows(
    src: torch.Tensor,
    rows: torch.Tensor,
    segment_ptr: torch.Tensor,
    num_rows: int,
    *,
    scale: torch.Tensor | None = None,
    other: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Copy token rows out to their pairs: (N, W) with ``out[r] = scale[r] * src[t]`` for every
    ``r = rows[p]``, ``p`` in ``[segment_ptr[t], segment_ptr[t+1])``, and row dots ``<src[t], other[r]>`` or None.

    Reads each token row once (it stays in cache for its k copies); ``rows`` must list every row in
    [0, num_rows) exactly once, so each output row has one writer. Runs as the custom op ``moe::scatter_rows``.
    """
    out, dot = _scatter_rows_op(src, rows, segment_ptr, num_rows, scale, other, out_dtype or src.dtype)
    return out, dot if other is not None else None


def segment_sum(
    src: torch.Tensor,
    rows: torch.Tensor,
    segment_ptr: torch.Tensor,
    *,
    weight: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """(T, W): row t is the float32 sum over ``p`` in ``[segment_ptr[t], segment_ptr[t+1])`` of
    ``weight[rows[p]] * src[rows[p]]``, in increasing ``p``; empty segments give 0. Runs as ``moe::segment_sum``.
    """
    return _segment_sum_op(src, rows, segment_ptr, weight, out_dtype or src.dtype)
