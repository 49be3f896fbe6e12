"""GroupedExperts (torch._grouped_mm) against the per-expert LoopExperts reference."""

import pytest
import torch

from moe.experts import ACTIVATIONS, DenseMLP, GroupedExperts, LoopExperts, build_experts


def make_pair(activation, num_experts=4, hidden=8, ffn=12):
    grouped = GroupedExperts(num_experts, hidden, ffn, activation)
    loop = LoopExperts(num_experts, hidden, ffn, activation)
    loop.load_state_dict(grouped.state_dict())
    return grouped, loop


def forward_backward(experts, x, counts, upstream):
    x = x.clone().requires_grad_(True)
    experts.zero_grad()
    y = experts(x, counts)
    (y * upstream).sum().backward()
    return y.detach(), x.grad, experts.w_in.grad.clone(), experts.w_out.grad.clone()


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("counts", [[3, 0, 5, 2], [0, 0, 0, 7], [4, 1, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1]])
def test_grouped_equals_loop_forward_and_backward(activation, counts):
    grouped, loop = make_pair(activation)
    counts = torch.tensor(counts)
    x = torch.randn(int(counts.sum()), 8)
    upstream = torch.randn(x.shape[0], 8)
    for got, want in zip(forward_backward(grouped, x, counts, upstream), forward_backward(loop, x, counts, upstream)):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("hidden,ffn", [(5, 3), (4, 6), (1, 1), (7, 9)])
def test_grouped_equals_loop_at_widths_needing_alignment(activation, hidden, ffn):
    grouped, loop = make_pair(activation, hidden=hidden, ffn=ffn)
    counts = torch.tensor([2, 0, 4, 1])
    x = torch.randn(7, hidden)
    upstream = torch.randn(7, hidden)
    for got, want in zip(forward_backward(grouped, x, counts, upstream), forward_backward(loop, x, counts, upstream)):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_grouped_backward_of_plain_sum(activation):
    grouped, loop = make_pair(activation)
    counts = torch.tensor([2, 0, 3, 1])
    x = torch.randn(6, 8)
    for experts in (grouped, loop):
        experts(x, counts).sum().backward()  # an expanded (stride-0) upstream gradient
    torch.testing.assert_close(grouped.w_in.grad, loop.w_in.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grouped.w_out.grad, loop.w_out.grad, atol=1e-5, rtol=1e-5)


def test_each_expert_is_its_own_mlp():
    grouped, _ = make_pair("gelu", num_experts=3)
    counts = torch.tensor([2, 3, 1])
    x = torch.randn(6, 8)
    y = grouped(x, counts)
    start = 0
    for e, n in enumerate(counts.tolist()):
        rows = x[start : start + n]
        expected = torch.nn.functional.gelu(rows @ grouped.w_in[e]) @ grouped.w_out[e]
        torch.testing.assert_close(y[start : start + n], expected.detach(), atol=1e-5, rtol=1e-5)
        start += n


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("hidden,ffn", [(8, 16), (8, 12), (6, 5)])
def test_bf16_runs_and_stays_close_to_float32(activation, hidden, ffn):
    grouped, _ = make_pair(activation, hidden=hidden, ffn=ffn)
    counts = torch.tensor([3, 0, 5, 8])
    x = torch.randn(16, hidden)
    y32 = grouped(x, counts)
    y16 = grouped(x.bfloat16(), counts)
    assert y16.dtype == torch.bfloat16
    torch.testing.assert_close(y16.float(), y32, atol=5e-2, rtol=5e-2)
    y16.float().sum().backward()
    assert grouped.w_in.grad.dtype == torch.float32 and torch.isfinite(grouped.w_in.grad).all()


def test_swiglu_doubles_the_input_projection():
    experts = GroupedExperts(2, 8, 12, "swiglu")
    assert experts.w_in.shape == (2, 8, 24) and experts.w_out.shape == (2, 12, 8)
    assert GroupedExperts(2, 8, 12, "relu").w_in.shape == (2, 8, 12)


def test_dense_mlp_matches_its_formula():
    mlp = DenseMLP(8, 6, "swiglu")
    x = torch.randn(5, 8)
    gate, up = (x @ mlp.w_in.weight.T).chunk(2, -1)
    torch.testing.assert_close(mlp(x), (torch.nn.functional.silu(gate) * up) @ mlp.w_out.weight.T)


def test_bad_names_list_the_valid_choices():
    with pytest.raises(ValueError, match="unknown experts implementation 'megablocks'.*grouped.*loop"):
        build_experts("megablocks", 4, 8, 8, "gelu")
    with pytest.raises(ValueError, match="activation must be one of.*swiglu.*got 'tanh'"):
        GroupedExperts(4, 8, 8, "tanh")
    with pytest.raises(ValueError, match="num_experts must be >= 1, got 0"):
        GroupedExperts(0, 8, 8, "gelu")


@pytest.mark.gpu
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_grouped_equals_loop_on_cuda_in_bf16(activation):
    grouped, loop = make_pair(activation, hidden=64, ffn=128)
    grouped, loop = grouped.cuda().to(torch.bfloat16), loop.cuda().to(torch.bfloat16)
    counts = torch.tensor([40, 0, 24, 1], device="cuda")
    x = torch.randn(65, 64, device="cuda", dtype=torch.bfloat16)
    upstream = torch.randn(65, 64, device="cuda", dtype=torch.bfloat16)
    for got, want in zip(forward_backward(grouped, x, counts, upstream), forward_backward(loop, x, counts, upstream)):
        torch.testing.assert_close(got.float(), want.float(), atol=3e-2, rtol=3e-2)


def test_grouped_runs_in_the_autocast_dtype():
    # Under autocast the residual stream stays float32; the experts must still run their GEMMs in bf16.
    experts = GroupedExperts(3, 16, 32, "swiglu")
    x = torch.randn(10, 16)
    counts = torch.tensor([4, 0, 6])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = experts(x, counts)
    assert out.dtype == torch.bfloat16
    reference = experts(x.bfloat16(), counts)
    torch.testing.assert_close(out, reference)
