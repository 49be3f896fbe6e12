"""ReLURouter (ReMoE): active pairs, the L1 regulariser, the lambda controller and its checkpointing."""

from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hypothesis import given, settings
from hypothesis import strategies as st

import moe
from moe.routers import ReLURouter

from routing_checks import check_contract, gradcheck_layer, gradcheck_router


def reference_l1(relu, top_k):
    """``E / (k T^2) * sum_e (sum_t R_te) * count_e`` as explicit loops."""
    num_tokens, num_experts = relu.shape
    total = 0.0
    for e in range(num_experts):
        count = sum(1 for t in range(num_tokens) if relu[t, e] > 0)
        total += float(relu[:, e].sum()) * count
    return num_experts / (top_k * num_tokens**2) * total


def test_pairs_are_exactly_the_positive_logits_with_relu_weights():
    router = ReLURouter(16, 6, top_k=2)
    x = torch.randn(40, 16)
    routing = router(x)
    check_contract(routing, 40, 6)
    logits = x @ router.gate.weight.detach().T
    expected = {(t, e) for t in range(40) for e in range(6) if logits[t, e] > 0}
    assert set(zip(routing.token_index.tolist(), routing.expert_index.tolist())) == expected
    torch.testing.assert_close(routing.weight, logits[routing.token_index, routing.expert_index])
    assert routing.num_requested == len(expected) and routing.dropped_fraction == 0.0


def test_aux_loss_is_lambda_times_the_load_balanced_l1():
    router = ReLURouter(16, 6, top_k=2, lambda0=0.3)
    x = torch.randn(25, 16)
    routing = router(x)
    relu = (x @ router.gate.weight.detach().T).clamp_min(0)
    assert routing.aux_loss.item() == pytest.approx(0.3 * reference_l1(relu, 2), rel=1e-5)
    routing.aux_loss.backward()
    assert router.gate.weight.grad.abs().sum() > 0  # the regulariser trains the router


def fill_step(router, sparsity_pairs):
    """Set a router's step counters to (active pairs, total pairs) as a training forward would."""
    router.step_active_pairs.fill_(sparsity_pairs[0])
    router.step_total_pairs.fill_(sparsity_pairs[1])


def test_controller_raises_lambda_below_target_and_lowers_it_above():
    router = ReLURouter(8, 4, top_k=1, lambda0=1e-2, multiplier=1.5)  # target sparsity 0.75
    fill_step(router, (60, 100))  # sparsity 0.4 < 0.75
    moe.routers.ReLURouter.update_group([router])
    assert router.l1_lambda.item() == pytest.approx(1.5e-2)
    assert router.last_sparsity.item() == pytest.approx(0.4)
    assert router.step_active_pairs.item() == 0 and router.step_total_pairs.item() == 0
    fill_step(router, (10, 100))  # sparsity 0.9 >= 0.75
    router.step_update()
    assert router.l1_lambda.item() == pytest.approx(1e-2)


def test_one_decision_from_the_layer_average_sparsity():
    first, second = ReLURouter(8, 4, top_k=1, lambda0=1.0), ReLURouter(8, 4, top_k=1, lambda0=2.0)
    fill_step(first, (10, 100))  # 0.9: alone it would lower lambda
    fill_step(second, (70, 100))  # 0.3; average 0.6 < 0.75: both rise
    ReLURouter.update_group([first, second])
    assert first.l1_lambda.item() == pytest.approx(1.2) and second.l1_lambda.item() == pytest.approx(2.4)
    assert first.last_sparsity.item() == pytest.approx(0.6) == second.last_sparsity.item()


def test_no_training_forward_leaves_lambda_unchanged():
    router = ReLURouter(8, 4, top_k=1, lambda0=1e-3).eval()
    router(torch.randn(10, 8))  # eval forwards do not count
    assert router.step_total_pairs.item() == 0
    router.step_update()
    assert router.l1_lambda.item() == pytest.approx(1e-3) and torch.isnan(router.last_sparsity)


def test_micro_batches_of_a_step_are_pooled():
    router = ReLURouter(8, 4, top_k=2)
    batches = [torch.randn(7, 8), torch.randn(13, 8)]
    nnz = sum(int((b @ router.gate.weight.detach().T > 0).sum()) for b in batches)
    for batch in batches:
        router(batch)
    assert router.step_active_pairs.item() == nnz and router.step_total_pairs.item() == 20 * 4
    router.step_update()
    assert router.last_sparsity.item() == pytest.approx(1 - nnz / 80)


def test_lambda_is_checkpointed_in_the_state_dict():
    router = ReLURouter(8, 4, top_k=1)
    fill_step(router, (50, 100))
    router.step_update()
    state = router.state_dict()
    assert "l1_lambda" in state and "step_active_pairs" not in state
    restored = ReLURouter(8, 4, top_k=1)
    restored.load_state_dict(state)
    assert restored.l1_lambda.item() == pytest.approx(1.2e-8) and restored.l1_lambda.dtype == torch.float32


def _distributed_update_worker(rank: int, rendezvous: str) -> None:
    dist.init_process_group(
        "gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=2, timeout=timedelta(seconds=60)
    )
    try:
        first, second = ReLURouter(8, 4, top_k=1, lambda0=1.0), ReLURouter(8, 4, top_k=1, lambda0=1.0)
        # layer 1: ranks at sparsity 0.95 and 0.45 -> pooled 0.7; layer 2: 0.65 and 0.35 -> pooled 0.5.
        # Rank 0 alone would see 0.8 >= 0.75 and lower lambda; the pooled 0.6 < 0.75 raises it on both.
        fill_step(first, ((5, 100), (55, 100))[rank])
        fill_step(second, ((35, 100), (65, 100))[rank])
        ReLURouter.update_group([first, second])
        assert first.last_sparsity.item() == pytest.approx(0.6) == second.last_sparsity.item()
        assert first.l1_lambda.item() == pytest.approx(1.2) == second.l1_lambda.item()
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
@pytest.mark.slow
def test_update_group_pools_counts_over_ranks(tmp_path):
    mp.spawn(_distributed_update_worker, args=(str(tmp_path / "rendezvous"),), nprocs=2, join=True)


@pytest.mark.slow
def test_controller_drives_a_toy_model_to_the_target_sparsity():
    num_experts, top_k, steps = 8, 2, 260
    layer = moe.MoELayer(16, 16, num_experts, router="relu", top_k=top_k, activation="gelu", experts="loop")
    optimizer = torch.optim.Adam(layer.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(0)
    sparsity = []
    for _ in range(steps):
        x = torch.randn(64, 16, generator=generator) + 1.0  # non-centred, like real hidden states
        loss = (layer(x) - x.roll(1, dims=1)).square().mean() + moe.aux_loss(layer)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        moe.update_routers(layer)
        sparsity.append(layer.router.last_sparsity.item())
    target = 1 - top_k / num_experts
    assert sparsity[0] < target - 0.15  # starts dense (about half the pairs active), far from the target
    assert abs(sum(sparsity[-50:]) / 50 - target) < 0.04
    assert layer.router.l1_lambda.item() > 1e-4  # lambda grew from 1e-8 to take effect


def test_gradcheck_router_weights_and_aux_loss_in_float64():
    assert gradcheck_router(ReLURouter(4, 3, top_k=1, lambda0=0.5), with_aux_loss=True)


def test_gradcheck_layer_in_float64_with_loop_experts():
    assert gradcheck_layer("relu", top_k=1)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"top_k": 0}, "top_k"),
        ({"top_k": 5}, "top_k"),
        ({"top_k": 1, "lambda0": 0}, "lambda0"),
        ({"top_k": 1, "multiplier": 1.0}, "multiplier"),
    ],
)
def test_bad_arguments_raise_naming_the_value(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ReLURouter(8, 4, **kwargs)


@settings(max_examples=30, deadline=None)
@given(num_tokens=st.integers(0, 10), num_experts=st.integers(1, 6), hidden=st.integers(1, 5))
def test_property_contract_including_empty_and_tiny_inputs(num_tokens, num_experts, hidden):
    router = ReLURouter(hidden, num_experts, top_k=1)
    x = torch.randn(num_tokens, hidden)
    routing = router(x)
    check_contract(routing, num_tokens, num_experts)
    assert routing.token_index.numel() == int((x @ router.gate.weight.detach().T > 0).sum())
    assert torch.isfinite(routing.aux_loss)
