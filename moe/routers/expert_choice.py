"""Expert-choice routing: each expert picks its top-C tokens (Zhou et al. 2022)."""

from __future__ import annotations

import math

import torch

from moe.losses import z_loss
from moe.routers.base import Router
from moe.routers.registry import register_router
from moe.routing import Routing, from_expert_major
from moe.validation import check_nonnegative_float, check_positive_float


@register_router("expert_choice")
class ExpertChoiceRouter(Router):
    """Each expert takes exactly its ``C`` highest-scoring tokens; a token may get 0..E experts.

    Paper: "Mixture-of-Experts with Expert Choice Routing", Zhou et al., NeurIPS 2022.

    Scores are ``S = softmax(x W)`` over experts (float32). Each expert e takes the tokens with the
    ``C = ceil(T * capacity_factor / E)`` largest ``S[:, e]`` (all T tokens when T < C) and the
    combine weight is ``S[t, e]``, differentiable w.r.t. the gate. Every expert processes exactly
    ``min(C, T)`` tokens, so the load is perfectly balanced by construction and needs no balancing
    loss; ``num_requested`` is ``E * min(C, T)``, so nothing counts as dropped.

    Not causal: the tokens of one batch compete for each expert's slots, so whether token t is
    routed depends on the tokens after it. A decoder language model trained with it sees the future
    through routing and behaves differently at generation time (one token at a time).

    Args:
        capacity_factor: c in ``C = ceil(T * c / E)``; the average number of experts per token
            (paper default 2).
        z_loss_coef: weight of the ST-MoE router z-loss (default 0: the paper uses none).

    Cost: one (T, H) x (H, E) GEMM, a softmax over (T, E) and a top-C per expert (E x T); no host sync.
    """

    @classmethod
    def layer_kwargs(cls, name: str, kwargs: dict, top_k: int | None, vocab_size: int | None) -> dict:
        """A layer's ``top_k`` becomes ``capacity_factor`` (unless given): on average each token then gets
        ``top_k`` experts, the compute of top-k routing."""
        if top_k is not None:
            kwargs = {"capacity_factor": float(top_k), **kwargs}
        return super().layer_kwargs(name, kwargs, None, vocab_size)

    def __init__(self, hidden_size: int, num_experts: int, capacity_factor: float = 2.0, z_loss_coef: float = 0.0):
        super().__init__(hidden_size, num_experts)
        self.capacity_factor = check_positive_float("capacity_factor", capacity_factor)
        self.z_loss_coef = check_nonnegative_float("z_loss_coef", z_loss_coef)

    def capacity(self, num_tokens: int) -> int:
        """Tokens per expert ``C = ceil(T * capacity_factor / E)`` before the ``min(C, T)`` cap."""
        return math.ceil(num_tokens * self.capacity_factor / self.num_experts)

    def route(self, x, *, seq_len=None, token_ids=None) -> Routing:
        logits = self.compute_logits(x)
        num_tokens = logits.shape[0]
        scores = logits.softmax(-1)
        capacity = self.capacity(num_tokens)
        taken = min(capacity, num_tokens)
        chosen = scores.detach().t().topk(taken, dim=1).indices  # (E, taken): token ids per expert
        weight = scores.t().gather(1, chosen)
        aux_loss = self.z_loss_coef * z_loss(logits) if self.z_loss_coef > 0 else logits.new_zeros(())
        tokens_per_expert = torch.full((self.num_experts,), taken, dtype=torch.long, device=logits.device)
        return from_expert_major(
            chosen.flatten(),
            weight.flatten(),
            tokens_per_expert,
            logits,
            aux_loss,
            num_requested=self.num_experts * taken,  # an expert cannot want more than all T tokens
        )

    def decoding_refusal(self) -> str | None:
        """Always a reason: expert choice is not causal."""
        return (
            "expert choice is not causal: each expert's capacity is shared among all the tokens routed together, "
            "so a token's experts depend on the tokens after it"
        )

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, capacity_factor={self.capacity_factor}"
