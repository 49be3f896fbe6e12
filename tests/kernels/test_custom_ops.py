"""The Triton kernels as PyTorch custom operators: opcheck, and a layer with kernels traced by torch.compile.

On a CPU the kernels run under the Triton interpreter (conftest sets TRITON_INTERPRET=1), so these run in CI.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton", reason="the kernels need triton")

import moe  # noqa: E402 (after the importorskip)
from moe.kernels import token_major_index  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Inductor on a GPU (what users run); on the CPU aot_eager, which traces the same forward and backward graphs
# with symbolic sizes in seconds instead of compiling C++ for a minute.
BACKEND = "inductor" if DEVICE == "cuda" else "aot_eager"


def _pairs(num_tokens=7, num_experts=4, top_k=2, width=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    experts = torch.rand(num_tokens, num_experts, generator=g).topk(top_k, dim=1).indices.flatten()
    order = torch.argsort(experts, stable=True)
    token_index = (torch.arange(num_tokens).repeat_interleave(top_k))[order].to(DEVICE)
    rows_by_token, token_ptr = token_major_index(token_index, num_tokens)
    x = torch.randn(num_tokens, width, generator=g).to(DEVICE)
    return x, token_index, rows_by_token, token_ptr


def test_opcheck_permute_and_combine():
    x, token_index, rows_by_token, token_ptr = _pairs()
    x.requires_grad_()
    torch.library.opcheck(torch.ops.moe.permute_rows, (x, rows_by_token, token_ptr, torch.float32))
    y = torch.randn(token_index.numel(), x.shape[1], device=DEVICE, requires_grad=True)
    weight = torch.rand(token_index.numel(), device=DEVICE, requires_grad=True)
    torch.library.opcheck(torch.ops.moe.combine_rows, (y, weight, rows_by_token, token_ptr, torch.float32))


def test_opcheck_row_kernels():
    x, token_index, rows_by_token, token_ptr = _pairs()
    n = token_index.numel()
    scale, other = torch.rand(n, device=DEVICE), torch.randn(n, x.shape[1], device=DEVICE)
    for args in [
        (x, rows_by_token, token_ptr, n, None, None, torch.float32),
        (x, rows_by_token, token_ptr, n, scale, other, torch.float32),
    ]:
        torch.library.opcheck(torch.ops.moe.scatter_rows, args)
    src = torch.randn(n, x.shape[1], device=DEVICE)
    for weight in (None, scale):
        torch.library.opcheck(torch.ops.moe.segment_sum, (src, rows_by_token, token_ptr, weight, torch.float32))


@pytest.mark.parametrize("score_function,normalize,with_bias", [("softmax", True, False), ("sigmoid", False, True)])
def test_opcheck_topk_route(score_function, normalize, with_bias):
    logits = torch.randn(9, 6, device=DEVICE, requires_grad=True)
    bias = torch.randn(6, device=DEVICE) if with_bias else None
    torch.library.opcheck(torch.ops.moe.topk_route, (logits, bias, 2, score_function, normalize, 1.5))


def _layer():
    # bf16: the fake implementation of torch._grouped_mm (what tracing sees) accepts only bf16 inputs.
    return moe.MoELayer(16, 32, 4, router="topk", top_k=2, dispatcher="triton").to(DEVICE, torch.bfloat16)


def test_layer_with_kernels_traces_into_one_graph():
    layer = _layer()
    x = torch.randn(2, 5, 16, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    explanation = torch._dynamo.explain(layer)(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


def test_compiled_layer_with_kernels_matches_eager_for_three_token_counts():
    """Dynamic token counts: AOT autograd traces the ops' fake implementations with symbolic sizes."""
    layer = _layer()
    compiled = torch.compile(layer, backend=BACKEND, dynamic=True, fullgraph=True)
    for batch in (8, 3, 5):
        x = torch.randn(batch, 4, 16, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
        grad = torch.randn_like(x)
        eager_out = layer(x)
        (eager_grad_x,) = torch.autograd.grad(eager_out, x, grad)
        eager_gate = torch.autograd.grad(layer(x), layer.router.gate.weight, grad)[0]
        out = compiled(x)
        grad_x, gate = torch.autograd.grad(out, (x, layer.router.gate.weight), grad)
        torch.testing.assert_close(out, eager_out, rtol=2e-2, atol=3e-2)
        torch.testing.assert_close(grad_x, eager_grad_x, rtol=2e-2, atol=3e-2)
        # The gate gradient sums x_t * dlogits_t over all tokens in bf16, and compiled code sums in another order:
        # compare it as a whole (bf16 keeps 8 bits, 2^-8 = 3.9e-3) rather than element by element, where terms
        # that cancel leave small entries with large relative error.
        assert torch.linalg.vector_norm((gate - eager_gate).float()) <= 2e-2 * torch.linalg.vector_norm(
            eager_gate.float()
        )


@pytest.mark.gpu
def test_gpu_compiled_gpt_with_kernels_trains_like_eager_across_three_batch_shapes():
    """20 AdamW steps, batch 8 / 32 / 16 in turn (Dynamo marks the batch dynamic): compiled losses track eager."""
    import copy

    from moe.model import GPT, ModelConfig

    cfg = ModelConfig(
        seq_len=64, num_layers=2, hidden_size=128, num_heads=4, ffn_hidden_size=256, num_experts=8, dispatcher="triton"
    )
    torch.manual_seed(0)
    eager = GPT(cfg).cuda()
    compiled_model = copy.deepcopy(eager)
    runs = [(eager, eager), (compiled_model, torch.compile(compiled_model))]
    optimizers = [torch.optim.AdamW(m.parameters(), lr=1e-3) for m, _ in runs]
    g = torch.Generator(device="cuda").manual_seed(0)
    losses = [[], []]
    for step in range(20):
        batch = (8, 32, 16)[step % 3]
        x = torch.randint(0, cfg.vocab_size, (batch, cfg.seq_len), device="cuda", generator=g)
        for i, ((model, forward), optimizer) in enumerate(zip(runs, optimizers)):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                _, loss = forward(x[:, :-1], x[:, 1:])
                loss = loss + moe.aux_loss(model)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            moe.update_routers(model)
            losses[i].append(float(loss))
    eager_losses, compiled_losses = torch.tensor(losses[0]), torch.tensor(losses[1])
    assert eager_losses[-1] < eager_losses[0]
    torch.testing.assert_close(compiled_losses, eager_losses, rtol=2e-2, atol=2e-2)


def test_opcheck_half_gate_logits():
    from moe.kernels import half_gate_logits

    x = torch.randn(6, 8, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    weight = torch.randn(4, 8, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    torch.library.opcheck(torch.ops.moe.half_gate_logits, (x, weight))
    logits = half_gate_logits(x, weight)
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits, x.float() @ weight.float().t(), rtol=1e-5, atol=1e-5)


# In a child process: the repository root is the working directory, so it is on sys.path as under `python -m`.
_PROBE_FOR_A_KERNELS_PACKAGE = """
import gc
import sys
from pathlib import Path

import torch

import moe.kernels
from transformers.utils import is_kernels_available

assert not is_kernels_available()  # imports `kernels` to probe for the Hugging Face package of that name
gc.collect()
source = Path(moe.kernels.__file__).parent
copies = {
    module.__name__ for module in list(sys.modules.values())
    if Path(getattr(module, "__file__", None) or "/").parent == source and not module.__name__.startswith("moe.kernels")
}
print(sorted(copies))
src, rows, ptr = torch.randn(3, 4), torch.tensor([1, 0, 2]), torch.tensor([0, 2, 3])
out = moe.kernels.segment_sum(src, rows, ptr)  # the ops moe.kernels registered still dispatch
assert torch.allclose(out, torch.stack([src[0] + src[1], src[2]]))
try:
    import kernels.rows  # noqa: F401
except ImportError as error:
    print(error)
"""


def test_kernel_modules_run_once_when_transformers_probes_for_a_kernels_package():
    """From a checkout, transformers' probe for Hugging Face's ``kernels`` package finds this repository's
    ``kernels/`` folder. It must get ``moe.kernels`` itself: running the modules a second time would define their
    ``moe::`` ops again, and torch frees the definitions that moe.kernels calls (the cause of intermittent
    "schema ... not registered" and ``std::bad_alloc`` errors in full CPU runs). A direct ``import kernels.rows``
    is refused in one line."""
    pytest.importorskip("transformers")
    repo_root = Path(moe.__file__).resolve().parents[1]
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    probe = subprocess.run(
        [sys.executable, "-c", _PROBE_FOR_A_KERNELS_PACKAGE],
        cwd=repo_root,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert probe.returncode == 0, probe.stderr
    copies, refusal = probe.stdout.strip().splitlines()
    assert copies == "[]", f"kernel modules imported a second time: {copies}"
    assert refusal == "import 'kernels.rows' as 'moe.kernels.rows': a second copy would redefine the moe:: ops"
