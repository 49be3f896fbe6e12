"""Sinkhorn-balanced top-k routing (S-BASE, as in Megatron-Core)."""

from __future__ import annotations

import torch

from moe.routers.base import Router
from moe.routers.registry import register_router
from moe.routing import Routing, group_by_expert
from moe.validation import check_positive_float, check_positive_int, check_top_k

# Iterations between host checks of the convergence criterion; extra iterations only refine.
_CHECK_EVERY = 4


def sinkhorn(logits: torch.Tensor, tolerance: float, max_iterations: int) -> torch.Tensor:
    """Doubly-normalised ``diag(d0) C diag(d1)`` of ``C = exp(z - max_e z)`` (T, E), no gradient.

    Alternates ``d0 = (1/T) / (C d1)`` and ``d1 = (1/E) / (d0^T C)`` (rows sum to 1/T, columns to
    1/E) until the relative change of d1, ``mean|d1_new - d1_old| / mean d1_new``, is below
    ``tolerance`` or ``max_iterations`` is reached. Subtracting each row's max changes nothing but
    the range: row scalings are absorbed by d0. Cost: O(T * E) per iteration.
    """
    with torch.no_grad():
        num_tokens, num_experts = logits.shape
        cost = torch.exp(logits.float() - logits.float().max(dim=1, keepdim=True).values)
        tiny = torch.finfo(cost.dtype).tiny
        d1 = cost.new_ones(num_experts)
        for iteration in range(max_iterations):
            d0 = (1.0 / num_tokens) / (cost @ d1 + tiny)
            d1_new = (1.0 / num_experts) / (d0 @ cost + tiny)
            change = (d1_new - d1).abs().mean() / d1_new.mean()
            d1 = d1_new
            if (iteration + 1) % _CHECK_EVERY == 0 and not bool(change > tolerance):
                break
        return d0.unsqueeze(1) * cost * d1


@register_router("sinkhorn")
class SinkhornRouter(Router):
    """Top-k of the Sinkhorn-balanced scores in training, top-k of the gate scores in eval.

    Papers: S-BASE (Clark et al., "Unified Scaling Laws for Routed Language Models", 2022), as
    implemented in Megatron-Core's ``sinkhorn_load_balancing``.

    In training, ``P = diag(d0) C diag(d1)`` with ``C = exp(z)`` is scaled so that every token's row
    sums to 1/T and every expert's column to 1/E (a soft balanced assignment; see ``sinkhorn``),
    and each token takes the ``top_k`` experts of its row of P. In eval it takes the ``top_k`` of
    its gate scores. The combine weight is the gate score at the chosen expert: ``sigmoid(z)`` for
    ``top_k = 1``, ``softmax(z)`` over all experts for ``top_k > 1`` (no renormalisation),
    differentiable w.r.t. the gate; the selection takes no gradient. Dropless; no auxiliary loss.

    Args:
        tolerance: stop when the relative change of the column scaling d1 is below this (1e-4).
            Megatron-Core compares the absolute change; the relative one does not depend on the
            scale of d1.
        max_iterations: bound on the Sinkhorn iterations (100).

    Cost: one (T, H) x (H, E) GEMM and, in training, up to ``max_iterations`` O(T * E) iterations
    with a host sync every 4 of them.
    """

    def __init__(
        self,
        hidden_size: int,
        num_experts: int,
        top_k: int = 1,
        tolerance: float = 1e-4,
        max_iterations: int = 100,
    ):
        super().__init__(hidden_size, num_experts)
        self.top_k = check_top_k(top_k, num_experts)
        self.tolerance = check_positive_float("tolerance", tolerance)
        self.max_iterations = check_positive_int("max_iterations", max_iterations)

    def route(self, x, *, seq_len=None, token_ids=None) -> Routing:
        logits = self.compute_logits(x)
        num_tokens = logits.shape[0]
        scores = logits.sigmoid() if self.top_k == 1 else logits.softmax(-1)
        if self.training and num_tokens > 0:
            selection = sinkhorn(logits.detach(), self.tolerance, self.max_iterations)
        else:
            selection = scores.detach()
        chosen = selection.topk(self.top_k, dim=-1).indices
        weight = scores.gather(1, chosen)
        token_index = torch.arange(num_tokens, device=logits.device).repeat_interleave(self.top_k)
        return group_by_expert(token_index, chosen.flatten(), weight.flatten(), logits, logits.new_zeros(()))

    @property
    def experts_per_token(self) -> int:
        return self.top_k

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, top_k={self.top_k}, tolerance={self.tolerance}"
