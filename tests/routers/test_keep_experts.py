"""Router.keep_experts, experts_per_token, min_experts and expert_grouping against masking the full router."""

import copy

import pytest
import torch

from moe.compress import MergedRouter, SkippingRouter
from moe.routers import build_router

H, E, T = 8, 6, 40
KEEP = [0, 2, 3, 5]
CASES = [
    ("topk", {"top_k": 2}),
    ("topk", {"top_k": 2, "score_function": "sigmoid", "bias_update_rate": 1e-3}),
    ("relu", {"top_k": 2}),
    ("sinkhorn", {"top_k": 2}),
    ("base", {}),
]


def masked_routing(router, x, keep):
    """The full router's routing with the dropped experts' logits (and balancing bias) at -inf, renumbered."""
    dropped = torch.ones(router.num_experts, dtype=torch.bool)
    dropped[keep] = False
    reference = copy.deepcopy(router)
    if getattr(reference, "expert_bias", None) is not None:
        reference.expert_bias[dropped] = float("-inf")
    logits = reference.compute_logits(x).masked_fill(dropped, float("-inf"))
    reference.compute_logits = lambda _: logits
    routing = reference(x)
    new_id = torch.full((router.num_experts,), -1, dtype=torch.long)
    new_id[keep] = torch.arange(len(keep))
    return routing, new_id[routing.expert_index]


@pytest.mark.parametrize(("name", "kwargs"), CASES)
@torch.no_grad()
def test_kept_router_routes_like_the_full_router_with_dropped_experts_masked(name, kwargs):
    router = build_router(name, H, E, **kwargs).eval()
    if getattr(router, "expert_bias", None) is not None:
        router.expert_bias.copy_(torch.linspace(-0.3, 0.3, E))
    x = torch.randn(T, H)
    kept = copy.deepcopy(router)
    kept.keep_experts(KEEP)
    ref, ref_experts = masked_routing(router, x, KEEP)
    routing = kept(x)
    assert kept.num_experts == len(KEEP) and kept.gate.out_features == len(KEEP)
    assert torch.equal(routing.token_index, ref.token_index)
    assert torch.equal(routing.expert_index, ref_experts)
    torch.testing.assert_close(routing.weight, ref.weight)
    torch.testing.assert_close(routing.logits, router.compute_logits(x)[:, KEEP])


@torch.no_grad()
def test_kept_expert_choice_router_equals_one_built_with_the_kept_rows():
    # Its capacity ceil(T c / E) depends on E, so the reference is a fresh router of len(KEEP) experts.
    router = build_router("expert_choice", H, E).eval()
    fresh = build_router("expert_choice", H, len(KEEP)).eval()
    fresh.gate.weight.copy_(router.gate.weight[KEEP])
    router.keep_experts(KEEP)
    x = torch.randn(T, H)
    routing, expected = router(x), fresh(x)
    for field in ("token_index", "expert_index", "weight", "tokens_per_expert", "logits"):
        assert torch.equal(getattr(routing, field), getattr(expected, field)), field


@torch.no_grad()
def test_kept_merged_router_routes_like_masking_the_members_of_dropped_groups():
    source = build_router("topk", H, E, top_k=2).eval()
    merged = MergedRouter(H, 3, torch.tensor([0, 1, 0, 2, 2, 1]), copy.deepcopy(source)).eval()
    x = torch.randn(T, H)
    kept = copy.deepcopy(merged)
    kept.keep_experts([0, 2])  # groups 0 and 2: original experts 0, 2, 3, 4
    members = [0, 2, 3, 4]
    ref, ref_experts = masked_routing(source, x, members)
    routing = kept(x)
    assert kept.num_experts == 2 and kept.source.num_experts == 4
    assert kept.expert_to_group.tolist() == [0, 0, 1, 1]
    expected = torch.zeros(T, 2).index_put_((ref.token_index, kept.expert_to_group[ref_experts]), ref.weight, True)
    actual = torch.zeros(T, 2).index_put_((routing.token_index, routing.expert_index), routing.weight, True)
    torch.testing.assert_close(actual, expected)
    torch.testing.assert_close(routing.logits, merged(x).logits[:, [0, 2]])


def test_routers_whose_structure_depends_on_the_expert_count_refuse():
    with pytest.raises(TypeError, match="layer 'moe' uses hash routing"):
        build_router("hash", H, E, vocab_size=50).keep_experts(KEEP)
    with pytest.raises(ValueError, match="group-limited routing \\(num_groups=3\\)"):
        build_router("topk", H, E, top_k=2, num_groups=3, groups_kept=2).keep_experts(KEEP)
    with pytest.raises(ValueError, match="routes top_k=3 experts per token; it cannot keep only 2"):
        build_router("topk", H, E, top_k=3).keep_experts([0, 1])
    with pytest.raises(ValueError, match="routes top_k=2 .* cannot keep only 1"):
        build_router("relu", H, E, top_k=2).keep_experts([4])
    with pytest.raises(ValueError, match="nested router TopKRouter inside SkippingRouter"):
        SkippingRouter(H, E, "topk", top_k=2).keep_experts(KEEP)


def test_state_that_is_not_per_expert_cannot_be_sliced():
    router = build_router("topk", H, E, top_k=2)
    router.register_buffer("odd", torch.zeros(E + 1))
    with pytest.raises(ValueError, match="router state TopKRouter.odd has shape \\(7,\\)"):
        router.keep_experts(KEEP)


def test_relu_router_keeps_its_lambda_and_retargets_sparsity():
    router = build_router("relu", H, E, top_k=2)
    router.l1_lambda.fill_(0.25)
    router.keep_experts(KEEP)
    assert float(router.l1_lambda) == 0.25 and router.target_sparsity == pytest.approx(1 - 2 / 4)


def test_experts_per_token_and_min_experts():
    expected = {
        ("topk", 3): (3, 3),
        ("sinkhorn", 2): (2, 2),
        ("relu", 2): (None, 2),
        ("expert_choice", None): (None, 1),
        ("base", None): (1, 1),
        ("hash", None): (1, 1),
    }
    for (name, top_k), answer in expected.items():
        kwargs = {"top_k": top_k} if top_k else {"vocab_size": 50} if name == "hash" else {}
        router = build_router(name, H, E, **kwargs)
        assert (router.experts_per_token, router.min_experts) == answer, name
    merged = MergedRouter(H, 3, source_experts=E, top_k=3)
    assert (merged.experts_per_token, merged.min_experts) == (3, 3)
    skipping = SkippingRouter(H, E, "topk", top_k=2)
    assert (skipping.experts_per_token, skipping.min_experts) == (None, 2)


def test_expert_grouping_is_the_identity_except_for_merged_routers():
    router = build_router("topk", H, E, top_k=2)
    source, to_group = router.expert_grouping()
    assert source is router and to_group.tolist() == list(range(E))
    merged = MergedRouter(H, 3, torch.tensor([0, 1, 0, 2, 2, 1]), router)
    source, to_group = merged.expert_grouping()
    assert source is router and to_group.tolist() == [0, 1, 0, 2, 2, 1]
    again = MergedRouter.over(merged, torch.tensor([1, 0, 0]))  # groups 1 and 2 merge into one
    assert again.source is router and again.num_experts == 2
    assert again.expert_to_group.tolist() == [1, 0, 1, 0, 0, 0]


def test_bad_expert_ids_name_the_ids():
    router = build_router("topk", H, E, top_k=2)
    with pytest.raises(ValueError, match="layer 'moe': expert ids \\[9\\] are outside \\[0, 6\\)"):
        router.keep_experts([0, 9])
    with pytest.raises(ValueError, match="expert ids \\[1, 1, 2\\] contain duplicates"):
        router.keep_experts([1, 1, 2])
    merged = MergedRouter(H, 3, source_experts=E, top_k=2)
    with pytest.raises(ValueError, match="expert ids \\[3\\] are outside \\[0, 3\\)"):
        merged.keep_experts([0, 3])
    assert router.num_experts == E and merged.num_experts == 3
