"""Top-p (dynamic-k) token-choice routing (Huang et al., ACL 2024, "Harder Task Needs More Experts")."""

from __future__ import annotations

import torch

from moe.losses import load_balancing_loss, routing_entropy, z_loss
from moe.routers.base import Router
from moe.routers.registry import register_router
from moe.routing import Routing, count_per_expert, group_by_expert
from moe.validation import check_nonnegative_float, check_positive_int


@register_router("top_p")
class TopPRouter(Router):
    """Each token takes experts in descending probability until their cumulative probability exceeds ``top_p``.

    With P = softmax(z) sorted in descending order, a token keeps expert i when the cumulative
    probability of the experts before it is at most p (so the first expert always, and the one that
    crosses p too), at most ``max_k`` of them; its weights are the chosen probabilities, not
    renormalised (the authors' code). Losses: the Switch load-balancing loss with the counts of the
    chosen pairs, normalised by the measured pairs per token (1 at perfect balance), the ST-MoE
    z-loss, and the paper's dynamic loss, the mean entropy ``-Σ_e P_e log P_e``, which keeps the
    router from flattening P to buy more experts.

    Args:
        top_p: threshold p in (0, 1] (the paper: 0.4); p = 1 routes every token to every expert.
        max_k: optional cap on the experts per token, in [1, num_experts].
        load_balancing_coef, z_loss_coef, entropy_coef: loss weights (1e-2, 1e-3, 1e-4).

    Cost: the gate GEMM, a sort of the T x E probabilities and O(T * E) work. The number of pairs is
    data dependent: one host sync per forward on CUDA (the boolean selection).
    """

    @classmethod
    def layer_kwargs(cls, name: str, kwargs: dict, top_k: int | None, vocab_size: int | None) -> dict:
        """A layer's ``top_k`` is accepted and not used: ``top_p`` decides each token's count (``max_k`` caps it)."""
        return super().layer_kwargs(name, kwargs, None, vocab_size)

    def __init__(
        self,
        hidden_size: int,
        num_experts: int,
        *,
        top_p: float = 0.4,
        max_k: int | None = None,
        load_balancing_coef: float = 1e-2,
        z_loss_coef: float = 1e-3,
        entropy_coef: float = 1e-4,
    ):
        super().__init__(hidden_size, num_experts)
        if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be a number in (0, 1], got {top_p!r}")
        if max_k is not None:
            check_positive_int("max_k", max_k)
            if max_k > num_experts:
                raise ValueError(f"max_k must be in [1, num_experts={num_experts}], got {max_k}")
        for name, coef in [
            ("load_balancing_coef", load_balancing_coef),
            ("z_loss_coef", z_loss_coef),
            ("entropy_coef", entropy_coef),
        ]:
            check_nonnegative_float(name, coef)
        self.top_p = float(top_p)
        self.max_k = max_k
        self.load_balancing_coef = load_balancing_coef
        self.z_loss_coef = z_loss_coef
        self.entropy_coef = entropy_coef

    def select(self, probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(sorted expert ids (T, E), keep mask (T, E)) of the top-p selection of ``probs`` (no gradient)."""
        sorted_probs, order = probs.detach().sort(dim=-1, descending=True, stable=True)
        before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
        keep = before <= self.top_p
        keep[:, 0] = True
        if self.top_p >= 1.0:
            keep[:] = True  # every expert, whatever rounding did to the cumulative sums
        if self.max_k is not None:
            keep[:, self.max_k :] = False
        return order, keep

    def route(self, x, *, seq_len=None, token_ids=None) -> Routing:
        """Top-p pairs grouped by expert, weighted by their probabilities, with the weighted losses."""
        logits = self.compute_logits(x)
        probs = logits.softmax(-1)
        num_tokens = logits.shape[0]
        order, keep = self.select(probs)
        token_index = torch.arange(num_tokens, device=x.device)[:, None].expand_as(order)[keep]
        expert_index = order[keep]
        weight = probs.gather(1, order)[keep]
        counts = count_per_expert(expert_index, self.num_experts)
        aux_loss = logits.new_zeros(())
        if self.load_balancing_coef > 0 and num_tokens > 0:
            per_token = expert_index.numel() / num_tokens
            aux_loss = aux_loss + self.load_balancing_coef * load_balancing_loss(probs, counts, per_token)
        if self.z_loss_coef > 0:
            aux_loss = aux_loss + self.z_loss_coef * z_loss(logits)
        if self.entropy_coef > 0:
            aux_loss = aux_loss + self.entropy_coef * routing_entropy(probs)
        return group_by_expert(token_index, expert_index, weight, logits, aux_loss)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, top_p={self.top_p}, max_k={self.max_k}"
