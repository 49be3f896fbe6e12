"""Router gate logits of half-precision inputs from one tensor-core GEMM accumulating in float32.

The products of two bf16/fp16 numbers are exact in float32, so this is the float32 maths of
``Router.compute_logits`` without materialising float32 copies; the backward is float32 like it. A custom
operator (``moe::half_gate_logits``), so ``torch.compile`` traces it as one node with a known output shape.
"""

from __future__ import annotations

import torch

from moe.kernel_support import check_kernel_module_name

check_kernel_module_name(__name__)


@torch.library.custom_op("moe::half_gate_logits", mutates_args=())
def _gate_op(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return torch.mm(x, weight.t(), out_dtype=torch.float32)


@_gate_op.register_kernel("cpu")
def _(x, weight):
    # No float32-output mm on the CPU: the same maths (exact products, float32 sums) through float32 copies.
    return x.float() @ weight.float().t()


@_gate_op.register_fake
def _(x, weight):
    return x.new_empty(x.shape[0], weight.shape[0], dtype=torch.float32)


def _gate_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _gate_backward(ctx, grad_logits):
    x, weight = ctx.saved_tensors
    grad_x = (grad_logits @ weight.float()).to(x.dtype) if ctx.needs_input_grad[0] else None
    grad_weight = (grad_logits.t() @ x.float()).to(weight.dtype) if ctx.needs_input_grad[1] else None
    return grad_x, grad_weight


_gate_op.register_autograd(_gate_backward, setup_context=_gate_setup)


def half_gate_logits(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """float32 logits (T, E) of bf16/fp16 ``x`` (T, H) and gate ``weight`` (E, H) of the same dtype (CUDA);
    differentiable in both, gradients in their dtypes."""
    return _gate_op(x, weight)
