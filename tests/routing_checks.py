"""The Routing contract as assertions, shared by the router tests."""

import torch


def check_contract(routing, num_tokens, num_experts):
    """Assert every field of the Routing contract (docs/architecture.md) for T tokens and E experts."""
    n = routing.token_index.shape
    assert routing.token_index.dtype == routing.expert_index.dtype == routing.tokens_per_expert.dtype == torch.int64
    assert routing.expert_index.shape == n and routing.weight.shape == n and len(n) == 1
    assert routing.tokens_per_expert.shape == (num_experts,)
    assert routing.logits.shape == (num_tokens, num_experts) and routing.logits.dtype == torch.float32
    assert routing.weight.dtype == torch.float32 and bool(torch.isfinite(routing.weight).all())
    assert routing.aux_loss.shape == () and bool(torch.isfinite(routing.aux_loss))
    assert bool((routing.expert_index[1:] >= routing.expert_index[:-1]).all())
    assert torch.equal(routing.tokens_per_expert, torch.bincount(routing.expert_index, minlength=num_experts))
    if n[0]:
        assert 0 <= routing.token_index.min() and routing.token_index.max() < num_tokens
        assert 0 <= routing.expert_index.min() and routing.expert_index.max() < num_experts
    pairs = set(zip(routing.token_index.tolist(), routing.expert_index.tolist()))
    assert len(pairs) == n[0]  # no (token, expert) pair twice
