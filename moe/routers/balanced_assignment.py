"""BASE layers: balanced assignment of tokens to experts (Lewis et al. 2021)."""

from __future__ import annotations

import torch

from moe.routers.auction import balanced_assignment
from moe.routers.base import Router
from moe.routers.registry import register_router
from moe.routing import Routing, group_by_expert
from moe.validation import check_positive_float


@register_router("base")
class BASERouter(Router):
    """Training: a balanced assignment maximising total affinity; eval: each token's best expert.

    Paper: "BASE Layers: Simplifying Training of Large, Sparse Models", Lewis et al., ICML 2021.

    Affinities are the logits ``a = x W`` (float32). In training, tokens are assigned so that every
    expert gets exactly ``T / E`` tokens and ``sum_t a[t, expert(t)]`` is maximal, up to the auction's
    epsilon (``moe.routers.auction.balanced_assignment``; the assignment takes no gradient). When E
    does not divide T, ``T mod E`` experts get ``ceil(T / E)`` tokens and the rest ``floor(T / E)``,
    and which experts get the extra token is chosen to maximise the same total affinity (so T < E
    gives each token a different expert). In eval, each token goes to ``argmax_e a[t, e]`` with no
    balancing. Every token gets exactly one expert, with combine weight ``sigmoid(a[t, e])``,
    differentiable w.r.t. the gate. There is no auxiliary loss.

    Args:
        auction_epsilon: the auction's bid increment; None uses fairseq's
            ``max((max a - min a) / 50, 1e-4)``. The total affinity is within ``T * epsilon`` of the
            optimum (in practice within about 0.2%).

    Cost: one (T, H) x (H, E) GEMM; in training, auction rounds of O(T * E + T log T) each (tens to
    hundreds of rounds) with a host sync every 8 rounds. Under expert parallelism the balance is over
    each rank's local tokens (fairseq first shuffles tokens across workers; this router does not).
    """

    @classmethod
    def layer_kwargs(cls, name: str, kwargs: dict, top_k: int | None, vocab_size: int | None) -> dict:
        """A layer's ``top_k`` is accepted and not used: BASE assigns each token exactly one expert."""
        return super().layer_kwargs(name, kwargs, None, vocab_size)

    def __init__(self, hidden_size: int, num_experts: int, *, auction_epsilon: float | None = None):
        super().__init__(hidden_size, num_experts)
        if auction_epsilon is not None:
            check_positive_float("auction_epsilon", auction_epsilon)
        self.auction_epsilon = auction_epsilon

    def route(self, x, *, seq_len=None, token_ids=None) -> Routing:
        logits = self.compute_logits(x)
        num_tokens = logits.shape[0]
        if self.training:
            expert_index = balanced_assignment(logits.detach(), self.auction_epsilon)
        else:
            expert_index = logits.detach().argmax(-1)
        token_index = torch.arange(num_tokens, device=logits.device)
        weight = logits.gather(1, expert_index.unsqueeze(1)).squeeze(1).sigmoid()
        return group_by_expert(token_index, expert_index, weight, logits, logits.new_zeros(()))

    @property
    def experts_per_token(self) -> int:
        return 1

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, auction_epsilon={self.auction_epsilon}"
