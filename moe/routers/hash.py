"""Hash routing: a fixed random map from token id to expert (Roller et al. 2021)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from moe.routers.base import Router
from moe.routers.registry import register_router
from moe.routing import Routing, group_by_expert
from moe.validation import check_positive_int


@register_router("hash")
class HashRouter(Router):
    """Each token goes to the expert ``table[token_id]``, a fixed random table; weight 1.

    Paper: "Hash Layers For Large Sparse Models", Roller et al., NeurIPS 2021 (random hash variant).

    The table (buffer ``expert_of_token``, saved in the state dict) is a random permutation of the
    vocabulary taken modulo E, drawn from ``seed``: every expert owns ``vocab_size / E`` ids (within
    one). There are no trainable routing parameters (the base class's gate is removed) and no
    auxiliary loss; the combine weight is 1 (no gradient). ``logits`` is an all-zero float32 (T, E)
    tensor, as there are no scores.

    ``forward(x, token_ids=...)`` requires the (T,) integer token ids of the rows of x, each in
    ``[0, vocab_size)`` (``MoELayer`` passes its ``token_ids`` argument through).

    Cost: a (T,) table lookup and a sort of T pairs. On CUDA the id range check is a device-side
    assert (no host sync).
    """

    @classmethod
    def layer_kwargs(cls, name: str, kwargs: dict, top_k: int | None, vocab_size: int | None) -> dict:
        """A layer's ``top_k`` is accepted and not used (one expert per token); ``vocab_size`` is required."""
        kwargs = super().layer_kwargs(name, kwargs, None, vocab_size)
        if "vocab_size" not in kwargs:
            raise ValueError(
                f"router {name!r} needs vocab_size=<number of token ids>: it routes each token by its id "
                "(MoELayer(..., vocab_size=V), then layer(x, token_ids=ids))"
            )
        return kwargs

    def __init__(self, hidden_size: int, num_experts: int, vocab_size: int, seed: int = 0):
        super().__init__(hidden_size, num_experts)
        self.vocab_size = check_positive_int("vocab_size", vocab_size)
        self.seed = check_positive_int("seed", seed, minimum=0)
        self.gate = None
        generator = torch.Generator().manual_seed(seed)
        table = torch.randperm(vocab_size, generator=generator) % num_experts
        self.register_buffer("expert_of_token", table)

    def route(self, x, *, seq_len=None, token_ids=None) -> Routing:
        num_tokens = x.shape[0]
        if token_ids is None:
            raise ValueError("HashRouter needs token_ids: the (T,) integer token id of each input row")
        if token_ids.shape != (num_tokens,) or token_ids.dtype.is_floating_point or token_ids.dtype == torch.bool:
            raise ValueError(
                f"token_ids must be an integer tensor of shape (T={num_tokens},), "
                f"got {token_ids.dtype} of shape {tuple(token_ids.shape)}"
            )
        token_ids = token_ids.to(device=self.expert_of_token.device, dtype=torch.long)
        in_range = ((token_ids >= 0) & (token_ids < self.vocab_size)).all()
        message = f"token_ids must be in [0, vocab_size={self.vocab_size}) in layer '{self.layer_name}'"
        if token_ids.is_cuda:
            torch._assert_async(in_range, message)
        elif not bool(in_range):
            bad = token_ids[(token_ids < 0) | (token_ids >= self.vocab_size)][0]
            raise ValueError(f"{message}; got {int(bad)}")
        expert_index = self.expert_of_token[token_ids]
        token_index = torch.arange(num_tokens, device=expert_index.device)
        logits = torch.zeros(num_tokens, self.num_experts, dtype=torch.float32, device=x.device)
        weight = torch.ones(num_tokens, dtype=torch.float32, device=x.device)
        return group_by_expert(token_index, expert_index, weight, logits, logits.new_zeros(()))

    @property
    def experts_per_token(self) -> int:
        return 1

    def keep_experts(self, keep: Sequence[int]) -> None:
        """Refused: the fixed token -> expert table would leave the tokens of removed experts without one."""
        raise TypeError(
            f"layer '{self.layer_name}' uses hash routing: its fixed token -> expert table would leave the "
            "tokens of removed experts without an expert"
        )

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, vocab_size={self.vocab_size}, seed={self.seed}"
