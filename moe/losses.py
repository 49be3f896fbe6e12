"""Auxiliary routing losses as pure functions of tensors (no module state)."""

from __future__ import annotations

import torch


def load_balancing_loss(probs: torch.Tensor, tokens_per_expert: torch.Tensor, top_k: float) -> torch.Tensor:
    """Switch/top-k load-balancing loss ``E / (k T^2) * sum_e (sum_t p_te) * count_e``.

    ``top_k`` is k, or for dynamic-k routers the measured pairs per token.
    ``probs`` is (T, E); ``tokens_per_expert`` is (E,) and gets no gradient. Equals 1 at perfect
    balance and E at total collapse with k = 1. Returns 0 for T = 0.
    """
    num_tokens, num_experts = probs.shape
    if num_tokens == 0:
        return probs.sum() * 0.0
    counts = tokens_per_expert.detach().to(probs.dtype)
    return num_experts / (top_k * num_tokens**2) * (probs.sum(0) * counts).sum()


def z_loss(logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE router z-loss ``mean_t (logsumexp_e z_te)^2``; all-zero logits give ``(ln E)^2``."""
    if logits.shape[0] == 0:
        return logits.sum() * 0.0
    return torch.logsumexp(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1).square().mean()


def sequence_load_balancing_loss(
    scores: torch.Tensor, expert_mask: torch.Tensor, top_k: int, seq_len: int
) -> torch.Tensor:
    """DeepSeek-V3 sequence-wise balance loss: the load-balancing loss per sequence, averaged.

    ``scores`` is (B*L, E), rows of consecutive sequences of length ``seq_len``; they are normalised
    to sum to 1 per token (the paper's s'). ``expert_mask`` is (B*L, E), 1 where a token selected an
    expert (no gradient). Scores must be positive (softmax or sigmoid outputs).
    """
    num_tokens, num_experts = scores.shape
    if num_tokens == 0:
        return scores.sum() * 0.0
    if seq_len < 1 or num_tokens % seq_len != 0:
        raise ValueError(f"seq_len={seq_len} must be >= 1 and divide the number of tokens {num_tokens}")
    normalised = scores / scores.sum(-1, keepdim=True)
    per_seq_scores = normalised.view(-1, seq_len, num_experts).sum(1)
    per_seq_counts = expert_mask.detach().to(scores.dtype).view(-1, seq_len, num_experts).sum(1)
    per_seq = num_experts / (top_k * seq_len**2) * (per_seq_scores * per_seq_counts).sum(-1)
    return per_seq.mean()


def routing_entropy(probs: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of the entropy ``-Σ_e p_te log p_te`` of (T, E) routing probabilities (0 for T = 0).

    Top-p routing's "dynamic loss" (Huang et al. 2024): minimising it sharpens P, so a token cannot
    buy more experts by flattening its distribution.
    """
    if probs.shape[0] == 0:
        return probs.sum() * 0.0
    return -(probs * torch.log(probs.clamp_min(torch.finfo(probs.dtype).tiny))).sum(-1).mean()
