"""The Routing contract as assertions, shared by the router tests."""

import torch

import moe


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


def gradcheck_router(router, num_tokens: int = 6, with_aux_loss: bool = False) -> bool:
    """float64 gradcheck of a router's combine weights (and aux loss) w.r.t. its input and gate weights."""
    router = router.double()
    x = torch.randn(num_tokens, router.hidden_size, dtype=torch.float64, requires_grad=True)
    gate = router.gate.weight.detach().clone().requires_grad_()

    def outputs(inp, w):
        routing = torch.func.functional_call(router, {"gate.weight": w}, (inp,))
        return (routing.weight, routing.aux_loss) if with_aux_loss else routing.weight

    return torch.autograd.gradcheck(outputs, (x, gate))


def gradcheck_layer(router: str, shape=(2, 3, 4), **router_kwargs) -> bool:
    """float64 gradcheck of a whole MoELayer (loop experts: grouped_mm has no float64) with ``router``."""
    hidden = shape[-1]
    layer = moe.MoELayer(hidden, hidden + 2, 3, router=router, experts="loop", activation="gelu", **router_kwargs)
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    return torch.autograd.gradcheck(layer.double(), (x,))
