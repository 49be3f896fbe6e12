"""SinkhornRouter (S-BASE) against a numpy Sinkhorn reference; HashRouter's fixed table and its input checks."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import moe
from moe.routers import HashRouter, SinkhornRouter
from moe.routers.sinkhorn import sinkhorn

from routing_checks import check_contract, gradcheck_layer, gradcheck_router


def reference_sinkhorn(logits, iterations):
    """Matrix scaling of exp(z) in float64 numpy: rows to 1/T, columns to 1/E, a fixed number of sweeps."""
    cost = np.exp(logits.double().numpy())
    num_tokens, num_experts = cost.shape
    d1 = np.ones(num_experts)
    for _ in range(iterations):
        d0 = 1.0 / (num_tokens * (cost @ d1))
        d1 = 1.0 / (num_experts * (d0 @ cost))
    return d0[:, None] * cost * d1[None, :]


def test_sinkhorn_balances_rows_and_columns_like_the_reference():
    logits = 2.0 * torch.randn(64, 8, generator=torch.Generator().manual_seed(0))
    logits[:, 0] += 2.0  # a popular expert
    balanced = sinkhorn(logits, tolerance=1e-6, max_iterations=1000)
    reference = reference_sinkhorn(logits, 2000)
    np.testing.assert_allclose(balanced.double().numpy(), reference, rtol=1e-3, atol=1e-9)
    np.testing.assert_allclose(balanced.sum(1).numpy(), 1 / 64, rtol=1e-3)
    np.testing.assert_allclose(balanced.sum(0).numpy(), 1 / 8, rtol=1e-3)


def test_sinkhorn_stops_at_max_iterations():
    logits = torch.randn(10, 4)
    one = sinkhorn(logits, tolerance=1e-12, max_iterations=1)
    np.testing.assert_allclose(one.double().numpy(), reference_sinkhorn(logits, 1), rtol=1e-5)


@pytest.mark.parametrize("top_k", [1, 2])
def test_training_selects_topk_of_the_balanced_scores_with_gate_weights(top_k):
    router = SinkhornRouter(16, 8, top_k=top_k)
    with torch.no_grad():
        router.gate.weight[0] += 0.7  # greedy routing would overload expert 0
    x = torch.randn(64, 16) + 0.5
    routing = router(x)
    check_contract(routing, 64, 8)
    logits = x @ router.gate.weight.detach().T
    chosen = torch.from_numpy(reference_sinkhorn(logits, 500)).topk(top_k, dim=-1).indices
    expected = {(t, int(e)) for t in range(64) for e in chosen[t]}
    assert set(zip(routing.token_index.tolist(), routing.expert_index.tolist())) == expected
    gate = logits.sigmoid() if top_k == 1 else logits.softmax(-1)
    torch.testing.assert_close(routing.weight, gate[routing.token_index, routing.expert_index])
    greedy_max_load = torch.bincount(logits.topk(top_k, -1).indices.flatten(), minlength=8).max()
    assert routing.tokens_per_expert.max() < greedy_max_load
    assert routing.aux_loss.item() == 0.0


def test_eval_selects_topk_of_the_gate_scores():
    router = SinkhornRouter(16, 8, top_k=2).eval()
    x = torch.randn(30, 16)
    routing = router(x)
    logits = x @ router.gate.weight.detach().T
    expected = {(t, int(e)) for t in range(30) for e in logits.topk(2, -1).indices[t]}
    assert set(zip(routing.token_index.tolist(), routing.expert_index.tolist())) == expected


@pytest.mark.parametrize("top_k", [1, 2])
def test_gradcheck_sinkhorn_gate_weights_in_float64(top_k):
    assert gradcheck_router(SinkhornRouter(4, 3, top_k=top_k))


def test_gradcheck_sinkhorn_layer_in_float64_with_loop_experts():
    assert gradcheck_layer("sinkhorn", top_k=2)


@pytest.mark.parametrize(
    "kwargs,match",
    [({"top_k": 0}, "top_k"), ({"tolerance": 0}, "tolerance"), ({"max_iterations": 0}, "max_iterations")],
)
def test_sinkhorn_bad_arguments_raise_naming_the_value(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SinkhornRouter(8, 4, **kwargs)


def test_hash_table_is_a_fixed_balanced_function_of_the_seed():
    router = HashRouter(8, 4, vocab_size=103, seed=7)
    counts = torch.bincount(router.expert_of_token, minlength=4)
    assert counts.max() - counts.min() <= 1 and counts.sum() == 103
    assert torch.equal(router.expert_of_token, HashRouter(8, 4, vocab_size=103, seed=7).expert_of_token)
    assert not torch.equal(router.expert_of_token, HashRouter(8, 4, vocab_size=103, seed=8).expert_of_token)
    assert "expert_of_token" in router.state_dict() and list(router.parameters()) == []


def test_hash_routes_each_token_by_its_id_with_weight_one():
    router = HashRouter(8, 4, vocab_size=50)
    ids = torch.tensor([3, 49, 3, 0, 17, 17, 8])
    routing = router(torch.randn(7, 8), token_ids=ids)
    check_contract(routing, 7, 4)
    order = torch.argsort(routing.token_index)
    assert routing.token_index[order].tolist() == list(range(7))
    assert torch.equal(routing.expert_index[order], router.expert_of_token[ids])
    assert torch.equal(routing.weight, torch.ones(7)) and torch.equal(routing.logits, torch.zeros(7, 4))
    assert routing.aux_loss.item() == 0.0


@pytest.mark.parametrize(
    "token_ids,match",
    [
        (None, "needs token_ids"),
        (torch.tensor([0, 1, 50]), r"\[0, vocab_size=50\).*50"),
        (torch.tensor([0, -1, 2]), r"\[0, vocab_size=50\).*-1"),
        (torch.tensor([0, 1]), "shape"),
        (torch.tensor([0.0, 1.0, 2.0]), "integer"),
    ],
)
def test_hash_bad_token_ids_raise_naming_the_requirement(token_ids, match):
    with pytest.raises(ValueError, match=match):
        HashRouter(8, 4, vocab_size=50)(torch.randn(3, 8), token_ids=token_ids)


def test_hash_layer_forward_backward_end_to_end():
    layer = moe.MoELayer(8, 16, 4, router="hash", vocab_size=20)
    ids = torch.randint(20, (2, 5))
    x = torch.randn(2, 5, 8, requires_grad=True)
    y = layer(x, token_ids=ids)
    y.sum().backward()
    assert y.shape == x.shape and x.grad.abs().sum() > 0
    expected = torch.bincount(layer.router.expert_of_token[ids.flatten()], minlength=4)
    assert torch.equal(layer.last_stats.tokens_per_expert, expected)
    single = layer(x[0, :1], token_ids=ids[0, :1])  # expert of one token, weight 1
    e = int(layer.router.expert_of_token[ids[0, 0]])
    torch.testing.assert_close(single, layer.experts(x[0, :1], torch.eye(4, dtype=torch.long)[e]))


@settings(max_examples=30, deadline=None)
@given(
    num_tokens=st.integers(0, 12),
    num_experts=st.integers(1, 6),
    top_k=st.integers(1, 6),
    hidden=st.integers(1, 5),
    training=st.booleans(),
)
def test_property_contract_sinkhorn_and_hash(num_tokens, num_experts, top_k, hidden, training):
    top_k = min(top_k, num_experts)
    x = torch.randn(num_tokens, hidden)
    routing = SinkhornRouter(hidden, num_experts, top_k=top_k).train(training)(x)
    check_contract(routing, num_tokens, num_experts)
    assert torch.equal(torch.bincount(routing.token_index, minlength=num_tokens), torch.full((num_tokens,), top_k))
    ids = torch.randint(10, (num_tokens,))
    routing = HashRouter(hidden, num_experts, vocab_size=10).train(training)(x, token_ids=ids)
    check_contract(routing, num_tokens, num_experts)
    assert routing.token_index.numel() == num_tokens
