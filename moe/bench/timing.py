"""Timing helpers for the GPU benchmarks: median of CUDA-event-timed repeats and peak memory of one call."""

from __future__ import annotations

import statistics

import torch


def time_cuda(fn, *, warmup: int = 3, repeats: int = 10) -> float:
    """Median milliseconds of ``fn()`` over ``repeats`` calls after ``warmup``, each between two CUDA events.

    The calls are enqueued back to back with no synchronisation between them (as ``triton.testing.do_bench``
    does), so a host-sync-free ``fn`` lets the CPU launch ahead of the GPU as it would inside a model, and
    a ``fn`` that synchronises pays for it.
    """
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(repeats)]
    for start, end in events:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(start.elapsed_time(end) for start, end in events)


def peak_memory_gib(fn) -> float:
    """Peak GiB allocated on the current CUDA device during one ``fn()`` (everything live, weights included)."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2**30


def expert_flops(num_tokens: int, top_k: int, hidden: int, ffn: int, activation: str) -> float:
    """Expert-MLP FLOPs of one forward plus backward (3x forward): 2 * T*k * H * F per matmul, 3 or 2 matmuls."""
    matmuls = 3 if activation == "swiglu" else 2
    return 3 * 2 * num_tokens * top_k * hidden * ffn * matmuls
