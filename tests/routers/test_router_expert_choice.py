"""ExpertChoiceRouter against a per-expert loop reference, plus the Routing contract and gradients."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import moe
from moe.losses import z_loss
from moe.routers import ExpertChoiceRouter

from routing_checks import check_contract, gradcheck_layer, gradcheck_router


def reference_expert_choice(scores, capacity):
    """{(token, expert): weight}: each expert's ``min(C, T)`` best tokens by score, written as a loop."""
    num_tokens, num_experts = scores.shape
    pairs = {}
    for e in range(num_experts):
        ranked = sorted(range(num_tokens), key=lambda t: -float(scores[t, e]))
        for t in ranked[: min(capacity, num_tokens)]:
            pairs[(t, e)] = float(scores[t, e])
    return pairs


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize(
    "num_tokens,num_experts,capacity_factor", [(32, 4, 2.0), (30, 8, 1.0), (7, 3, 0.5), (3, 8, 2.0), (1, 4, 2.0)]
)
def test_every_expert_takes_exactly_its_top_c_tokens(training, num_tokens, num_experts, capacity_factor):
    router = ExpertChoiceRouter(16, num_experts, capacity_factor=capacity_factor).train(training)
    x = torch.randn(num_tokens, 16)
    routing = router(x)
    check_contract(routing, num_tokens, num_experts)
    capacity = math.ceil(num_tokens * capacity_factor / num_experts)
    assert routing.tokens_per_expert.tolist() == [min(capacity, num_tokens)] * num_experts
    assert routing.num_requested == num_experts * capacity
    scores = (x @ router.gate.weight.detach().T).softmax(-1)
    expected = reference_expert_choice(scores, capacity)
    got = dict(zip(zip(routing.token_index.tolist(), routing.expert_index.tolist()), routing.weight.tolist()))
    assert got.keys() == expected.keys()
    for pair, weight in expected.items():
        assert got[pair] == pytest.approx(weight, rel=1e-5)


def test_a_token_may_get_no_expert_or_several():
    router = ExpertChoiceRouter(4, 4, capacity_factor=1.0)  # C = ceil(8 / 4) = 2
    with torch.no_grad():
        router.gate.weight.copy_(torch.eye(4))  # logits = x
    x = torch.zeros(8, 4)
    x[:2] = torch.tensor([3.0, 3.0, -3.0, -3.0])  # win both slots of experts 0 and 1
    x[2:4, 2] = 1.0
    x[4:6, 3] = 1.0
    routing = router(x)
    assert torch.bincount(routing.token_index, minlength=8).tolist() == [2, 2, 1, 1, 1, 1, 0, 0]


def test_empty_input_returns_no_pairs():
    router = ExpertChoiceRouter(16, 4)
    routing = router(torch.randn(0, 16))
    check_contract(routing, 0, 4)
    assert routing.token_index.numel() == 0 and routing.num_requested == 0 and routing.dropped_fraction == 0.0


def test_aux_loss_is_the_weighted_z_loss_and_zero_by_default():
    x = torch.randn(20, 16)
    router = ExpertChoiceRouter(16, 4, z_loss_coef=1e-3)
    routing = router(x)
    torch.testing.assert_close(routing.aux_loss, 1e-3 * z_loss(x @ router.gate.weight.detach().T))
    assert ExpertChoiceRouter(16, 4)(x).aux_loss.item() == 0.0


def test_gradcheck_router_weights_in_float64():
    assert gradcheck_router(ExpertChoiceRouter(4, 3, capacity_factor=1.5))


def test_gradcheck_layer_in_float64_with_loop_experts():
    assert gradcheck_layer("expert_choice", shape=(2, 4, 6))


def test_layer_forward_backward_end_to_end():
    layer = moe.MoELayer(16, 32, 4, router="expert_choice", capacity_factor=2.0)
    x = torch.randn(2, 10, 16, requires_grad=True)
    y = layer(x)
    assert y.shape == x.shape
    y.square().sum().backward()
    assert layer.router.gate.weight.grad.abs().sum() > 0 and x.grad.abs().sum() > 0
    assert layer.last_stats.tokens_per_expert.tolist() == [10] * 4


@pytest.mark.parametrize("capacity_factor", [0, -1.0, float("inf")])
def test_bad_capacity_factor_raises_naming_it(capacity_factor):
    with pytest.raises(ValueError, match="capacity_factor"):
        ExpertChoiceRouter(16, 4, capacity_factor=capacity_factor)


@settings(max_examples=30, deadline=None)
@given(
    num_tokens=st.integers(0, 12),
    num_experts=st.integers(1, 6),
    hidden=st.integers(1, 5),
    capacity_factor=st.sampled_from([0.25, 1.0, 1.5, 3.0]),
)
def test_property_counts_and_contract(num_tokens, num_experts, hidden, capacity_factor):
    router = ExpertChoiceRouter(hidden, num_experts, capacity_factor=capacity_factor)
    routing = router(torch.randn(num_tokens, hidden))
    check_contract(routing, num_tokens, num_experts)
    taken = min(math.ceil(num_tokens * capacity_factor / num_experts), num_tokens)
    assert routing.tokens_per_expert.tolist() == [taken] * num_experts
    for e in range(num_experts):  # no token twice for one expert
        tokens = routing.token_index[routing.expert_index == e]
        assert tokens.unique().numel() == tokens.numel()


@pytest.mark.parametrize("z_loss_coef,error", [(-1e-3, ValueError), (float("nan"), ValueError), ("0.1", TypeError)])
def test_bad_z_loss_coef_raises_naming_it(z_loss_coef, error):
    with pytest.raises(error, match="z_loss_coef"):
        ExpertChoiceRouter(16, 4, z_loss_coef=z_loss_coef)


def test_capacity_above_the_token_count_drops_nothing():
    router = ExpertChoiceRouter(8, 4, capacity_factor=16.0)  # C = ceil(5 * 16 / 4) = 20 > T = 5
    routing = router(torch.randn(5, 8))
    assert routing.token_index.numel() == 4 * 5 and routing.dropped_fraction == 0.0
