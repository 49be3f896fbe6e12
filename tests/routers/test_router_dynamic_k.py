"""Dynamic-k routers (top-p, null experts) and noisy top-k gating against direct references."""

import pytest
import torch
import torch.nn.functional as F

import moe
from moe.losses import load_balancing_loss, routing_entropy, z_loss
from moe.routers import NullExpertRouter, TopKRouter, TopPRouter, build_router

from routing_checks import check_contract, gradcheck_router

H, E = 8, 6


def pairs(routing):
    return sorted(zip(routing.token_index.tolist(), routing.expert_index.tolist(), routing.weight.tolist()))


def top_p_reference(probs, p, max_k=None):
    """Loop: take experts in descending probability while the sum before each is at most p."""
    out = []
    for t in range(probs.shape[0]):
        total = 0.0
        ranked = sorted(range(probs.shape[1]), key=lambda e: (-float(probs[t, e]), e))
        for rank, e in enumerate(ranked):
            if (rank > 0 and p < 1 and total > p) or (max_k is not None and rank >= max_k):
                break
            out.append((t, e, float(probs[t, e])))
            total += float(probs[t, e])
    return sorted(out)


@pytest.mark.parametrize("top_p, max_k", [(0.4, None), (0.7, None), (0.9, 2), (1.0, None)])
def test_top_p_selects_the_smallest_prefix_reaching_p(top_p, max_k):
    torch.manual_seed(0)
    router = TopPRouter(H, E, top_p=top_p, max_k=max_k)
    x = torch.randn(40, H) * 3
    routing = router(x)
    check_contract(routing, 40, E)
    probs = (x @ router.gate.weight.T).softmax(-1).detach()
    expected = top_p_reference(probs, top_p, max_k)
    got = pairs(routing)
    assert [(t, e) for t, e, _ in got] == [(t, e) for t, e, _ in expected]
    torch.testing.assert_close(torch.tensor([w for *_, w in got]), torch.tensor([w for *_, w in expected]))
    counts = torch.bincount(routing.token_index, minlength=40)
    assert counts.min() >= 1 and (max_k is None or counts.max() <= max_k)
    if top_p == 1.0:
        assert bool((counts == E).all())
    per_token = routing.token_index.numel() / 40
    expected_aux = (
        1e-2 * load_balancing_loss(probs, routing.tokens_per_expert, per_token)
        + 1e-3 * z_loss(x @ router.gate.weight.T)
        + 1e-4 * -(probs * probs.log()).sum(-1).mean()
    )
    torch.testing.assert_close(routing.aux_loss, expected_aux)


def test_top_p_gradients_and_bad_arguments():
    torch.manual_seed(1)
    assert gradcheck_router(TopPRouter(4, 5, top_p=0.6), with_aux_loss=True)
    for kwargs, match in [({"top_p": 0.0}, "top_p"), ({"top_p": 1.5}, "top_p"), ({"max_k": 7}, "max_k")]:
        with pytest.raises(ValueError, match=match):
            TopPRouter(H, E, **kwargs)
    assert routing_entropy(torch.full((3, 4), 0.25)).item() == pytest.approx(torch.log(torch.tensor(4.0)).item())


def test_null_expert_router_keeps_only_real_pairs_renormalised():
    torch.manual_seed(2)
    router = NullExpertRouter(H, E, top_k=2, num_null_experts=2)
    with torch.no_grad():
        router.null_gate[0, :] = 5 * router.gate.weight[0]  # tokens aligned with expert 0 pick null experts
    x = torch.randn(50, H) * 2
    x[:4] = 3 * router.gate.weight[0]  # ...and so do these, strongly
    routing = router(x)
    check_contract(routing, 50, E)
    logits = torch.cat([x @ router.gate.weight.T, x @ router.null_gate[0].T], -1).detach()
    probs = logits.softmax(-1)
    top = probs.topk(2, dim=-1)
    expected = []
    for t in range(50):
        real = [(int(e), float(w)) for e, w in zip(top.indices[t], top.values[t]) if e < E]
        total = sum(w for _, w in real)
        expected += [(t, e, w / total) for e, w in real]
    got = pairs(routing)
    assert [(t, e) for t, e, _ in got] == [(t, e) for t, e, _ in sorted(expected)]
    torch.testing.assert_close(torch.tensor([w for *_, w in got]), torch.tensor([w for *_, w in sorted(expected)]))
    per_token = torch.bincount(routing.token_index, minlength=50)
    assert int((per_token == 0).sum()) >= 4 and per_token.max() == 2  # some tokens reach no real expert
    assert routing.dropped_fraction == 0.0
    counts = torch.bincount(top.indices.flatten(), minlength=E + 2)
    expected_aux = 1e-2 * load_balancing_loss(probs, counts, 2) + 1e-3 * z_loss(logits)
    torch.testing.assert_close(routing.aux_loss, expected_aux)

    layer = moe.MoELayer(H, 12, E, router=router, experts="loop")
    out = layer(x)
    torch.testing.assert_close(out[per_token == 0], torch.zeros(int((per_token == 0).sum()), H))
    assert layer.last_stats.experts_per_token == pytest.approx(routing.token_index.numel() / 50)
    assert gradcheck_router(NullExpertRouter(4, 3, top_k=2, num_null_experts=1), with_aux_loss=True)


def test_expert_surgery_refuses_a_null_expert_router_even_when_n_equals_e():
    from moe.compress.surgery import keep_experts

    layer = moe.MoELayer(H, 12, 3, router="null_experts", top_k=2, num_null_experts=3)
    with pytest.raises(ValueError, match="null_gate"):
        keep_experts(layer, [0, 1])


def test_noisy_gating_adds_softplus_scaled_noise_in_training_only():
    torch.manual_seed(3)
    noisy = TopKRouter(H, E, top_k=2, noisy_gating=True)
    plain = TopKRouter(H, E, top_k=2)
    plain.gate.weight.data.copy_(noisy.gate.weight.data)
    with torch.no_grad():
        noisy.noise.weight.normal_()
    x = torch.randn(30, H)
    noisy.eval(), plain.eval()
    assert pairs(noisy(x)) == pairs(plain(x))
    noisy.train()
    torch.manual_seed(7)
    routing = noisy(x)
    check_contract(routing, 30, E)
    torch.manual_seed(7)
    clean = x @ noisy.gate.weight.T
    eps = torch.randn_like(clean)
    expected_logits = clean + eps * F.softplus(x @ noisy.noise.weight.T)
    torch.testing.assert_close(routing.logits, expected_logits)
    top = expected_logits.detach().softmax(-1).topk(2, dim=-1)
    weights = top.values / top.values.sum(-1, keepdim=True)
    expected = sorted((t, int(top.indices[t, j]), float(weights[t, j])) for t in range(30) for j in range(2))
    assert [(t, e) for t, e, _ in pairs(routing)] == [(t, e) for t, e, _ in expected]
    routing.weight.sum().backward()
    assert noisy.noise.weight.grad is not None and noisy.noise.weight.grad.abs().sum() > 0
    assert TopKRouter(H, E, top_k=2, noisy_gating=True).noise.weight.abs().sum() == 0  # zero-initialised


def test_global_batch_counts_accumulate_over_micro_batches_and_reset_each_step():
    torch.manual_seed(4)
    router = TopKRouter(H, E, top_k=2, balance_scope="global_batch", z_loss_coef=0.0)
    batches = [torch.randn(10, H), torch.randn(20, H)]
    first = router(batches[0])
    second = router(batches[1])
    counts = [torch.bincount(router.compute_logits(b).topk(2, dim=-1).indices.flatten(), minlength=E) for b in batches]
    probs = router.compute_logits(batches[1]).softmax(-1)
    total = (counts[0] + counts[1]).double()
    # Micro-batch 2 sees the counts of micro-batches 1 and 2, scaled to its own 20 tokens.
    expected = 1e-2 * load_balancing_loss(probs, (total * 20 / 30).float(), 2)
    torch.testing.assert_close(second.aux_loss, expected)
    first_probs = router.compute_logits(batches[0]).softmax(-1)
    torch.testing.assert_close(first.aux_loss, 1e-2 * load_balancing_loss(first_probs, counts[0], 2))
    router.step_update()  # a new optimizer step: the counts start again
    again = router(batches[1])
    torch.testing.assert_close(again.aux_loss, 1e-2 * load_balancing_loss(probs, counts[1], 2))
    router.eval()
    torch.testing.assert_close(router(batches[1]).aux_loss, 1e-2 * load_balancing_loss(probs, counts[1], 2))
    with pytest.raises(ValueError, match="balance_scope"):
        TopKRouter(H, E, balance_scope="sequence")


def test_registered_names_build_the_new_routers():
    assert isinstance(build_router("top_p", H, E, top_p=0.5), TopPRouter)
    assert isinstance(build_router("null_experts", H, E, top_k=2, num_null_experts=1), NullExpertRouter)
