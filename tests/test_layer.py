"""MoELayer against a per-token dense reference; stats, aux loss, gradcheck and bad input."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import moe
from moe.experts import LoopExperts
from moe.routers import TopKRouter


def expert_mlp(w_in, w_out, activation, v):
    """One expert on one token vector, written out per activation."""
    h = v @ w_in
    if activation == "swiglu":
        width = w_out.shape[0]
        h = F.silu(h[:width]) * h[width:]
    elif activation == "gelu":
        h = F.gelu(h)
    else:
        h = torch.clamp(h, min=0)
    return h @ w_out


def reference_output(layer, x, activation):
    """Each token's weighted sum over its top-k experts (softmax, renormalised when k > 1), by loops."""
    router = layer.router
    flat = x.reshape(-1, layer.hidden_size)
    logits = flat @ router.gate.weight.T
    probs = logits.softmax(-1)
    out = torch.zeros_like(flat)
    for t in range(flat.shape[0]):
        top = torch.topk(probs[t], router.top_k)
        weights = top.values / top.values.sum() if router.normalize_weights else top.values
        for w, e in zip(weights, top.indices.tolist()):
            out[t] += w * expert_mlp(layer.experts.w_in[e], layer.experts.w_out[e], activation, flat[t])
        if layer.shared_experts is not None:
            shared = layer.shared_experts
            s = expert_mlp(shared.w_in.weight.T, shared.w_out.weight.T, activation, flat[t])
            if layer.shared_expert_gate is not None:
                s = s * torch.sigmoid(flat[t] @ layer.shared_expert_gate.weight[0])
            out[t] += s
    return out.reshape(x.shape)


@pytest.mark.parametrize("experts", ["grouped", "loop"])
@pytest.mark.parametrize("activation", ["swiglu", "gelu", "relu"])
@pytest.mark.parametrize("top_k", [1, 2])
def test_layer_equals_dense_reference(experts, activation, top_k):
    layer = moe.MoELayer(8, 12, 4, top_k=top_k, activation=activation, experts=experts)
    x = torch.randn(2, 5, 8)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), reference_output(layer, x, activation), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("gate", [False, True])
def test_shared_experts_and_their_gate(gate):
    layer = moe.MoELayer(8, 6, 4, top_k=2, activation="gelu", shared_experts=2, shared_expert_gate=gate)
    assert layer.shared_experts.w_out.in_features == 12
    assert (layer.shared_expert_gate is not None) == gate
    x = torch.randn(7, 8)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), reference_output(layer, x, "gelu"), atol=1e-5, rtol=1e-5)
    explicit = moe.MoELayer(8, 6, 4, top_k=2, shared_ffn_hidden_size=10)
    assert explicit.shared_experts.w_out.in_features == 10


@pytest.mark.parametrize("shape", [(8,), (5, 8), (2, 3, 8), (2, 1, 3, 8), (0, 8), (2, 0, 8)])
def test_any_leading_shape_in_same_shape_out(shape):
    layer = moe.MoELayer(8, 16, 4, top_k=2)
    x = torch.randn(shape, requires_grad=True)
    y = layer(x)
    assert y.shape == x.shape
    y.sum().backward()
    assert x.grad.shape == x.shape
    flat = layer(x.detach().reshape(-1, 8))
    torch.testing.assert_close(y.detach().reshape(-1, 8), flat.detach())


def test_empty_input_returns_empty_output_and_zero_stats():
    layer = moe.MoELayer(8, 16, 4, top_k=2, capacity_factor=1.0)
    y = layer(torch.randn(0, 8))
    assert y.shape == (0, 8)
    assert torch.equal(layer.last_stats.tokens_per_expert, torch.zeros(4, dtype=torch.long))
    assert layer.last_stats.dropped_fraction == 0.0
    assert layer.aux_loss.item() == 0.0


def test_tokens_with_no_expert_give_zero():
    layer = moe.MoELayer(8, 16, 4, top_k=1, capacity_factor=0.25, experts="loop")
    x = torch.randn(40, 8)
    routing = layer.router(x)
    y = layer(x)
    routed = torch.zeros(40, dtype=torch.bool)
    routed[routing.token_index] = True
    assert 0 < int(routed.sum()) < 40
    assert torch.equal(y[~routed], torch.zeros(int((~routed).sum()), 8))
    assert bool((y[routed].abs().sum(-1) > 0).all())
    assert layer.last_stats.dropped_fraction == pytest.approx(1 - routed.sum().item() / 40)


def test_last_stats_match_an_independent_count():
    layer = moe.MoELayer(8, 16, 6, top_k=2)
    x = torch.randn(30, 8)
    layer(x)
    probs = (x @ layer.router.gate.weight.detach().T).softmax(-1)
    expected = torch.bincount(probs.topk(2, -1).indices.flatten(), minlength=6)
    assert torch.equal(layer.last_stats.tokens_per_expert, expected)
    assert layer.last_stats.dropped_fraction == 0.0
    assert not layer.last_stats.aux_loss.requires_grad
    torch.testing.assert_close(layer.last_stats.aux_loss, layer.aux_loss.detach())


def test_last_routing_is_the_routing_of_the_last_forward():
    layer = moe.MoELayer(8, 16, 6, top_k=2).eval()
    assert layer.last_routing is None
    for _ in range(2):
        x = torch.randn(2, 5, 8)
        layer(x)
        expected = layer.router(x.reshape(-1, 8), seq_len=5)
        for name in ("token_index", "expert_index", "tokens_per_expert", "weight", "logits", "aux_loss"):
            torch.testing.assert_close(getattr(layer.last_routing, name), getattr(expected, name), msg=name)
    assert layer.last_routing.aux_loss is layer.aux_loss


def test_last_routing_matches_an_independent_top_k():
    layer = moe.MoELayer(8, 16, 6, top_k=2)
    assert layer.last_routing is None
    x = torch.randn(2, 15, 8)
    layer(x)
    probs = (x.reshape(-1, 8) @ layer.router.gate.weight.detach().T).softmax(-1)
    top = probs.topk(2, -1)
    expected = torch.zeros(30, 6).scatter_(1, top.indices, top.values / top.values.sum(-1, keepdim=True))
    routing = layer.last_routing
    dense = torch.zeros(30, 6).index_put_((routing.token_index, routing.expert_index), routing.weight.detach())
    torch.testing.assert_close(dense, expected)
    assert routing.aux_loss is layer.aux_loss


class TwoBlockModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(8, 8)
        self.blocks = nn.ModuleList([moe.MoELayer(8, 16, 4, top_k=2), moe.MoELayer(8, 16, 4, top_k=1)])

    def forward(self, x):
        x = self.embed(x)
        for block in self.blocks:
            x = x + block(x)
        return x


def test_aux_loss_sums_every_layer_and_reaches_both_routers():
    model = TwoBlockModel()
    assert [name for name, _ in moe.moe_layers(model)] == ["blocks.0", "blocks.1"]
    assert moe.aux_loss(model).item() == 0.0  # no forward yet
    model(torch.randn(3, 4, 8))
    total = moe.aux_loss(model)
    torch.testing.assert_close(total, model.blocks[0].aux_loss + model.blocks[1].aux_loss)
    assert total.item() > 0
    total.backward()
    for block in model.blocks:
        assert block.router.gate.weight.grad.abs().sum() > 0


class SkippableModel(TwoBlockModel):
    def forward(self, x, skip_last=False):
        x = self.embed(x)
        for block in self.blocks[:1] if skip_last else self.blocks:
            x = x + block(x)
        return x


def test_aux_loss_counts_only_the_layers_of_the_latest_forward():
    model = SkippableModel()
    x = torch.randn(3, 4, 8)
    model(x)
    torch.testing.assert_close(moe.aux_loss(model), model.blocks[0].aux_loss + model.blocks[1].aux_loss)
    model(x, skip_last=True)  # blocks.1 keeps its loss from the first forward: it must not count
    torch.testing.assert_close(moe.aux_loss(model), model.blocks[0].aux_loss)


def test_aux_loss_counts_each_forward_once():
    model = TwoBlockModel()
    model(torch.randn(3, 4, 8))
    assert moe.aux_loss(model).item() > 0
    assert moe.aux_loss(model).item() == 0.0  # read already: no layer ran since


def test_non_finite_logits_raise_naming_the_layer():
    model = TwoBlockModel()
    moe.name_moe_layers(model)
    bad = torch.randn(4, 8)
    bad[2, 3] = float("nan")
    with pytest.raises(ValueError, match=r"non-finite router logits in layer 'blocks\.0'"):
        model(bad)
    with pytest.raises(FloatingPointError, match=r"'blocks\.1'"):
        model.blocks[1](torch.full((2, 8), float("inf")))


@pytest.mark.parametrize("top_k,activation", [(1, "gelu"), (2, "swiglu")])
def test_gradcheck_float64_through_router_and_experts(activation, top_k):
    layer = moe.MoELayer(3, 2, 3, top_k=top_k, activation=activation, experts="loop", shared_experts=1).double()
    names = ["router.gate.weight", "experts.w_in", "experts.w_out", "shared_experts.w_in.weight"]
    params = dict(layer.named_parameters())
    inputs = tuple(params[name].detach().clone().requires_grad_(True) for name in names)
    x = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)

    def run(x, *weights):
        y = torch.func.functional_call(layer, {**params, **dict(zip(names, weights))}, (x,))
        return y, layer.aux_loss

    assert torch.autograd.gradcheck(run, (x, *inputs), eps=1e-6, atol=1e-6)
    y, _ = run(x, *inputs)
    assert y.dtype == torch.float64
    assert torch.autograd.grad(y.sum(), inputs[0])[0].abs().sum() > 0  # the router's weights learn


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"top_k": 0}, ValueError, r"top_k must be >= 1, got 0"),
        ({"top_k": 5}, ValueError, r"top_k must be in \[1, num_experts=4\], got 5"),
        ({"num_experts": 0}, ValueError, r"num_experts must be >= 1, got 0"),
        ({"capacity_factor": 0.0}, ValueError, r"capacity_factor must be a finite number > 0, got 0.0"),
        ({"capacity_factor": -0.5}, ValueError, r"capacity_factor.*-0.5"),
        ({"router": "nope"}, ValueError, r"unknown router 'nope'; valid: \[.*'topk'.*\]"),
        ({"activation": "tanh"}, ValueError, r"activation must be one of \('gelu', 'relu', 'swiglu'\), got 'tanh'"),
        (
            {"experts": "megablocks"},
            ValueError,
            r"unknown experts implementation 'megablocks'; valid: \['grouped', 'loop'\]",
        ),
        ({"experts": 3}, TypeError, r"experts must be a name"),
        ({"router": 3}, TypeError, r"router must be a name"),
        ({"hidden_size": 2.5}, TypeError, r"hidden_size must be an int"),
        ({"shared_experts": -1}, ValueError, r"shared_experts must be >= 0, got -1"),
        ({"shared_ffn_hidden_size": 0}, ValueError, r"shared_ffn_hidden_size must be >= 1, got 0"),
        ({"shared_expert_gate": True}, ValueError, r"shared_expert_gate=True needs"),
    ],
)
def test_bad_arguments_raise_naming_the_value(kwargs, error, match):
    arguments = {"hidden_size": 8, "ffn_hidden_size": 16, "num_experts": 4, "top_k": 2, **kwargs}
    with pytest.raises(error, match=match):
        moe.MoELayer(**arguments)


def test_router_and_experts_instances_must_fit_the_layer():
    with pytest.raises(TypeError, match="router keyword arguments"):
        moe.MoELayer(8, 16, 4, router=TopKRouter(8, 4, 2), top_k=2)
    with pytest.raises(ValueError, match="router has hidden_size=8, num_experts=5"):
        moe.MoELayer(8, 16, 4, router=TopKRouter(8, 5, 2))
    with pytest.raises(ValueError, match="experts have num_experts=3"):
        moe.MoELayer(8, 16, 4, experts=LoopExperts(3, 8, 16))
    layer = moe.MoELayer(8, 16, 4, router=TopKRouter(8, 4, 1), experts=LoopExperts(4, 8, 16, "relu"))
    assert layer(torch.randn(3, 8)).shape == (3, 8)


def test_wrong_last_dimension_names_hidden_size():
    layer = moe.MoELayer(8, 16, 4, top_k=2)
    with pytest.raises(ValueError, match=r"hidden_size=8, got shape \(3, 7\)"):
        layer(torch.randn(3, 7))


def test_bf16_layer_runs_with_float32_routing():
    layer = moe.MoELayer(8, 16, 4, top_k=2).to(torch.bfloat16)
    x = torch.randn(2, 6, 8, dtype=torch.bfloat16)
    routing = layer.router(x.reshape(-1, 8))
    y = layer(x)
    assert y.dtype == torch.bfloat16 and routing.logits.dtype == torch.float32 and routing.weight.dtype == torch.float32


@pytest.mark.gpu
@pytest.mark.parametrize("router_kwargs", [{}, {"score_function": "sigmoid", "num_groups": 4, "groups_kept": 2}])
def test_dropless_forward_and_backward_do_not_sync_the_host(router_kwargs):
    layer = moe.MoELayer(64, 128, 8, top_k=2, jitter_eps=0.01, bias_update_rate=1e-3, **router_kwargs)
    layer = layer.cuda().to(torch.bfloat16)
    x = torch.randn(4, 32, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    layer(x)  # warm-up outside the checked region
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        y = layer(x)
        (y.float().square().mean() + moe.aux_loss(layer)).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(x.grad.float()).all()


@pytest.mark.gpu
def test_cuda_layer_matches_cpu_layer():
    layer = moe.MoELayer(64, 128, 8, top_k=2, experts="grouped")
    x = torch.randn(50, 64)
    expected = layer(x)
    got = layer.cuda()(x.cuda())
    torch.testing.assert_close(got.cpu(), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", moe.routers.router_names())
def test_every_listed_router_works_in_the_quick_start_or_says_what_it_takes(name):
    """The README's snippet with each router: top_k maps to what the router takes (expert choice: capacity factor
    top_k; BASE and hash: one expert per token), and hash asks for the vocabulary it routes by."""
    torch.manual_seed(0)
    snippet = {"hidden_size": 32, "ffn_hidden_size": 64, "num_experts": 8, "router": name, "top_k": 2}
    if name == "hash":
        with pytest.raises(ValueError, match=r"router 'hash' needs vocab_size="):
            moe.MoELayer(**snippet)
        layer = moe.MoELayer(**snippet, vocab_size=100)
        out = layer(torch.randn(2, 5, 32), token_ids=torch.randint(0, 100, (2, 5)))
    else:
        layer = moe.MoELayer(**snippet)
        out = layer(torch.randn(2, 5, 32))
    assert out.shape == (2, 5, 32) and torch.isfinite(out).all()
    if name in ("base", "hash", "topk", "sinkhorn"):
        assert layer.router.experts_per_token == (1 if name in ("base", "hash") else 2)
    if name == "expert_choice":
        assert layer.router.capacity_factor == 2.0
        assert moe.MoELayer(**{**snippet, "top_k": 3}).router.capacity_factor == 3.0
        assert moe.MoELayer(**snippet, capacity_factor=1.5).router.capacity_factor == 1.5


def test_a_router_name_that_takes_no_top_k_and_is_not_mapped_refuses_it():
    @moe.routers.register_router("test_fixed_one")
    class FixedOne(moe.routers.Router):
        def route(self, x, *, seq_len=None, token_ids=None):
            raise AssertionError("not called")

    try:
        with pytest.raises(TypeError, match=r"router 'test_fixed_one' takes no top_k"):
            moe.routers.build_router("test_fixed_one", 8, 4, top_k=2)
        assert isinstance(moe.routers.build_router("test_fixed_one", 8, 4), FixedOne)
    finally:
        del moe.routers.ROUTERS["test_fixed_one"]
