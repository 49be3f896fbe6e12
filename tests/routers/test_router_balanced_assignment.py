"""BASERouter and its auction: balance, optimality against scipy, eval-mode greedy routing, gradients."""

import itertools

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize import linear_sum_assignment

import moe
from moe.routers import BASERouter
from moe.routers.auction import auction, balanced_assignment

from routing_checks import check_contract, gradcheck_layer, gradcheck_router


def best_balanced_total(affinity):
    """Optimum of the floor/ceil-balanced problem: try every set of experts that gets ceil(T/E),
    expand each expert into that many slots and solve each case with scipy's Hungarian method."""
    a = affinity.double().numpy()
    num_tokens, num_experts = a.shape
    base, extra = divmod(num_tokens, num_experts)
    best = -np.inf
    for bigger in itertools.combinations(range(num_experts), extra):
        slots = [e for e in range(num_experts) for _ in range(base + (e in bigger))]
        rows, cols = linear_sum_assignment(a[:, slots], maximize=True)
        best = max(best, a[rows, np.array(slots)[cols]].sum())
    return best


def fairseq_epsilon(affinity):
    return max((affinity.max() - affinity.min()).item() / 50, 1e-4)


@pytest.mark.parametrize("num_tokens,num_experts", [(24, 4), (40, 8), (23, 4), (13, 5), (3, 5), (1, 4), (9, 1)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_assignment_is_balanced_and_near_optimal(num_tokens, num_experts, seed):
    affinity = torch.randn(num_tokens, num_experts, generator=torch.Generator().manual_seed(seed))
    experts = balanced_assignment(affinity)
    counts = torch.bincount(experts, minlength=num_experts)
    base, extra = divmod(num_tokens, num_experts)
    assert sorted(counts.tolist()) == [base] * (num_experts - extra) + [base + 1] * extra
    total = affinity[torch.arange(num_tokens), experts].double().sum().item()
    best = best_balanced_total(affinity)
    assert total <= best + 1e-5
    assert total >= best - num_tokens * fairseq_epsilon(affinity)  # the auction's guarantee
    assert total >= best - 0.01 * abs(best) - 1e-6  # and in practice far closer than the guarantee


def test_finer_epsilon_reaches_the_optimum():
    affinity = torch.randn(30, 6, generator=torch.Generator().manual_seed(3))
    best = best_balanced_total(affinity)
    experts = balanced_assignment(affinity, epsilon=1e-4)
    total = affinity[torch.arange(30), experts].double().sum().item()
    assert total == pytest.approx(best, abs=30 * 1e-4)


def test_auction_with_arbitrary_capacities_matches_scipy():
    values = torch.randn(12, 3, generator=torch.Generator().manual_seed(4))
    capacity = torch.tensor([5, 1, 6])
    owner = auction(values, capacity, epsilon=1e-5)
    assert torch.bincount(owner, minlength=3).tolist() == [5, 1, 6]
    slots = [o for o in range(3) for _ in range(int(capacity[o]))]
    rows, cols = linear_sum_assignment(values.double().numpy()[:, slots], maximize=True)
    best = values.double().numpy()[:, slots][rows, cols].sum()
    assert values[torch.arange(12), owner].double().sum().item() == pytest.approx(best, abs=12 * 1e-5)


def test_auction_rejects_capacities_that_do_not_fit():
    with pytest.raises(ValueError, match="capacity"):
        auction(torch.randn(5, 2), torch.tensor([2, 2]), epsilon=0.1)


def test_training_routes_every_token_once_with_balanced_load_and_sigmoid_weights():
    router = BASERouter(16, 4)
    with torch.no_grad():
        router.gate.weight[0] += 1.0  # greedy routing would overload expert 0
    x = torch.randn(32, 16) + 0.5
    routing = router(x)
    check_contract(routing, 32, 4)
    assert routing.tokens_per_expert.tolist() == [8, 8, 8, 8]
    assert sorted(routing.token_index.tolist()) == list(range(32))
    logits = x @ router.gate.weight.detach().T
    torch.testing.assert_close(routing.weight, logits[routing.token_index, routing.expert_index].sigmoid())
    assert routing.aux_loss.item() == 0.0 and routing.num_requested == 32
    total = logits[routing.token_index, routing.expert_index].double().sum().item()
    assert total >= best_balanced_total(logits) - 32 * fairseq_epsilon(logits)


def test_eval_routes_greedily_without_balancing():
    router = BASERouter(16, 4).eval()
    with torch.no_grad():
        router.gate.weight[0] += 1.0
    x = torch.randn(32, 16) + 0.5
    routing = router(x)
    logits = x @ router.gate.weight.detach().T
    assert torch.equal(routing.expert_index[torch.argsort(routing.token_index)], logits.argmax(-1))
    assert routing.tokens_per_expert.max().item() > 8  # unbalanced: no assignment in eval


@pytest.mark.parametrize("training", [True, False])
def test_gradcheck_gate_weights_in_float64(training):
    assert gradcheck_router(BASERouter(4, 3).train(training))


def test_gradcheck_layer_in_float64_with_loop_experts():
    assert gradcheck_layer("base")


def test_layer_forward_backward_end_to_end():
    layer = moe.MoELayer(16, 32, 4, router="base")
    x = torch.randn(3, 10, 16, requires_grad=True)
    y = layer(x)
    y.square().sum().backward()
    assert y.shape == x.shape and layer.router.gate.weight.grad.abs().sum() > 0
    assert sorted(layer.last_stats.tokens_per_expert.tolist()) == [7, 7, 8, 8]


def test_bad_epsilon_raises_naming_it():
    with pytest.raises(ValueError, match="auction_epsilon"):
        BASERouter(8, 4, auction_epsilon=0.0)


@settings(max_examples=30, deadline=None)
@given(
    num_tokens=st.integers(0, 20),
    num_experts=st.integers(1, 6),
    hidden=st.integers(1, 5),
    training=st.booleans(),
)
def test_property_contract_and_balance(num_tokens, num_experts, hidden, training):
    router = BASERouter(hidden, num_experts).train(training)
    routing = router(torch.randn(num_tokens, hidden))
    check_contract(routing, num_tokens, num_experts)
    assert sorted(routing.token_index.tolist()) == list(range(num_tokens))
    if training:
        counts = routing.tokens_per_expert
        assert num_tokens == 0 or counts.max() - counts.min() <= 1
