"""Row-movement kernels: gather rows by index (permute) and sum each token's rows (combine), no atomics.

``gather_rows`` writes ``out[i] = scale[i] * src[index[i]]`` (optionally also ``dot[i] = <src[index[i]], other[i]>``)
and ``segment_sum`` writes ``out[t] = sum_p weight[rows[p]] * src[rows[p]]`` over ``p in [ptr[t], ptr[t + 1])``
in that fixed order, accumulating in float32. Each output row is written by exactly one program, so every
result is bitwise reproducible. Both are memory bound: one read of the rows they touch and one write.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

GATHER_BLOCK_ROWS = 4


def _block_cols(width: int) -> int:
    return min(1024, triton.next_power_of_2(width))


@triton.jit
def _gather_rows_kernel(
    src_ptr,
    index_ptr,
    scale_ptr,
    other_ptr,
    out_ptr,
    dot_ptr,
    num_rows,
    width,
    src_stride,
    other_stride,
    out_stride,
    HAS_SCALE: tl.constexpr,
    HAS_DOT: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_COLS: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    row_mask = rows < num_rows
    src_rows = tl.load(index_ptr + rows, mask=row_mask, other=0).to(tl.int64)
    rows64 = rows.to(tl.int64)
    if HAS_SCALE:
        scale = tl.load(scale_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)
    dot = tl.zeros([BLOCK_ROWS], dtype=tl.float32)
    for start in range(0, width, BLOCK_COLS):
        cols = start + tl.arange(0, BLOCK_COLS)
        mask = row_mask[:, None] & (cols < width)[None, :]
        values = tl.load(src_ptr + src_rows[:, None] * src_stride + cols[None, :], mask=mask, other=0.0)
        if HAS_DOT:
            other = tl.load(other_ptr + rows64[:, None] * other_stride + cols[None, :], mask=mask, other=0.0)
            dot += tl.sum(values.to(tl.float32) * other.to(tl.float32), axis=1)
        if HAS_SCALE:
            values = values.to(tl.float32) * scale[:, None]
        tl.store(out_ptr + rows64[:, None] * out_stride + cols[None, :], values.to(out_ptr.dtype.element_ty), mask=mask)
    if HAS_DOT:
        tl.store(dot_ptr + rows, dot, mask=row_mask)


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


def gather_rows(
    src: torch.Tensor,
    index: torch.Tensor,
    *,
    scale: torch.Tensor | None = None,
    other: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(``scale[:, None] *`` ``src[index]`` cast to ``out_dtype``, row dots with ``other`` or None).

    ``src`` (R, W) with unit column stride, ``index`` (N,) int in [0, R), ``scale`` (N,), ``other`` (N, W).
    """
    if src.stride(-1) != 1:
        src = src.contiguous()
    num_rows, width = index.numel(), src.shape[1]
    out = torch.empty(num_rows, width, dtype=out_dtype or src.dtype, device=src.device)
    dot = None
    if other is not None:
        other = other.contiguous()
        dot = torch.empty(num_rows, dtype=torch.float32, device=src.device)
    if num_rows == 0:
        return out, dot
    grid = (triton.cdiv(num_rows, GATHER_BLOCK_ROWS),)
    _gather_rows_kernel[grid](
        src,
        index,
        scale if scale is not None else src,
        other if other is not None else src,
        out,
        dot if dot is not None else out,
        num_rows,
        width,
        src.stride(0),
        other.stride(0) if other is not None else 0,
        out.stride(0),
        HAS_SCALE=scale is not None,
        HAS_DOT=other is not None,
        BLOCK_ROWS=GATHER_BLOCK_ROWS,
        BLOCK_COLS=_block_cols(width),
    )
    return out, dot


def segment_sum(
    src: torch.Tensor,
    rows: torch.Tensor,
    segment_ptr: torch.Tensor,
    *,
    weight: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """(T, W): row t is the float32 sum over ``p`` in ``[segment_ptr[t], segment_ptr[t+1])`` of
    ``weight[rows[p]] * src[rows[p]]``, in increasing ``p``; empty segments give 0.
    """
    if src.stride(-1) != 1:
        src = src.contiguous()
    num_tokens, width = segment_ptr.numel() - 1, src.shape[1]
    out = torch.empty(num_tokens, width, dtype=out_dtype or src.dtype, device=src.device)
    if num_tokens == 0:
        return out
    block_cols = _block_cols(width)
    grid = (num_tokens, triton.cdiv(width, block_cols))
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
