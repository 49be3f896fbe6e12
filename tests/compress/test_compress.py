"""moe.compress: calibration statistics, pruning, merging, alignment and skipping against direct references."""

import copy
import dataclasses
import itertools

import pytest
import torch
from torch import nn

import moe
from moe import compress
from moe.compress.calibration import dense_weights
from moe.compress.merged_router import group_logsumexp
from moe.compress.surgery import permute_hidden_units
from moe.model import GPT, ModelConfig

pytest.importorskip("scipy", reason="moe.compress merging needs scipy")

H, F, E = 16, 24, 8


class TwoLayers(nn.Module):
    """Two MoE layers with a residual between them (the second with a gated shared expert)."""

    def __init__(self, **router_kwargs):
        super().__init__()
        self.first = moe.MoELayer(H, F, E, top_k=2, **router_kwargs)
        self.second = moe.MoELayer(H, F, E, top_k=2, shared_experts=1, shared_expert_gate=True, **router_kwargs)
        moe.name_moe_layers(self)

    def forward(self, x):
        x = x + self.first(x)
        return x + self.second(x)


def batches(n=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(4, 12, H, generator=g) for _ in range(n)]


def expert_out(layer, e, x):
    """Reference: expert ``e`` of ``layer`` as a plain MLP."""
    h = x @ layer.experts.w_in[e]
    gate, up = h.chunk(2, dim=-1)
    return (nn.functional.silu(gate) * up) @ layer.experts.w_out[e]


def masked_topk_output(layer, x, keep):
    """Reference for a pruned top-k softmax layer: removed experts' logits at -inf, renormalised top-k."""
    logits = x @ layer.router.gate.weight.T
    mask = torch.full((layer.num_experts,), float("-inf"))
    mask[keep] = 0
    probs = (logits + mask).softmax(-1)
    top = probs.topk(layer.router.top_k, dim=-1)
    weights = torch.zeros_like(probs).scatter_(1, top.indices, top.values / top.values.sum(-1, keepdim=True))
    outputs = torch.stack([expert_out(layer, e, x) for e in range(layer.num_experts)])
    return torch.einsum("te,eth->th", weights, outputs)


def planted_layer(permute_copies=False):
    """E=8 experts of which 6 and 7 duplicate 1 and 3 (router rows scaled down, so they are chosen least).

    With ``permute_copies`` the duplicates have their hidden units shuffled (same function, other weights).
    """
    torch.manual_seed(3)
    layer = moe.MoELayer(H, F, E, top_k=2)
    moe.name_moe_layers(layer)
    with torch.no_grad():
        for copy_id, source in [(6, 1), (7, 3)]:
            layer.experts.w_in[copy_id] = layer.experts.w_in[source]
            layer.experts.w_out[copy_id] = layer.experts.w_out[source]
            layer.router.gate.weight[copy_id] = 0.2 * layer.router.gate.weight[source]
            if permute_copies:
                permute_hidden_units(layer, copy_id, torch.randperm(F))
    return layer


@torch.no_grad()
def test_calibration_statistics_match_direct_computation():
    model = TwoLayers()
    data = batches()
    cal = compress.calibrate(model, data)
    layer = model.first
    x = torch.cat([b.reshape(-1, H) for b in data])
    logits = x @ layer.router.gate.weight.T
    chosen = logits.topk(2, dim=-1).indices
    stats = cal["first"]
    assert stats.num_tokens == x.shape[0]
    assert torch.equal(stats.selection_count, torch.bincount(chosen.flatten(), minlength=E).double())
    torch.testing.assert_close(stats.score_mass, logits.softmax(-1).sum(0).double(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(stats.logit_gram, (logits.T @ logits).double(), rtol=1e-4, atol=1e-3)
    mean = torch.stack([expert_out(layer, e, x).mean(0) for e in range(E)]).double()
    torch.testing.assert_close(stats.mean_output, mean, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(stats.inputs, x)
    torch.testing.assert_close(stats.outputs, layer(x))
    weights = logits.softmax(-1).topk(2, dim=-1).values
    torch.testing.assert_close(stats.top2_ratio, weights[:, 1] / weights[:, 0])
    second_inputs = x + layer(x)
    torch.testing.assert_close(cal["second"].inputs, second_inputs)


@torch.no_grad()
def test_calibration_memory_budget_caps_cached_rows():
    model = TwoLayers()
    bytes_per_row = 2 * H * 4 + 8 + 4
    cal = compress.calibrate(model, batches(), memory_budget=2 * 10 * bytes_per_row)
    assert cal["first"].inputs.shape == (10, H) and cal["second"].outputs.shape == (10, H)
    assert cal["first"].num_tokens == 3 * 4 * 12
    with pytest.raises(ValueError, match="memory_budget"):
        compress.calibrate(model, batches(), memory_budget=-1)
    with pytest.raises(ValueError, match="no moe.MoELayer"):
        compress.calibrate(nn.Linear(2, 2), batches())


@pytest.mark.parametrize("method", compress.PRUNE_METHODS)
@torch.no_grad()
def test_keeping_every_expert_changes_nothing(method):
    model = TwoLayers(bias_update_rate=1e-3)
    cal = compress.calibrate(model, batches())
    x = torch.randn(2, 5, H)
    before = model(x)
    kept = compress.prune(model, cal, method=method, num_experts=E)
    assert kept == {"first": list(range(E)), "second": list(range(E))}
    assert torch.equal(model(x), before)


@pytest.mark.parametrize("method", ["msmoe", "hc_smoe"])
@torch.no_grad()
def test_merging_to_every_expert_changes_nothing(method):
    model = TwoLayers()
    cal = compress.calibrate(model, batches())
    x = torch.randn(2, 5, H)
    before = model(x)
    groups = compress.merge(model, cal, method=method, num_experts=1.0)
    assert groups["first"] == [[e] for e in range(E)]
    torch.testing.assert_close(model(x), before, rtol=1e-6, atol=1e-6)


@torch.no_grad()
def test_pruned_layer_matches_masked_logits_and_slices_router_state():
    model = TwoLayers(bias_update_rate=1e-3)
    cal = compress.calibrate(model, batches())
    reference = copy.deepcopy(model.first)
    model.first.router.expert_bias.copy_(torch.linspace(-0.5, 0.5, E))
    bias_before = model.first.router.expert_bias.clone()
    kept = compress.prune(model, cal, method="frequency", num_experts=5, layers=["first"])["first"]
    layer = model.first
    assert layer.num_experts == layer.experts.num_experts == layer.router.num_experts == 5
    assert layer.router.gate.weight.shape == (5, H) and layer.router.gate.out_features == 5
    assert torch.equal(layer.router.gate.weight, reference.router.gate.weight[kept])
    assert torch.equal(layer.router.expert_bias, bias_before[kept])
    assert layer.router.step_load.shape == (5,)
    assert torch.equal(layer.experts.w_in, reference.experts.w_in[kept])
    assert torch.equal(layer.experts.w_out, reference.experts.w_out[kept])
    layer.router.expert_bias.zero_()
    x = torch.randn(7, H)
    torch.testing.assert_close(layer(x), masked_topk_output(reference, x, kept), rtol=1e-5, atol=1e-6)
    state = layer.state_dict()
    fresh = moe.MoELayer(H, F, 5, top_k=2, bias_update_rate=1e-3)
    fresh.load_state_dict(state)
    torch.testing.assert_close(fresh(x), layer(x))


def test_prune_rejects_bad_targets():
    model = TwoLayers()
    cal = compress.calibrate(model, batches())
    with pytest.raises(ValueError, match="top_k=2"):
        compress.prune(copy.deepcopy(model), cal, method="frequency", num_experts=1)
    with pytest.raises(ValueError, match="num_experts must be in"):
        compress.prune(copy.deepcopy(model), cal, method="frequency", num_experts=9)
    with pytest.raises(ValueError, match="method must be one of"):
        compress.prune(copy.deepcopy(model), cal, method="magnitude", num_experts=4)
    with pytest.raises(ValueError, match="global"):
        compress.prune(copy.deepcopy(model), cal, method="reconstruction", num_experts=4, budget="global")
    with pytest.raises(ValueError, match="top_k=2"):
        compress.keep_experts(copy.deepcopy(model).first, [3])
    pruned = copy.deepcopy(model)
    compress.prune(pruned, cal, num_experts=4)
    with pytest.raises(ValueError, match="calibrate again"):
        compress.prune(pruned, cal, num_experts=3)


def test_group_limited_and_hash_routers_refuse_pruning():
    grouped = moe.MoELayer(H, F, E, top_k=2, num_groups=4, groups_kept=2)
    with pytest.raises(ValueError, match="group-limited"):
        compress.keep_experts(grouped, [0, 1, 2, 3])
    hashed = moe.MoELayer(H, F, E, router="hash", vocab_size=50)
    with pytest.raises(TypeError, match="hash routing"):
        compress.keep_experts(hashed, [0, 1, 2, 3])


@torch.no_grad()
def test_relu_router_keeps_its_lambda_and_retargets_sparsity():
    layer = moe.MoELayer(H, F, E, router="relu", top_k=2)
    layer.router.l1_lambda.fill_(0.5)
    compress.keep_experts(layer, [0, 2, 4, 6])
    assert float(layer.router.l1_lambda) == 0.5
    assert layer.router.target_sparsity == pytest.approx(1 - 2 / 4)
    assert layer(torch.randn(5, H)).shape == (5, H)


@torch.no_grad()
def test_reconstruction_picks_the_subset_with_least_error():
    model = TwoLayers()
    cal = compress.calibrate(model, batches())
    reference = copy.deepcopy(model.first)
    x, z = cal["first"].inputs, cal["first"].outputs
    errors = {
        s: float((z - masked_topk_output(reference, x, list(s))).norm()) for s in itertools.combinations(range(E), 6)
    }
    kept = compress.prune(model, cal, method="reconstruction", num_experts=6, layers=["first"])["first"]
    assert tuple(kept) == min(errors, key=errors.get)


@torch.no_grad()
def test_sampled_reconstruction_is_no_worse_than_frequency():
    model = TwoLayers()
    cal = compress.calibrate(model, batches())
    reference = copy.deepcopy(model.first)
    x, z = cal["first"].inputs, cal["first"].outputs
    by_frequency = sorted(cal["first"].frequency.argsort(descending=True, stable=True)[:5].tolist())
    kept = compress.prune(model, cal, method="reconstruction", num_experts=5, max_subsets=4, seed=1, layers=["first"])[
        "first"
    ]
    error = float((z - masked_topk_output(reference, x, kept)).norm())
    assert error <= float((z - masked_topk_output(reference, x, by_frequency)).norm()) + 1e-5


@torch.no_grad()
def test_progressive_reconstruction_reads_inputs_of_the_pruned_model():
    model = TwoLayers()
    cal = compress.calibrate(model, batches())
    layerwise = copy.deepcopy(model)
    kept_p = compress.prune(model, cal, method="reconstruction", num_experts=6, progressive=True)
    kept_l = compress.prune(layerwise, cal, method="reconstruction", num_experts=6)
    assert kept_p["first"] == kept_l["first"]
    assert model.second.num_experts == 6
    with pytest.raises(ValueError, match="progressive"):
        compress.prune(copy.deepcopy(layerwise), cal, method="frequency", num_experts=4, progressive=True)


@torch.no_grad()
def test_global_budget_ranks_normalised_frequency_across_layers():
    model = TwoLayers()
    cal = compress.calibrate(model, batches())
    kept = compress.prune(model, cal, method="frequency", num_experts=5, budget="global")
    assert sum(len(v) for v in kept.values()) == 10
    shares = {name: cal[name].frequency for name in ("first", "second")}
    floors = {name: set(shares[name].argsort(descending=True, stable=True)[:2].tolist()) for name in shares}
    rest = sorted((-float(shares[n][e]), n, e) for n in shares for e in range(E) if e not in floors[n])
    expected = {n: sorted(floors[n] | {e for _, m, e in rest[:6] if m == n}) for n in shares}
    assert kept == expected


@pytest.mark.parametrize("method", ["frequency", "reconstruction"])
@torch.no_grad()
def test_pruning_to_the_distinct_count_removes_a_duplicate(method):
    layer = planted_layer()
    cal = compress.calibrate(layer, batches(4))
    kept = compress.prune(layer, cal, method=method, num_experts=6)[""]
    assert not {1, 6} <= set(kept) or not {3, 7} <= set(kept)
    assert len(kept) == 6


@pytest.mark.parametrize(
    "method,align,permute_copies",
    [("msmoe", None, False), ("msmoe", None, True), ("hc_smoe", False, False), ("hc_smoe", True, True)],
)
@torch.no_grad()
def test_merging_finds_planted_duplicates_losslessly(method, align, permute_copies):
    layer = planted_layer(permute_copies)
    cal = compress.calibrate(layer, batches(4))
    x = torch.randn(3, 7, H)
    before = layer(x)
    groups = compress.merge(layer, cal, method=method, num_experts=6, align=align)[""]
    assert [1, 6] in groups and [3, 7] in groups
    assert layer.num_experts == layer.experts.num_experts == layer.router.num_experts == 6
    torch.testing.assert_close(layer(x), before, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_average_merge_is_the_frequency_weighted_mean():
    model = TwoLayers()
    cal = compress.calibrate(model, batches())
    w_in = model.first.experts.w_in.clone()
    freq = cal["first"].frequency.float()
    compress.merge(model, cal, method="average", layers=["first"])
    assert model.first.num_experts == 1
    torch.testing.assert_close(model.first.experts.w_in[0], torch.einsum("e,ehf->hf", freq, w_in))
    x = torch.randn(6, H)
    torch.testing.assert_close(model.first(x), expert_out(model.first, 0, x))
    with pytest.raises(ValueError, match="must be 1"):
        compress.merge(model, cal, method="average", num_experts=2, layers=["second"])


@torch.no_grad()
def test_permutation_alignment_keeps_every_expert_function():
    torch.manual_seed(5)
    layer = moe.MoELayer(H, F, E, top_k=2)
    x = torch.randn(9, H)
    before = [expert_out(layer, e, x) for e in range(E)]
    original = layer.experts.w_in[2].clone(), layer.experts.w_out[2].clone()
    permute_hidden_units(layer, 5, torch.randperm(F))
    layer.experts.w_in[4] = original[0]
    layer.experts.w_out[4] = original[1]
    permute_hidden_units(layer, 4, torch.randperm(F))
    compress.align_to(layer, 2, 4)
    for e in (1, 3, 5, 6, 7):
        compress.align_to(layer, 0, e)
    for e in range(E):
        if e != 4:
            torch.testing.assert_close(expert_out(layer, e, x), before[e], rtol=1e-6, atol=1e-6)
    assert torch.equal(layer.experts.w_in[4], original[0]) and torch.equal(layer.experts.w_out[4], original[1])


def naive_agglomerative(features, count, linkage):
    """Reference: merge the closest pair of clusters until ``count`` remain (O(E^4), fine for E=8)."""
    clusters = [[i] for i in range(features.shape[0])]
    dist = torch.cdist(features, features)
    while len(clusters) > count:
        best = None
        for a, b in itertools.combinations(range(len(clusters)), 2):
            pair = dist[clusters[a]][:, clusters[b]]
            d = float(pair.mean() if linkage == "average" else pair.min())
            if best is None or d < best[0]:
                best = (d, a, b)
        _, a, b = best
        clusters[a] = sorted(clusters[a] + clusters[b])
        del clusters[b]
    return sorted(clusters)


@pytest.mark.parametrize("linkage", ["average", "single"])
def test_hierarchical_groups_match_naive_clustering(linkage):
    g = torch.Generator().manual_seed(7)
    for _ in range(5):
        features = torch.randn(E, 5, generator=g, dtype=torch.float64)
        for count in (2, 4, 6):
            assert compress.hierarchical_groups(features, count, linkage) == naive_agglomerative(
                features, count, linkage
            )


def test_msmoe_groups_follow_frequency_and_logit_similarity():
    frequency = torch.tensor([0.3, 0.05, 0.25, 0.1, 0.3])
    cosine = torch.eye(5)
    cosine[1, 2] = cosine[2, 1] = 0.9
    cosine[3, 0] = cosine[0, 3] = 0.2
    cosine[3, 4] = cosine[4, 3] = 0.7
    assert compress.msmoe_groups(frequency, cosine, 3) == [[0], [1, 2], [3, 4]]


@torch.no_grad()
def test_merged_router_routes_members_to_their_group_with_summed_weights():
    torch.manual_seed(2)
    layer = moe.MoELayer(H, F, E, top_k=3)
    original = copy.deepcopy(layer)
    groups = [[0, 5], [1], [2, 3, 7], [4, 6]]
    compress.merge_groups(layer, groups, torch.ones(E))
    x = torch.randn(11, H)
    probs = (x @ original.router.gate.weight.T).softmax(-1)
    top = probs.topk(3, dim=-1)
    weights = top.values / top.values.sum(-1, keepdim=True)
    group_of = {e: g for g, members in enumerate(groups) for e in members}
    expected = torch.zeros(11, H)
    for t in range(11):
        for j in range(3):
            expected[t] += weights[t, j] * expert_out(layer, group_of[int(top.indices[t, j])], x[t : t + 1])[0]
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-6)
    routing = layer.router(x)
    dense = dense_weights(routing)
    assert dense.shape == (11, 4)
    torch.testing.assert_close(dense.sum(-1), torch.ones(11))
    lse = torch.stack(
        [torch.logsumexp(routing.logits.new_tensor(0) + (x @ original.router.gate.weight[m].T), -1) for m in groups],
        dim=-1,
    )
    torch.testing.assert_close(routing.logits, lse, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        group_logsumexp(torch.zeros(1, E), layer.router.expert_to_group, 4), torch.tensor([[2.0, 1.0, 3.0, 2.0]]).log()
    )


@torch.no_grad()
def test_merged_layer_rebuilds_from_config_and_state_dict():
    layer = planted_layer()
    cal = compress.calibrate(layer, batches())
    compress.merge(layer, cal, method="hc_smoe", num_experts=6)
    fresh = moe.MoELayer(H, F, 6, router="merged", source_experts=E, top_k=2)
    fresh.load_state_dict(layer.state_dict())
    x = torch.randn(5, H)
    torch.testing.assert_close(fresh(x), layer(x))
    kept = compress.keep_experts(layer, [0, 2, 3, 5])
    assert kept == [0, 2, 3, 5] and layer.router.source.num_experts == int(layer.router.expert_to_group.numel())
    assert sorted(set(layer.router.expert_to_group.tolist())) == [0, 1, 2, 3]
    assert layer(x).shape == (5, H)


@torch.no_grad()
@pytest.mark.parametrize("renormalize", [False, True])
def test_dynamic_skipping_drops_second_expert_below_median_ratio(renormalize):
    model = TwoLayers()
    cal = compress.calibrate(model, batches())
    reference = copy.deepcopy(model.first)
    betas = compress.enable_skipping(model, cal, renormalize=renormalize)
    assert betas["first"] == pytest.approx(float(cal["first"].top2_ratio.median()))
    x = torch.randn(40, H)
    probs = (x @ reference.router.gate.weight.T).softmax(-1)
    top = probs.topk(2, dim=-1)
    w = top.values / top.values.sum(-1, keepdim=True)
    expected = torch.zeros(40, H)
    for t in range(40):
        second = w[t, 1] >= betas["first"] * w[t, 0]
        # Renormalised (the authors' code): a token that skips runs its first expert at weight w1 + w2 = 1.
        first = w[t, 0] if second or not renormalize else w[t, 0] + w[t, 1]
        expected[t] += first * expert_out(reference, int(top.indices[t, 0]), x[t : t + 1])[0]
        if second:
            expected[t] += w[t, 1] * expert_out(reference, int(top.indices[t, 1]), x[t : t + 1])[0]
    torch.testing.assert_close(model.first(x), expected, rtol=1e-5, atol=1e-6)
    routing = model.first.router(x)
    solo = torch.bincount(routing.token_index, minlength=40) == 1
    assert 0 < int(solo.sum()) < 40
    pair_is_solo = solo[routing.token_index]
    solo_weight = routing.weight[pair_is_solo]
    expected_solo = torch.ones_like(solo_weight) if renormalize else w[routing.token_index[pair_is_solo], 0]
    torch.testing.assert_close(solo_weight, expected_solo)
    skipped = float(model.first.router.last_skip_fraction)
    assert skipped == pytest.approx(float((w[:, 1] < betas["first"] * w[:, 0]).float().mean()))
    with pytest.raises(TypeError, match="already"):
        compress.enable_skipping(model, betas=betas)
    with pytest.raises(ValueError, match="top-2"):
        compress.enable_skipping(moe.MoELayer(H, F, E, top_k=1), betas={"": 0.5})


@torch.no_grad()
def test_skipping_model_rebuilds_from_config_and_state_dict():
    cfg = ModelConfig(vocab_size=64, seq_len=16, num_layers=2, hidden_size=32, num_heads=2, ffn_hidden_size=48)
    model = GPT(cfg).eval()
    betas = compress.enable_skipping(model, betas={name: 0.6 for name, _ in moe.moe_layers(model)})
    rebuilt = GPT(dataclasses.replace(cfg, router="skipping")).eval()
    assert float(rebuilt.blocks[0].ffn.router.beta) == 0.0  # skips nothing until the saved beta loads
    rebuilt.load_state_dict(model.state_dict())
    idx = torch.randint(0, 64, (3, 16))
    torch.testing.assert_close(rebuilt(idx)[0], model(idx)[0])
    assert [float(layer.router.beta) for _, layer in moe.moe_layers(rebuilt)] == pytest.approx(list(betas.values()))


@pytest.mark.gpu
@torch.no_grad()
def test_calibration_and_compression_on_cuda_match_cpu():
    model = TwoLayers(bias_update_rate=1e-3)
    data = batches()
    cpu = compress.calibrate(model, data)
    gpu_model = copy.deepcopy(model).cuda()
    gpu = compress.calibrate(gpu_model, [b.cuda() for b in data])
    for name in ("first", "second"):
        assert torch.equal(gpu[name].selection_count, cpu[name].selection_count)
        torch.testing.assert_close(gpu[name].mean_output, cpu[name].mean_output, rtol=1e-3, atol=1e-4)
        torch.testing.assert_close(gpu[name].inputs, cpu[name].inputs, rtol=1e-4, atol=1e-5)
    assert gpu["first"].inputs.device.type == "cpu"
    kept_gpu = compress.prune(gpu_model, gpu, method="reconstruction", num_experts=6)
    kept_cpu = compress.prune(model, cpu, method="reconstruction", num_experts=6)
    assert kept_gpu == kept_cpu
    merged = copy.deepcopy(gpu_model)
    compress.merge(merged, compress.calibrate(merged, [b.cuda() for b in data]), method="msmoe", num_experts=4)
    x = torch.randn(3, 5, H, device="cuda")
    assert merged(x).isfinite().all() and merged.first.router.expert_to_group.device.type == "cuda"


@torch.no_grad()
def test_only_calibrated_layers_are_compressed():
    model = TwoLayers()
    cal = compress.calibrate(model, batches(), layers=["second"])
    assert set(cal.layers) == {"second"}
    expected = sorted(cal["second"].score_mass.argsort(descending=True, stable=True)[:4].tolist())
    assert compress.prune(model, cal, method="score", num_experts=4) == {"second": expected}
    assert model.first.num_experts == E and model.second.num_experts == 4


@torch.no_grad()
def test_msmoe_global_budget_merges_the_layer_with_unused_experts_first():
    torch.manual_seed(0)
    model = TwoLayers(bias_update_rate=1e-3)
    model.second.router.expert_bias[6:] = -1e9  # experts 6 and 7 of the second layer are never selected
    cal = compress.calibrate(model, batches(4))
    assert cal["first"].selection_count.min() > 0 and cal["second"].selection_count[6:].sum() == 0
    uniform = compress.merge(copy.deepcopy(model), cal, method="msmoe", num_experts=7, budget="layer")
    assert [len(g) for g in uniform.values()] == [7, 7]
    groups = compress.merge(model, cal, method="msmoe", num_experts=7)
    assert groups["first"] == [[e] for e in range(E)]
    assert len(groups["second"]) == 6 and sorted(g[0] for g in groups["second"]) == list(range(6))
    assert sorted(e for g in groups["second"] for e in g[1:]) == [6, 7]
    assert model.first.num_experts == 8 and model.second.num_experts == 6
    with pytest.raises(ValueError, match="msmoe"):
        compress.merge(model, cal, method="hc_smoe", num_experts=4, budget="global")


@torch.no_grad()
def test_reap_saliency_matches_a_direct_loop_and_drops_the_least_salient():
    model = TwoLayers()
    data = batches()
    cal = compress.calibrate(model, data, chunk_tokens=7)  # chunks that do not divide the token count
    layer = model.first
    x = torch.cat([b.reshape(-1, H) for b in data])
    probs = (x @ layer.router.gate.weight.T).softmax(-1)
    chosen = probs.topk(2, dim=-1).indices
    expected = torch.zeros(E, dtype=torch.float64)
    for e in range(E):
        tokens = (chosen == e).any(-1).nonzero().flatten().tolist()
        values = [float(probs[t, e]) * float(expert_out(layer, e, x[t : t + 1]).norm()) for t in tokens]
        expected[e] = sum(values) / len(values) if values else 0.0
    torch.testing.assert_close(cal["first"].reap_saliency, expected, rtol=1e-4, atol=1e-6)
    kept = compress.prune(model, cal, method="reap", num_experts=5, layers=["first"])["first"]
    assert sorted(kept) == sorted(expected.argsort(descending=True)[:5].tolist())
    with pytest.raises(ValueError, match="layer-wise"):
        compress.prune(model, cal, method="reap", num_experts=5, budget="global", layers=["second"])
