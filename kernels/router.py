"""``FusedTopKRouter``: the top-k router with its scoring, selection and counting in one Triton kernel."""

from __future__ import annotations

import torch

from moe.dispatch.fused import kernels_usable
from moe.routers.topk import TopKRouter
from moe.routing import Routing

from .topk import topk_route


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


class FusedTopKRouter(TopKRouter):
    """``TopKRouter`` whose dropless path runs ``moe.kernels.topk_route`` and never synchronises with the host.

    Same arguments, parameters and outputs as ``TopKRouter`` (state dicts are interchangeable). Capacity
    drops, group-limited routing and noisy gating use the parent's pure-torch path (capacity syncs to size the
    kept pairs), as do inputs the kernels cannot run on (CPU without the Triton interpreter).
    The (T, E) scores are still formed in torch for the aux losses (the parent's formulas). Half-precision
    logits on CUDA come from one tensor-core GEMM accumulating in float32 (``compute_logits``).
    """

    def compute_logits(self, x: torch.Tensor) -> torch.Tensor:
        """``Router.compute_logits``; on CUDA with x and the gate both bf16 (or fp16), one half-precision GEMM
        with float32 accumulation and output (same maths, no float32 copy of x)."""
        weight = self.gate.weight
        if not (x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) and weight.dtype == x.dtype):
            return super().compute_logits(x)
        logits = _HalfGateLogits.apply(x, weight)
        message = f"non-finite router logits in layer '{self.layer_name}' (check the layer input and learning rate)"
        torch._assert_async(torch.isfinite(logits).all(), message)
        return logits

    def route(self, x, *, seq_len=None, token_ids=None) -> Routing:
        unfused = self.capacity_factor is not None or self.num_groups is not None or self.noise is not None
        if unfused or not kernels_usable(x):
            return super().route(x, seq_len=seq_len, token_ids=token_ids)
        if self.training and self.jitter_eps > 0:
            x = x * torch.empty_like(x).uniform_(1.0 - self.jitter_eps, 1.0 + self.jitter_eps)
        logits = self.compute_logits(x)
        num_tokens = logits.shape[0]
        bias = self.expert_bias if self.bias_update_rate is not None else None
        weights, chosen, counts = topk_route(
            logits, self.top_k, self.score_function, self.normalize_weights, self.route_scale, bias
        )
        counts = counts.long()
        chosen = chosen.long()
        if self.training and self.bias_update_rate is not None:
            self.step_load += counts.float()
        scores = logits.softmax(-1) if self.score_function == "softmax" else logits.sigmoid()
        aux_loss = self._aux_loss(logits, scores, chosen, counts, seq_len or num_tokens)
        flat_experts = chosen.flatten()
        order = torch.argsort(flat_experts.to(torch.int32), stable=True)
        return Routing(
            token_index=order // self.top_k,
            expert_index=flat_experts.index_select(0, order),
            weight=weights.flatten().index_select(0, order),
            tokens_per_expert=counts,
            logits=logits,
            aux_loss=aux_loss,
            num_requested=order.numel(),
        )
