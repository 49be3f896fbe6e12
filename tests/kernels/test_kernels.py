"""Triton kernels against the pure-torch path: under the interpreter on CPU, at bf16 tolerance on a GPU."""

import importlib.util

import pytest
import torch

import moe
from moe.dispatch import LocalDispatcher
from moe.dispatch.fused import FusedDispatcher
from moe.layer import MoELayer
from moe.routers.topk import TopKRouter
from moe.routing import group_by_expert

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None, reason="triton is not installed (pip install -e .[dev])"
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _kernels():
    import moe.kernels

    return moe.kernels


def _random_routing(num_tokens, num_experts, pairs_per_token, device=DEVICE):
    """A routing where token t has ``pairs_per_token[t]`` distinct experts (0 allowed), random weights."""
    tokens, experts = [], []
    for t, n in enumerate(pairs_per_token):
        tokens += [t] * n
        experts += torch.randperm(num_experts)[:n].tolist()
    token_index = torch.tensor(tokens, dtype=torch.long, device=device)
    expert_index = torch.tensor(experts, dtype=torch.long, device=device)
    weight = torch.rand(len(tokens), device=device, requires_grad=True)
    logits = torch.zeros(num_tokens, num_experts, device=device)
    return group_by_expert(token_index, expert_index, weight, logits, logits.new_zeros(()))


def test_scatter_rows_matches_indexing_with_scale_and_dot():
    k = _kernels()
    src = torch.randn(4, 1030, device=DEVICE)  # width over one 1024 block
    token_of_row = torch.tensor([3, 0, 2, 3, 0, 0], device=DEVICE)
    rows_by_token, ptr = k.token_major_index(token_of_row, 4)
    scale = torch.randn(6, device=DEVICE)
    other = torch.randn(6, 1030, device=DEVICE)
    out, dot = k.scatter_rows(src, rows_by_token, ptr, 6, scale=scale, other=other)
    torch.testing.assert_close(out, src[token_of_row] * scale[:, None])
    torch.testing.assert_close(dot, (src[token_of_row] * other).sum(1))
    plain, none = k.scatter_rows(src, rows_by_token, ptr, 6, out_dtype=torch.bfloat16)
    assert none is None and plain.dtype == torch.bfloat16
    torch.testing.assert_close(plain, src[token_of_row].bfloat16())


def test_segment_sum_matches_loop_including_empty_segments():
    k = _kernels()
    src = torch.randn(9, 1030, device=DEVICE)  # width over one 1024 block
    rows = torch.tensor([4, 0, 8, 2, 1, 7, 3, 5, 6], device=DEVICE)
    ptr = torch.tensor([0, 2, 2, 5, 9, 9], device=DEVICE)
    weight = torch.randn(9, device=DEVICE)
    out = k.segment_sum(src, rows, ptr, weight=weight)
    expected = torch.stack(
        [
            sum((weight[r] * src[r] for r in rows[ptr[t] : ptr[t + 1]].tolist()), torch.zeros(1030, device=DEVICE))
            for t in range(5)
        ]
    )
    torch.testing.assert_close(out, expected)
    assert out[1].eq(0).all() and out[4].eq(0).all()


def test_token_major_index_lists_each_tokens_rows_in_order():
    k = _kernels()
    routing = _random_routing(6, 5, [2, 0, 3, 1, 0, 5])
    rows_by_token, ptr = k.token_major_index(routing.token_index, 6)
    for t in range(6):
        mine = rows_by_token[ptr[t] : ptr[t + 1]]
        expected = (routing.token_index == t).nonzero().flatten()
        assert torch.equal(mine, expected)


@pytest.mark.parametrize("pairs", [[2, 2, 2, 2, 2, 2, 2, 2], [1, 0, 4, 2, 0, 3, 1, 4]])
def test_fused_dispatcher_matches_local_forward_and_backward(pairs):
    num_tokens, hidden, num_experts = len(pairs), 24, 4
    routing = _random_routing(num_tokens, num_experts, pairs)
    x = torch.randn(num_tokens, hidden, device=DEVICE, requires_grad=True)
    experts = torch.randn(num_experts, hidden, hidden, device=DEVICE)

    def run(dispatcher):
        d = dispatcher.permute(x, routing)
        expert_index = routing.expert_index
        y = torch.bmm(d.rows.unsqueeze(1), experts[expert_index]).squeeze(1)
        out = dispatcher.combine(y, d, routing)
        cotangent = torch.linspace(-1, 1, out.numel(), device=DEVICE).view_as(out)
        grads = torch.autograd.grad((out * cotangent).sum(), (x, routing.weight))
        return out, grads

    fused_out, fused_grads = run(FusedDispatcher(num_experts))
    ref_out, ref_grads = run(LocalDispatcher(num_experts))
    torch.testing.assert_close(fused_out, ref_out)
    for got, want in zip(fused_grads, ref_grads):
        torch.testing.assert_close(got, want)


def test_fused_dispatcher_is_bitwise_deterministic_and_casts():
    routing = _random_routing(10, 4, [3] * 10)
    x = torch.randn(10, 16, device=DEVICE, requires_grad=True)
    dispatcher = FusedDispatcher(4, expert_dtype=torch.bfloat16)
    results = []
    for _ in range(2):
        d = dispatcher.permute(x, routing)
        assert d.rows.dtype == torch.bfloat16
        out = dispatcher.combine(d.rows * 3, d, routing)
        assert out.dtype == torch.float32
        (gx,) = torch.autograd.grad(out.sum(), x)
        results.append((out, gx))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


@pytest.mark.parametrize(
    "score_function, normalize, scale, bias",
    [("softmax", True, 1.0, False), ("softmax", False, 1.0, False), ("sigmoid", True, 2.5, True)],
)
def test_topk_route_matches_torch(score_function, normalize, scale, bias):
    k = _kernels()
    num_tokens, num_experts, top_k = 37, 12, 3
    logits = torch.randn(num_tokens, num_experts, device=DEVICE, requires_grad=True)
    expert_bias = torch.randn(num_experts, device=DEVICE) * 0.1 if bias else None
    weights, chosen, counts = k.topk_route(logits, top_k, score_function, normalize, scale, expert_bias)

    scores = logits.softmax(-1) if score_function == "softmax" else logits.sigmoid()
    selection = scores.detach() + (expert_bias if bias else 0)
    ref_chosen = selection.topk(top_k, dim=-1).indices
    ref_weights = scores.gather(1, ref_chosen)
    if normalize:
        ref_weights = ref_weights / ref_weights.sum(-1, keepdim=True)
    ref_weights = ref_weights * scale
    assert torch.equal(chosen.long(), ref_chosen)
    assert torch.equal(counts.long(), torch.bincount(ref_chosen.flatten(), minlength=num_experts))
    torch.testing.assert_close(weights, ref_weights)
    cotangent = torch.randn_like(weights)
    (got,) = torch.autograd.grad((weights * cotangent).sum(), logits)
    (want,) = torch.autograd.grad((ref_weights * cotangent).sum(), logits)
    torch.testing.assert_close(got, want)


def test_fused_router_gives_the_same_routing_and_losses_as_topk_router():
    torch.manual_seed(1)
    fused = TopKRouter(16, 8, top_k=2, z_loss_coef=1e-3).to(DEVICE)
    fused.triton_topk = True
    plain = TopKRouter(16, 8, top_k=2, z_loss_coef=1e-3).to(DEVICE)
    plain.load_state_dict(fused.state_dict())
    x = torch.randn(30, 16, device=DEVICE)
    assert fused.uses_triton_selection(x)
    a, b = fused(x), plain(x)
    for name in ("token_index", "expert_index", "tokens_per_expert"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    torch.testing.assert_close(a.weight, b.weight)
    torch.testing.assert_close(a.aux_loss, b.aux_loss)


def test_layer_with_kernels_matches_plain_layer():
    torch.manual_seed(2)
    fast = MoELayer(16, 32, 4, top_k=2, activation="gelu", dispatcher="triton").to(DEVICE)
    slow = MoELayer(16, 32, 4, top_k=2, activation="gelu").to(DEVICE)
    slow.load_state_dict(fast.state_dict())
    assert isinstance(fast.dispatcher, FusedDispatcher)
    x = torch.randn(2, 9, 16, device=DEVICE)
    outs = []
    for layer in (fast, slow):
        out = layer(x)
        (out.square().sum() + layer.aux_loss).backward()
        outs.append(out)
    torch.testing.assert_close(outs[0], outs[1])
    for (name, p), q in zip(fast.named_parameters(), slow.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name)


def test_kernels_switch_rejects_an_explicit_dispatcher():
    with pytest.raises(ValueError, match="kernels"):
        MoELayer(16, 32, 4, top_k=2, kernels=True, dispatcher=LocalDispatcher(4))


@pytest.mark.gpu
@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_gpu_bf16_layer_agrees_and_never_syncs(activation):
    torch.manual_seed(3)
    fast = MoELayer(256, 512, 16, top_k=4, activation=activation, dispatcher="triton").cuda().bfloat16()
    slow = MoELayer(256, 512, 16, top_k=4, activation=activation).cuda().bfloat16()
    slow.load_state_dict(fast.state_dict())
    x = torch.randn(4, 512, 256, device="cuda", dtype=torch.bfloat16)
    fast(x).sum().backward()  # compile the kernels before the sync check
    fast.zero_grad()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out_fast = fast(x)
        out_fast.float().square().mean().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    out_slow = slow(x)
    out_slow.float().square().mean().backward()
    rel = (out_fast.float() - out_slow.float()).norm() / out_slow.float().norm()
    assert rel < 1e-2, rel
    for (name, p), q in zip(fast.named_parameters(), slow.parameters()):
        rel = (p.grad.float() - q.grad.float()).norm() / q.grad.float().norm()
        assert rel < 2e-2, (name, rel)


@pytest.mark.gpu
def test_gpu_layer_with_kernels_captures_in_a_cuda_graph():
    layer = MoELayer(128, 256, 8, top_k=2, activation="gelu", dispatcher="triton").cuda().bfloat16()
    x = torch.randn(256, 128, device="cuda", dtype=torch.bfloat16)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            layer(x)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(graph):
        out = layer(x)
    x.copy_(torch.randn_like(x))
    graph.replay()
    with torch.no_grad():
        torch.testing.assert_close(out, layer(x))


@pytest.mark.gpu
def test_gpu_layer_with_kernels_under_torch_compile():
    torch.manual_seed(4)
    layer = MoELayer(128, 256, 8, top_k=2, activation="gelu", dispatcher="triton").cuda().bfloat16()
    x = torch.randn(512, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    compiled = torch.compile(layer)
    out = compiled(x)
    (gx,) = torch.autograd.grad(out.float().sum(), x)
    ref = layer(x)
    (ref_gx,) = torch.autograd.grad(ref.float().sum(), x)
    # bf16 tolerance as a relative norm: Inductor fuses the router's float32 maths and rounds to bf16 once where
    # eager rounds per op, so single elements near zero differ by a few bf16 ulps (seen: 1.6% by up to 3.5e-3).
    for got, want in ((out, ref), (gx, ref_gx)):
        rel = (got.float() - want.float()).norm() / want.float().norm()
        assert rel < 1e-2, rel


@pytest.mark.gpu
def test_gpu_half_gate_logits_match_float32_logits():
    fused = TopKRouter(512, 64, top_k=6).cuda().bfloat16()
    fused.triton_topk = True
    plain = TopKRouter(512, 64, top_k=6).cuda().bfloat16()
    plain.load_state_dict(fused.state_dict())
    x = torch.randn(1024, 512, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    grads = []
    for router in (fused, plain):
        logits = router.compute_logits(x)
        assert logits.dtype == torch.float32
        grads.append((logits, *torch.autograd.grad((logits * logits.detach().cos()).sum(), (x, router.gate.weight))))
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=1e-5, atol=1e-5)  # float32 sums, other order
    for got, want in zip(grads[0][1:], grads[1][1:]):  # bf16 gradients: one bf16 rounding apart at most
        torch.testing.assert_close(got, want, rtol=1.6e-2, atol=1e-3)


def test_fused_dispatcher_falls_back_to_torch_where_kernels_cannot_run(monkeypatch):
    import moe.dispatch.fused as fused_module

    monkeypatch.setattr(fused_module, "kernels_usable", lambda x: False)
    routing = _random_routing(7, 3, [1, 2, 0, 3, 1, 2, 2])
    x = torch.randn(7, 8, device=DEVICE)
    dispatcher = FusedDispatcher(3, expert_dtype=torch.bfloat16)
    d = dispatcher.permute(x, routing)
    assert d.rows.dtype == torch.bfloat16
    torch.testing.assert_close(d.rows, x[routing.token_index].bfloat16())
    out = dispatcher.combine(d.rows.float(), d, routing)
    ref = LocalDispatcher(3).combine(x[routing.token_index].bfloat16().float(), d, routing)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref)


def test_fused_router_with_capacity_uses_the_parent_path():
    fused = TopKRouter(16, 4, top_k=2, capacity_factor=0.5).to(DEVICE)
    fused.triton_topk = True
    plain = TopKRouter(16, 4, top_k=2, capacity_factor=0.5).to(DEVICE)
    plain.load_state_dict(fused.state_dict())
    x = torch.randn(20, 16, device=DEVICE)
    a, b = fused(x), plain(x)
    assert a.dropped_fraction > 0
    assert torch.equal(a.token_index, b.token_index) and torch.equal(a.expert_index, b.expert_index)


def test_bad_arguments_are_rejected():
    k = _kernels()
    with pytest.raises(ValueError, match="score_function"):
        k.topk_route(torch.randn(4, 3, device=DEVICE), 1, "relu")
    with pytest.raises(ValueError, match="top_k"):
        k.topk_route(torch.randn(4, 3, device=DEVICE), 4)
    with pytest.raises(TypeError, match="expert_dtype"):
        FusedDispatcher(4, expert_dtype="bf16")


def test_triton_topk_with_bias_update_matches_the_torch_path():
    torch.manual_seed(5)
    fast = MoELayer(16, 32, 4, top_k=2, bias_update_rate=1e-2, dispatcher="triton").to(DEVICE).train()
    slow = MoELayer(16, 32, 4, top_k=2, bias_update_rate=1e-2).to(DEVICE).train()
    slow.load_state_dict(fast.state_dict())
    for _ in range(3):
        x = torch.randn(24, 16, device=DEVICE)
        assert fast.router.uses_triton_selection(x) and not slow.router.uses_triton_selection(x)
        for layer in (fast, slow):
            layer(x)
            moe.update_routers(layer)
        assert torch.equal(fast.router.expert_bias, slow.router.expert_bias)
    assert fast.router.expert_bias.abs().sum() > 0
