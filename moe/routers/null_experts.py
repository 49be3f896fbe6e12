"""Top-k routing with null experts (AdaMoE, Zeng et al. 2024): a token may use fewer than k real experts."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moe.losses import load_balancing_loss, z_loss
from moe.routers.base import Router
from moe.routers.registry import register_router
from moe.routing import Routing, count_per_expert, group_by_expert
from moe.validation import check_nonnegative_float, check_positive_int, check_top_k


@register_router("null_experts")
class NullExpertRouter(Router):
    """Top-k over E real plus n null experts; null experts output zero and cost nothing.

    Read from the authors' code (CengZihao/AdaMoE): the null experts have their own gate rows
    (``null_gate``, 1 x n x H), P = softmax over all E + n logits, each token takes the top k of P, and
    the weights of its real experts are renormalised to sum to 1 (``normalize_weights``). A token's
    number of real experts therefore varies from 0 to k; ``Routing`` holds only the real pairs (a
    token routed only to null experts gets none, and output 0 from this layer). ``Routing.logits``
    are the E real logits. The Switch load-balancing loss runs over all E + n experts, null ones
    included, with their own counts: at balance a token picks null experts k·n/(E + n) times on
    average, which is how the loss sets the average number of real experts per token,
    k·E/(E + n). The ST-MoE z-loss covers all E + n logits.

    Args:
        top_k: experts per token, real and null together, in [1, E + n].
        num_null_experts: n >= 1.
        normalize_weights: renormalise a token's real weights to sum to 1 (default True).

    Cost: the (T, H) x (H, E + n) gate GEMM, a top-k over E + n and a sort of the kept pairs. The
    number of pairs is data dependent: one host sync per forward on CUDA.
    """

    def __init__(
        self,
        hidden_size: int,
        num_experts: int,
        top_k: int = 2,
        *,
        num_null_experts: int = 1,
        normalize_weights: bool = True,
        load_balancing_coef: float = 1e-2,
        z_loss_coef: float = 1e-3,
    ):
        super().__init__(hidden_size, num_experts)
        self.num_null_experts = check_positive_int("num_null_experts", num_null_experts)
        self.top_k = check_top_k(top_k, num_experts + num_null_experts)
        check_nonnegative_float("load_balancing_coef", load_balancing_coef)
        check_nonnegative_float("z_loss_coef", z_loss_coef)
        self.normalize_weights = bool(normalize_weights)
        self.load_balancing_coef = load_balancing_coef
        self.z_loss_coef = z_loss_coef
        # (1, n, H): a leading dim that is never E, so expert surgery (moe.compress) refuses to slice it
        # as if it were per real expert (it would be whenever n == E).
        self.null_gate = nn.Parameter(torch.empty(1, num_null_experts, hidden_size))
        nn.init.normal_(self.null_gate, std=hidden_size**-0.5)

    def route(self, x, *, seq_len=None, token_ids=None) -> Routing:
        """The real-expert pairs of a top-k over E + n experts, with the weighted losses."""
        logits = self.compute_logits(x)
        with torch.autocast(x.device.type, enabled=False):
            null_logits = F.linear(x.to(logits.dtype), self.null_gate[0].to(logits.dtype))
        all_logits = torch.cat([logits, null_logits], dim=-1)
        probs = all_logits.softmax(-1)
        num_tokens = logits.shape[0]
        chosen = probs.detach().topk(self.top_k, dim=-1).indices
        weights = probs.gather(1, chosen)
        real = chosen < self.num_experts
        if self.normalize_weights:
            real_sum = (weights * real).sum(-1, keepdim=True)
            weights = weights / torch.where(real_sum > 0, real_sum, torch.ones_like(real_sum))
        token_index = torch.arange(num_tokens, device=x.device)[:, None].expand_as(chosen)[real]
        aux_loss = logits.new_zeros(())
        if self.load_balancing_coef > 0:
            counts = count_per_expert(chosen.flatten(), self.num_experts + self.num_null_experts)
            aux_loss = aux_loss + self.load_balancing_coef * load_balancing_loss(probs, counts, self.top_k)
        if self.z_loss_coef > 0:
            aux_loss = aux_loss + self.z_loss_coef * z_loss(all_logits)
        return group_by_expert(token_index, chosen[real], weights[real], logits, aux_loss)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, top_k={self.top_k}, num_null_experts={self.num_null_experts}"
