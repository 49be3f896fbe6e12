"""TopKRouter against independent top-k, capacity and group-limited references written as loops."""

import math

import pytest
import torch

import moe
from moe.losses import load_balancing_loss, sequence_load_balancing_loss, z_loss
from moe.routers import TopKRouter

from routing_checks import check_contract


def dense_weights(routing):
    """(T, E) matrix of combine weights, 0 where a pair is absent; and the (T, E) pair mask."""
    mask = torch.zeros(routing.num_tokens, routing.num_experts, dtype=torch.bool)
    mask[routing.token_index, routing.expert_index] = True
    weights = torch.zeros(routing.num_tokens, routing.num_experts)
    weights[routing.token_index, routing.expert_index] = routing.weight.detach()
    return weights, mask


def mask_of(indices, num_experts):
    return torch.zeros(indices.shape[0], num_experts, dtype=torch.bool).scatter_(1, indices, True)


def reference_scores(router, x, score_function="softmax"):
    logits = x @ router.gate.weight.detach().T
    return logits.softmax(-1) if score_function == "softmax" else logits.sigmoid()


@pytest.mark.parametrize("score_function", ["softmax", "sigmoid"])
@pytest.mark.parametrize("num_experts,top_k", [(4, 1), (8, 2), (6, 6)])
def test_indices_equal_torch_topk_and_weights_sum_to_route_scale(score_function, num_experts, top_k):
    router = TopKRouter(16, num_experts, top_k, score_function=score_function, normalize_weights=True, route_scale=2.5)
    router.eval()
    x = torch.randn(33, 16)
    routing = router(x)
    check_contract(routing, 33, num_experts)
    assert routing.token_index.numel() == 33 * top_k
    scores = reference_scores(router, x, score_function)
    weights, mask = dense_weights(routing)
    assert torch.equal(mask, mask_of(scores.topk(top_k, -1).indices, num_experts))
    torch.testing.assert_close(weights.sum(-1), torch.full((33,), 2.5))
    chosen_scores = torch.where(mask, scores, 0.0)
    torch.testing.assert_close(weights, 2.5 * chosen_scores / chosen_scores.sum(-1, keepdim=True))


def test_softmax_then_renormalise_equals_mixtral_topk_of_logits_then_softmax():
    router = TopKRouter(16, 8, 2, normalize_weights=True).eval()
    x = torch.randn(50, 16)
    weights, _ = dense_weights(router(x))
    logits = x @ router.gate.weight.detach().T
    top_logits, top_experts = logits.topk(2, dim=-1)
    mixtral = torch.zeros(50, 8).scatter_(1, top_experts, top_logits.softmax(-1))
    torch.testing.assert_close(weights, mixtral)


def test_switch_top1_keeps_the_raw_probability_and_its_gradient():
    router = TopKRouter(16, 4, 1).eval()
    x = torch.randn(20, 16)
    routing = router(x)
    probs = reference_scores(router, x)
    torch.testing.assert_close(routing.weight, probs[routing.token_index, routing.expert_index])
    routing.weight.sum().backward()
    assert router.gate.weight.grad.abs().sum() > 0


def reference_capacity(scores, top_k, capacity, policy):
    """Kept (token, expert) pairs: per expert, the C best pairs by score (ties: earlier token) or the first C."""
    num_tokens, num_experts = scores.shape
    chosen = scores.topk(top_k, -1).indices
    kept = set()
    for e in range(num_experts):
        candidates = [t for t in range(num_tokens) if e in chosen[t].tolist()]
        if policy == "probability":
            candidates.sort(key=lambda t: (-float(scores[t, e]), t))
        kept.update((t, e) for t in candidates[:capacity])
    return kept, chosen


@pytest.mark.parametrize("policy", ["probability", "position"])
@pytest.mark.parametrize("top_k,capacity_factor", [(1, 1.0), (2, 0.5), (2, 1.25)])
def test_capacity_is_respected_and_drops_follow_the_policy(policy, top_k, capacity_factor):
    num_tokens, num_experts = 40, 4
    router = TopKRouter(8, num_experts, top_k, capacity_factor=capacity_factor, drop_policy=policy).eval()
    with torch.no_grad():
        router.gate.weight[0] += 0.5  # skew towards expert 0 so that it overflows
    x = torch.randn(num_tokens, 8) + 1.0
    routing = router(x)
    check_contract(routing, num_tokens, num_experts)
    capacity = math.ceil(top_k * num_tokens / num_experts * capacity_factor)
    assert routing.tokens_per_expert.max().item() <= capacity
    scores = reference_scores(router, x)
    expected, chosen = reference_capacity(scores, top_k, capacity, policy)
    pairs = set(zip(routing.token_index.tolist(), routing.expert_index.tolist()))
    assert pairs == expected
    assert len(expected) < num_tokens * top_k  # the case really drops something
    assert routing.dropped_fraction == pytest.approx(1 - len(expected) / (num_tokens * top_k))
    chosen_scores = scores.gather(1, chosen)
    normalised = chosen_scores / chosen_scores.sum(-1, keepdim=True) if top_k > 1 else chosen_scores
    full = torch.zeros(num_tokens, num_experts).scatter_(1, chosen, normalised)
    torch.testing.assert_close(routing.weight, full[routing.token_index, routing.expert_index])


def reference_group_limited(scores, top_k, num_groups, groups_kept):
    """Per token: rank groups by the sum of their top-2 scores, keep the best, top-k inside them."""
    num_tokens, num_experts = scores.shape
    size = num_experts // num_groups
    selections = []
    for t in range(num_tokens):
        row = scores[t].tolist()
        group_score = [sum(sorted(row[g * size : (g + 1) * size], reverse=True)[:2]) for g in range(num_groups)]
        best_groups = sorted(range(num_groups), key=lambda g: -group_score[g])[:groups_kept]
        eligible = [e for g in best_groups for e in range(g * size, (g + 1) * size)]
        selections.append((set(sorted(eligible, key=lambda e: -row[e])[:top_k]), set(best_groups)))
    return selections


@pytest.mark.parametrize("score_function", ["softmax", "sigmoid"])
@pytest.mark.parametrize("num_experts,num_groups,groups_kept,top_k", [(8, 4, 2, 2), (12, 4, 1, 3), (16, 8, 3, 4)])
def test_group_limited_routing_matches_loop(score_function, num_experts, num_groups, groups_kept, top_k):
    router = TopKRouter(
        8, num_experts, top_k, score_function=score_function, num_groups=num_groups, groups_kept=groups_kept
    ).eval()
    x = torch.randn(30, 8)
    routing = router(x)
    check_contract(routing, 30, num_experts)
    reference = reference_group_limited(reference_scores(router, x, score_function), top_k, num_groups, groups_kept)
    _, mask = dense_weights(routing)
    size = num_experts // num_groups
    for t, (experts, kept_groups) in enumerate(reference):
        picked = set(mask[t].nonzero().flatten().tolist())
        assert picked == experts
        assert {e // size for e in picked} <= kept_groups


def test_group_limited_with_all_groups_kept_is_plain_topk():
    x = torch.randn(25, 8)
    grouped = TopKRouter(8, 8, 2, num_groups=4, groups_kept=4).eval()
    plain = TopKRouter(8, 8, 2).eval()
    plain.load_state_dict(grouped.state_dict())
    a, b = grouped(x), plain(x)
    assert torch.equal(a.token_index, b.token_index) and torch.equal(a.expert_index, b.expert_index)
    torch.testing.assert_close(a.weight, b.weight)


def test_bias_steers_selection_but_not_weights():
    router = TopKRouter(8, 6, 2, score_function="sigmoid", bias_update_rate=1e-3).eval()
    bias = torch.tensor([0.0, 0.0, 0.0, 5.0, 0.0, -5.0])
    router.expert_bias.copy_(bias)
    x = torch.randn(20, 8)
    routing = router(x)
    scores = reference_scores(router, x, "sigmoid")
    chosen = (scores + bias).topk(2, -1).indices
    weights, mask = dense_weights(routing)
    assert torch.equal(mask, mask_of(chosen, 6))
    assert bool(mask[:, 3].all()) and not bool(mask[:, 5].any())
    chosen_scores = torch.where(mask, scores, 0.0)
    torch.testing.assert_close(weights, chosen_scores / chosen_scores.sum(-1, keepdim=True))


def test_bias_is_a_buffer_updated_only_by_update_routers():
    gamma = 1e-3
    layer = moe.MoELayer(8, 16, 4, "topk", top_k=1, bias_update_rate=gamma, experts="loop")
    model = torch.nn.Sequential(layer)
    assert all("expert_bias" not in name for name, _ in model.named_parameters())
    assert "0.router.expert_bias" in model.state_dict()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loads = torch.zeros(4)
    for _ in range(2):  # two micro-batches in one optimizer step
        y = model(torch.randn(10, 8))
        loads += layer.last_stats.tokens_per_expert.float()
        (y.square().mean() + moe.aux_loss(model)).backward()
    optimizer.step()
    assert torch.equal(layer.router.expert_bias, torch.zeros(4))
    assert layer.router.expert_bias.grad is None
    moe.update_routers(model)
    torch.testing.assert_close(layer.router.expert_bias, gamma * torch.sign(loads.mean() - loads))
    before = layer.router.expert_bias.clone()
    moe.update_routers(model)  # loads were reset: a step with no forward changes nothing
    torch.testing.assert_close(layer.router.expert_bias, before)


def test_eval_forward_does_not_accumulate_loads():
    router = TopKRouter(8, 4, 1, bias_update_rate=1e-3).eval()
    router(torch.randn(10, 8))
    assert torch.equal(router.step_load, torch.zeros(4))


def max_violation(counts):
    counts = counts.float()
    return ((counts.max() - counts.mean()) / counts.mean()).item()


@pytest.mark.parametrize("score_function", ["softmax", "sigmoid"])
def test_repeated_bias_updates_lower_max_violation_on_skewed_logits(score_function):
    layer = moe.MoELayer(8, 8, 8, "topk", top_k=2, score_function=score_function, bias_update_rate=1e-2)
    router = layer.router
    with torch.no_grad():
        router.gate.weight[:2] += 0.5  # experts 0 and 1 win most tokens
    x = torch.randn(256, 8) + 0.5
    violations = []
    for _ in range(120):
        routing = router(x)
        violations.append(max_violation(routing.tokens_per_expert))
        moe.update_routers(layer)
    assert violations[0] > 1.0
    assert max(violations[-10:]) < 0.25 * violations[0]


def test_jitter_only_in_training():
    router = TopKRouter(8, 4, 2, jitter_eps=0.3)
    x = torch.randn(16, 8)
    clean = x @ router.gate.weight.detach().T
    router.train()
    a, b = router(x).logits, router(x).logits
    assert not torch.allclose(a, clean) and not torch.allclose(a, b)
    router.eval()
    torch.testing.assert_close(router(x).logits, clean)


def test_eval_routing_is_deterministic():
    router = TopKRouter(8, 6, 2, jitter_eps=0.1, capacity_factor=1.0).eval()
    x = torch.randn(30, 8)
    a, b = router(x), router(x)
    for field in ("token_index", "expert_index", "weight", "tokens_per_expert", "logits", "aux_loss"):
        assert torch.equal(getattr(a, field), getattr(b, field)), field


@pytest.mark.parametrize("score_function", ["softmax", "sigmoid"])
def test_aux_loss_is_the_weighted_sum_of_the_three_losses(score_function):
    router = TopKRouter(
        8, 5, 2, score_function=score_function, load_balancing_coef=0.3, z_loss_coef=0.2, sequence_balance_coef=0.1
    ).eval()
    x = torch.randn(24, 8)
    routing = router(x, seq_len=6)
    logits = x @ router.gate.weight.detach().T
    scores = logits.softmax(-1) if score_function == "softmax" else logits.sigmoid()
    chosen = scores.topk(2, -1).indices
    counts = torch.bincount(chosen.flatten(), minlength=5)
    probs = scores / scores.sum(-1, keepdim=True)
    mask = mask_of(chosen, 5).float()
    expected = (
        0.3 * load_balancing_loss(probs, counts, 2)
        + 0.2 * z_loss(logits)
        + 0.1 * sequence_load_balancing_loss(scores, mask, 2, 6)
    )
    torch.testing.assert_close(routing.aux_loss, expected)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"top_k": 0}, "top_k"),
        ({"top_k": 5}, "top_k"),
        ({"capacity_factor": 0.0}, "capacity_factor"),
        ({"capacity_factor": -1.0}, "capacity_factor"),
        ({"score_function": "tanh"}, "softmax"),
        ({"drop_policy": "random"}, "position"),
        ({"num_groups": 3, "groups_kept": 1}, "num_groups=3"),
        ({"num_groups": 2, "groups_kept": 3}, "groups_kept"),
        ({"num_groups": 2}, "groups_kept"),
        ({"num_groups": 2, "groups_kept": 0}, "groups_kept must be >= 1"),
        ({"num_groups": 4, "groups_kept": 1, "top_k": 2}, "top_k=2"),
        ({"bias_update_rate": 0.0}, "bias_update_rate"),
        ({"jitter_eps": 1.0}, "jitter_eps"),
    ],
)
def test_bad_arguments_raise_naming_the_value(kwargs, match):
    kwargs = {"top_k": 2, **kwargs}
    with pytest.raises(ValueError, match=match):
        TopKRouter(8, 4, **kwargs)


def test_groups_kept_must_be_an_int():
    with pytest.raises(TypeError, match="groups_kept must be an int"):
        TopKRouter(8, 4, 2, num_groups=2, groups_kept=1.5)


def test_router_maths_stays_float32_under_autocast():
    router = TopKRouter(16, 8, 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        routing = router(torch.randn(12, 16))
    assert routing.logits.dtype == torch.float32 and routing.weight.dtype == torch.float32


def test_balancing_bias_and_counts_survive_a_bf16_model():
    router = TopKRouter(16, 8, 2, bias_update_rate=1e-3).to(torch.bfloat16)
    assert router.expert_bias.dtype == torch.float32 and router.step_load.dtype == torch.int64
    router.expert_bias.fill_(1.0)
    router.train()
    for _ in range(3):
        router(torch.randn(3000, 16, dtype=torch.bfloat16))
    assert int(router.step_load.sum()) == 3 * 3000 * 2
    before = router.expert_bias.clone()
    moe.update_routers(torch.nn.ModuleList([moe.MoELayer(16, 32, 8, router=router)]))
    torch.testing.assert_close((router.expert_bias - before).abs(), torch.full((8,), 1e-3), atol=1e-6, rtol=0)


@pytest.mark.parametrize("coef", [-1e-3, float("inf"), float("nan")])
def test_loss_coefficients_must_be_finite_and_nonnegative(coef):
    with pytest.raises(ValueError, match="load_balancing_coef must be a finite number >= 0"):
        TopKRouter(8, 4, 2, load_balancing_coef=coef)


def test_meta_initialised_layer_with_bias_materialises_with_to_empty():
    reference = moe.MoELayer(8, 16, 4, top_k=2, bias_update_rate=1e-3)
    with torch.no_grad():
        reference.router.expert_bias.copy_(torch.tensor([1.001, -0.003, 0.0007, 2.0001]))  # not bf16-exact
    with torch.device("meta"):
        layer = moe.MoELayer(8, 16, 4, top_k=2, bias_update_rate=1e-3)
    layer.to_empty(device="cpu")
    assert layer.router.expert_bias.device.type == "cpu"
    layer.load_state_dict(reference.state_dict())
    x = torch.randn(10, 8)
    torch.testing.assert_close(layer(x), reference(x))
    for model in (layer, reference):  # one training step: the materialised step counts must start at 0
        model.train()(x)
        moe.update_routers(model)
    assert torch.equal(layer.router.expert_bias, reference.router.expert_bias)
    layer.to(torch.bfloat16)
    assert layer.router.expert_bias.dtype == torch.float32
    assert torch.equal(layer.router.expert_bias, reference.router.expert_bias)
