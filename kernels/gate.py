"""Router gate logits of half-precision inputs from one tensor-core GEMM accumulating in float32."""

from __future__ import annotations

import torch


class _HalfGateLogits(torch.autograd.Function):
    """float32 logits of half-precision x and gate weight from one tensor-core GEMM accumulating in float32.

    The products of two bf16/fp16 numbers are exact in float32, so this is the float32 maths of
    ``Router.compute_logits`` without materialising float32 copies; the backward is float32 like it.
    """

    @staticmethod
    def forward(ctx, x, weight):
        ctx.save_for_backward(x, weight)
        return torch.mm(x, weight.t(), out_dtype=torch.float32)

    @staticmethod
    def backward(ctx, grad_logits):
        x, weight = ctx.saved_tensors
        grad_x = (grad_logits @ weight.float()).to(x.dtype) if ctx.needs_input_grad[0] else None
        grad_weight = (grad_logits.t() @ x.float()).to(weight.dtype) if ctx.needs_input_grad[1] else None
        return grad_x, grad_weight


def half_gate_logits(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """float32 logits (T, E) of bf16/fp16 ``x`` (T, H) and gate ``weight`` (E, H) of the same dtype (CUDA);
    differentiable in both, gradients in their dtypes."""
    return _HalfGateLogits.apply(x, weight)
