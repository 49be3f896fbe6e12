"""Fused router top-k: scores (softmax or sigmoid), top-k selection, weight normalisation and per-expert counts.

One program handles a block of tokens with all E logits in registers, so the (T, E) scores never go to
memory. Per-expert counts are summed per block and added with integer atomics (exact, so deterministic).
The backward recomputes the (T, E) scores in torch and applies the closed-form gradient (O(T * E)).
Registered as the custom operator ``moe::topk_route`` (fake implementation and backward), so it compiles
without a graph break.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moe.kernel_support import check_kernel_module_name
from moe.routers.topk import SCORE_FUNCTIONS

from .rows import cdiv, next_power_of_2

check_kernel_module_name(__name__)


@triton.jit
def _topk_kernel(
    logits_ptr,
    bias_ptr,
    weight_ptr,
    index_ptr,
    counts_ptr,
    num_tokens,
    num_experts,
    route_scale,
    K: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SIGMOID: tl.constexpr,
    NORMALIZE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_TOKENS: tl.constexpr,
    BLOCK_EXPERTS: tl.constexpr,
):
    tokens = tl.program_id(0) * BLOCK_TOKENS + tl.arange(0, BLOCK_TOKENS)
    experts = tl.arange(0, BLOCK_EXPERTS)
    token_mask = tokens < num_tokens
    expert_mask = experts < num_experts
    mask = token_mask[:, None] & expert_mask[None, :]
    logits = tl.load(logits_ptr + tokens.to(tl.int64)[:, None] * num_experts + experts[None, :], mask=mask, other=0.0)
    # Padding experts get -inf (score 0); padding tokens keep finite zeros so no lane computes inf - inf.
    logits = tl.where(expert_mask[None, :], logits.to(tl.float32), float("-inf"))
    if SIGMOID:
        scores = tl.sigmoid(logits)
    else:
        shifted = tl.exp(logits - tl.max(logits, axis=1)[:, None])
        scores = shifted / tl.sum(shifted, axis=1)[:, None]
    selection = scores
    if HAS_BIAS:
        selection = selection + tl.load(bias_ptr + experts, mask=expert_mask, other=0.0)[None, :]
    selection = tl.where(mask, selection, float("-inf"))
    slots = tl.arange(0, BLOCK_K)
    weights = tl.zeros([BLOCK_TOKENS, BLOCK_K], dtype=tl.float32)
    chosen = tl.zeros([BLOCK_TOKENS, BLOCK_K], dtype=tl.int32)
    picked = tl.zeros([BLOCK_TOKENS, BLOCK_EXPERTS], dtype=tl.int32)
    for j in tl.static_range(K):
        best = tl.argmax(selection, axis=1, tie_break_left=True).to(tl.int32)
        hit = experts[None, :] == best[:, None]
        weight = tl.sum(tl.where(hit, scores, 0.0), axis=1)
        weights = tl.where(slots[None, :] == j, weight[:, None], weights)
        chosen = tl.where(slots[None, :] == j, best[:, None], chosen)
        picked += hit.to(tl.int32)
        selection = tl.where(hit, float("-inf"), selection)
    if NORMALIZE:
        weights = weights / tl.sum(weights, axis=1)[:, None]
    weights = weights * route_scale
    out_mask = token_mask[:, None] & (slots < K)[None, :]
    offsets = tokens.to(tl.int64)[:, None] * K + slots[None, :]
    tl.store(weight_ptr + offsets, weights, mask=out_mask)
    tl.store(index_ptr + offsets, chosen, mask=out_mask)
    block_counts = tl.sum(tl.where(token_mask[:, None], picked, 0), axis=0)
    tl.atomic_add(counts_ptr + experts, block_counts, mask=expert_mask)


def _scores(logits: torch.Tensor, score_function: str) -> torch.Tensor:
    return logits.softmax(-1) if score_function == "softmax" else logits.sigmoid()


@torch.library.custom_op("moe::topk_route", mutates_args=())
def _topk_op(
    logits: torch.Tensor,
    bias: torch.Tensor | None,
    top_k: int,
    score_function: str,
    normalize: bool,
    route_scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    num_tokens, num_experts = logits.shape
    logits = logits.contiguous()
    weights = torch.empty(num_tokens, top_k, dtype=torch.float32, device=logits.device)
    index = torch.empty(num_tokens, top_k, dtype=torch.int32, device=logits.device)
    counts = torch.zeros(num_experts, dtype=torch.int32, device=logits.device)
    block_experts = next_power_of_2(num_experts)
    block_tokens = max(1, min(64, 4096 // block_experts))
    if num_tokens > 0:
        _topk_kernel[(cdiv(num_tokens, block_tokens),)](
            logits,
            bias if bias is not None else logits,
            weights,
            index,
            counts,
            num_tokens,
            num_experts,
            float(route_scale),
            K=top_k,
            BLOCK_K=next_power_of_2(top_k),
            SIGMOID=score_function == "sigmoid",
            NORMALIZE=normalize,
            HAS_BIAS=bias is not None,
            BLOCK_TOKENS=block_tokens,
            BLOCK_EXPERTS=block_experts,
        )
    return weights, index, counts


@_topk_op.register_fake
def _(logits, bias, top_k, score_function, normalize, route_scale):
    num_tokens, num_experts = logits.shape
    weights = logits.new_empty(num_tokens, top_k, dtype=torch.float32)
    return (
        weights,
        logits.new_empty(num_tokens, top_k, dtype=torch.int32),
        logits.new_empty(num_experts, dtype=torch.int32),
    )


def _topk_setup(ctx, inputs, output):
    logits, _, _, score_function, normalize, route_scale = inputs
    ctx.save_for_backward(logits, output[1])
    ctx.options = (score_function, normalize, route_scale)


def _topk_backward(ctx, grad_weights, _grad_index, _grad_counts):
    """Closed-form gradient of the chosen (renormalised, scaled) scores with respect to the logits."""
    logits, index = ctx.saved_tensors
    score_function, normalize, route_scale = ctx.options
    index = index.long()
    scores = _scores(logits, score_function)
    chosen = scores.gather(1, index)
    grad_chosen = grad_weights.to(scores.dtype) * route_scale  # bf16 under autocast
    if normalize:  # w_j = v_j / S: dL/dv_j = (g_j - sum_l g_l v_l / S) / S
        total = chosen.sum(-1, keepdim=True)
        grad_chosen = (grad_chosen - (grad_chosen * chosen).sum(-1, keepdim=True) / total) / total
    grad_scores = torch.zeros_like(scores).scatter_(1, index, grad_chosen)  # k distinct experts per row
    if score_function == "softmax":
        grad_logits = scores * (grad_scores - (grad_scores * scores).sum(-1, keepdim=True))
    else:
        grad_logits = grad_scores * scores * (1.0 - scores)
    return grad_logits, None, None, None, None, None


_topk_op.register_autograd(_topk_backward, setup_context=_topk_setup)


def topk_route(
    logits: torch.Tensor,
    top_k: int,
    score_function: str = "softmax",
    normalize: bool = True,
    route_scale: float = 1.0,
    bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(weights (T, k) float32, experts (T, k) int32, counts (E,) int32) for float32 logits (T, E).

    Experts are chosen by score (+ ``bias``) in decreasing order, ties to the lower index; weights are the
    unbiased scores, renormalised over the k when ``normalize``, times ``route_scale``. Differentiable in
    ``logits`` through the weights.
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be (T, E), got shape {tuple(logits.shape)}")
    if score_function not in SCORE_FUNCTIONS:
        raise ValueError(f"score_function must be one of {SCORE_FUNCTIONS}, got {score_function!r}")
    if not 1 <= top_k <= logits.shape[1]:
        raise ValueError(f"top_k must be in [1, num_experts={logits.shape[1]}], got {top_k}")
    return _topk_op(logits, bias, top_k, score_function, bool(normalize), float(route_scale))
