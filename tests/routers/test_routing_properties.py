"""Property-based tests (hypothesis) of the Routing contract and the layer output over T, E, k, H."""

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import moe
from moe.routers import TopKRouter

from routing_checks import check_contract

SETTINGS = settings(max_examples=40, deadline=None, derandomize=True)


@st.composite
def shapes(draw):
    num_experts = draw(st.integers(1, 6))
    return {
        "num_tokens": draw(st.sampled_from([0, 1, 2, 3, 5, 9, 16])),
        "num_experts": num_experts,
        "top_k": draw(st.integers(1, num_experts)),
        "hidden": draw(st.integers(1, 9)),
        "seed": draw(st.integers(0, 2**16)),
    }


@SETTINGS
@given(
    case=shapes(),
    score_function=st.sampled_from(["softmax", "sigmoid"]),
    capacity_factor=st.sampled_from([None, 0.5, 1.0, 2.0]),
    drop_policy=st.sampled_from(["probability", "position"]),
    training=st.booleans(),
)
def test_topk_routing_contract(case, score_function, capacity_factor, drop_policy, training):
    torch.manual_seed(case["seed"])
    num_tokens, num_experts, top_k = case["num_tokens"], case["num_experts"], case["top_k"]
    router = TopKRouter(
        case["hidden"],
        num_experts,
        top_k,
        score_function=score_function,
        capacity_factor=capacity_factor,
        drop_policy=drop_policy,
        jitter_eps=0.01,
        bias_update_rate=1e-3,
    ).train(training)
    routing = router(torch.randn(num_tokens, case["hidden"]))
    check_contract(routing, num_tokens, num_experts)
    if capacity_factor is None:
        assert routing.token_index.numel() == num_tokens * top_k
        assert torch.equal(torch.bincount(routing.token_index, minlength=num_tokens), torch.full((num_tokens,), top_k))
    else:
        capacity = math.ceil(top_k * num_tokens / num_experts * capacity_factor)
        assert int(routing.tokens_per_expert.max()) <= capacity
    assert 0.0 <= routing.dropped_fraction <= 1.0


def reference_output(layer, x):
    """Per-token loop over an independent top-k of the softmax, renormalised when k > 1."""
    probs = (x @ layer.router.gate.weight.T).softmax(-1)
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        top = torch.topk(probs[t], layer.router.top_k)
        weights = top.values / top.values.sum() if layer.router.normalize_weights else top.values
        for w, e in zip(weights, top.indices.tolist()):
            out[t] += w * (torch.relu(x[t] @ layer.experts.w_in[e]) @ layer.experts.w_out[e])
    return out


@SETTINGS
@given(case=shapes(), experts=st.sampled_from(["grouped", "loop"]))
def test_layer_equals_reference(case, experts):
    torch.manual_seed(case["seed"])
    hidden = case["hidden"]
    layer = moe.MoELayer(hidden, 5, case["num_experts"], top_k=case["top_k"], activation="relu", experts=experts)
    x = torch.randn(case["num_tokens"], hidden)
    with torch.no_grad():
        y = layer(x)
        assert y.shape == x.shape
        torch.testing.assert_close(y, reference_output(layer, x), atol=1e-5, rtol=1e-5)
    assert int(layer.last_stats.tokens_per_expert.sum()) == case["num_tokens"] * case["top_k"]
