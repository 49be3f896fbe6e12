"""Routing statistics of one MoE layer, accumulated over forward passes from its ``Routing``s."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from moe.routing import Routing


def entropy_bits(p: torch.Tensor) -> torch.Tensor:
    """Entropy in bits of each distribution along the last dimension (0 log 0 = 0)."""
    p = p.double()
    return -(p * torch.log2(p.clamp_min(1e-300))).where(p > 0, torch.zeros((), dtype=p.dtype)).sum(-1)


@dataclass
class LayerRoutingStats:
    """Sums over every token a layer routed: (expert, token id) pairs, per-token router entropy, expert loads
    and expert co-selection counts. The pairs are kept as a list of ids (memory grows with the tokens
    inspected, not with experts x vocabulary)."""

    num_experts: int
    vocab_size: int
    tokens: int = 0
    entropy_sum: float = 0.0
    pair_ids: list[torch.Tensor] = field(init=False)
    token_counts: torch.Tensor = field(init=False)
    coselection: torch.Tensor = field(init=False)

    def __post_init__(self):
        self.pair_ids = []
        self.token_counts = torch.zeros(self.vocab_size, dtype=torch.int64)
        self.coselection = torch.zeros(self.num_experts, self.num_experts, dtype=torch.int64)

    def add(self, routing: Routing, token_ids: torch.Tensor) -> None:
        """Count one forward: ``token_ids`` (T,) are the ids of the routed tokens, in routing order."""
        token_ids = token_ids.reshape(-1).cpu()
        token_index, expert_index = routing.token_index.cpu(), routing.expert_index.cpu()
        probabilities = torch.softmax(routing.logits.detach().double().cpu(), dim=-1)
        self.tokens += routing.num_tokens
        self.entropy_sum += float(entropy_bits(probabilities).sum())
        self.token_counts += torch.bincount(token_ids, minlength=self.vocab_size)
        self.pair_ids.append(expert_index * self.vocab_size + token_ids[token_index])
        chosen = torch.zeros(routing.num_tokens, self.num_experts, dtype=torch.int64)
        chosen[token_index, expert_index] = 1
        self.coselection += chosen.T @ chosen

    @property
    def load(self) -> torch.Tensor:
        """(E,) share of the routed (token, expert) pairs each expert received."""
        counts = self.coselection.diagonal().double()
        return counts / counts.sum().clamp_min(1)

    @property
    def mean_token_entropy(self) -> float:
        """Mean over tokens of the entropy (bits) of the router's probabilities, softmax of its logits."""
        return self.entropy_sum / max(self.tokens, 1)

    @property
    def load_entropy(self) -> float:
        """Entropy (bits) of the load distribution; ``log2(E)`` when perfectly balanced."""
        return float(entropy_bits(self.load))

    @property
    def max_entropy(self) -> float:
        return math.log2(self.num_experts)

    def coselection_share(self) -> torch.Tensor:
        """(E, E) share of all routed tokens that went to both experts i and j (diagonal: to expert i)."""
        return self.coselection.double() / max(self.tokens, 1)

    def top_tokens(self, count: int) -> list[list[tuple[int, int, float]]]:
        """Per expert, its ``count`` most frequent token ids as (id, pairs, share of that token's occurrences
        routed to this expert), most frequent first (ties: smaller id first)."""
        pairs, counts = torch.unique(torch.cat(self.pair_ids), return_counts=True)
        experts, tokens = pairs // self.vocab_size, pairs % self.vocab_size
        result = []
        for e in range(self.num_experts):
            mine_tokens, mine_counts = tokens[experts == e], counts[experts == e]
            # unique() sorts the ids, so a stable sort by count keeps smaller token ids first among ties.
            order = torch.sort(mine_counts, descending=True, stable=True).indices[:count].tolist()
            chosen = [(int(mine_tokens[i]), int(mine_counts[i])) for i in order]
            result.append([(t, n, n / int(self.token_counts[t])) for t, n in chosen])
        return result
