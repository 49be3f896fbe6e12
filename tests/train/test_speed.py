"""moe.train.speed: activation checkpointing changes memory, not results; compiled blocks train like eager."""

import copy

import pytest
import torch

import moe
from moe.kernel_support import HAVE_TRITON
from moe.model import GPT, ModelConfig
from moe.train.speed import apply_activation_checkpointing, compile_blocks, resolve_dispatch, use_compile


def _model(**overrides):
    shape = dict(seq_len=16, num_layers=2, hidden_size=32, num_heads=2, ffn_hidden_size=32, num_experts=4)
    cfg = ModelConfig(**{**shape, "router_kwargs": {"bias_update_rate": 1e-2}, **overrides})
    torch.manual_seed(0)
    return GPT(cfg)


def _step(model, tokens):
    """(loss, gradients, router loads, elements the forward saved for the backward)."""
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _, loss = model(tokens[:, :-1], tokens[:, 1:])
        total = loss + moe.aux_loss(model)
    saved_elements = sum(saved)
    total.backward()
    loads = [layer.router.step_load.clone() for _, layer in moe.moe_layers(model)]
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}, loads, saved_elements


@pytest.mark.parametrize("mode,wrapped", [("full", 2 * 3), ("experts", 2)])  # per block: experts, shared, attention
def test_activation_checkpointing_gives_the_same_loss_gradients_and_router_loads(mode, wrapped):
    tokens = torch.randint(0, 256, (3, 17), generator=torch.Generator().manual_seed(1))
    plain = _model(shared_experts=1)
    checkpointed = copy.deepcopy(plain)
    assert apply_activation_checkpointing(checkpointed, mode) == wrapped
    want, got = _step(plain, tokens), _step(checkpointed, tokens)
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=0)
    for name, grad in want[1].items():
        torch.testing.assert_close(got[1][name], grad, rtol=1e-6, atol=1e-7, msg=name)
    for a, b in zip(got[2], want[2]):  # routers run once per forward: recompute must not add their loads again
        assert torch.equal(a, b)
    assert set(checkpointed.state_dict()) == set(plain.state_dict())
    assert got[3] < want[3]  # the wrapped modules kept only their inputs


def test_activation_checkpointing_none_and_a_bad_mode():
    assert apply_activation_checkpointing(_model(), "none") == 0
    with pytest.raises(ValueError, match=r"trainer.activation_checkpointing='some' is not valid; valid: \['none'"):
        apply_activation_checkpointing(_model(), "some")


def test_compile_auto_is_on_for_cuda_only():
    assert use_compile("auto", torch.device("cuda", 0)) and not use_compile("auto", torch.device("cpu"))
    assert use_compile("true", torch.device("cpu")) and not use_compile("false", torch.device("cuda", 0))
    with pytest.raises(ValueError, match=r"trainer.compile='yes' is not valid"):
        use_compile("yes", torch.device("cpu"))


def test_dispatch_auto_takes_the_kernels_on_cuda_only():
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert resolve_dispatch("auto", cuda) == ("triton" if HAVE_TRITON else "local")
    assert resolve_dispatch("auto", cpu) == "local"
    assert resolve_dispatch("triton", cpu) == "triton" and resolve_dispatch("local", cuda) == "local"


def test_defaults_are_auto_and_the_trainer_builds_the_chosen_dispatcher():
    from omegaconf import OmegaConf

    from moe.dispatch.fused import FusedDispatcher
    from moe.dispatch.local import LocalDispatcher
    from moe.train import validate
    from moe.train.trainer import _speed_line, build_model

    cfg = validate(OmegaConf.create({}))
    assert (cfg.dispatch.name, cfg.trainer.compile) == ("auto", "auto")
    layers = lambda model: [layer.dispatcher for _, layer in moe.moe_layers(model)]  # noqa: E731
    assert all(type(d) is LocalDispatcher for d in layers(build_model(cfg, 256, "cpu")))
    if HAVE_TRITON:
        assert all(type(d) is FusedDispatcher for d in layers(build_model(cfg, 256, "cuda")))
    line = _speed_line(cfg, torch.device("cpu"))
    assert line.startswith("path: dispatch=local (auto: the Triton kernels need CUDA and triton), torch.compile off")
    on_cuda = _speed_line(cfg, torch.device("cuda", 0))
    assert ("dispatch=triton (auto: CUDA and triton)" in on_cuda) == HAVE_TRITON
    assert "torch.compile per block (trainer.compile=auto)" in on_cuda


def test_compiled_blocks_match_eager_and_keep_the_state_dict():
    # bf16: the fake implementation of torch._grouped_mm, which tracing runs, accepts bf16 only.
    eager = _model().to(torch.bfloat16)
    compiled = copy.deepcopy(eager)
    assert compile_blocks(compiled, backend="aot_eager") == 2
    tokens = torch.randint(0, 256, (2, 17), generator=torch.Generator().manual_seed(2))
    for batch in (tokens, tokens[:1]):
        want, got = eager(batch[:, :-1], batch[:, 1:])[1], compiled(batch[:, :-1], batch[:, 1:])[1]
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)
    assert list(compiled.state_dict()) == list(eager.state_dict())


@pytest.mark.parametrize("moe_every,graphs", [(1, 1), (2, 2)])
def test_compiled_blocks_share_one_graph_per_block_kind(moe_every, graphs):
    """More blocks than Dynamo's default cache of 8 graphs per code object: a per-layer constant (such as a
    layer name in a message) would compile one graph per block and leave the blocks past the 8th eager."""
    compiles = []

    def counting_backend(graph, example_inputs):
        compiles.append(graph)
        return graph.forward

    torch._dynamo.reset()
    model = _model(num_layers=10, moe_every=moe_every).to(torch.bfloat16)  # bf16: the fake torch._grouped_mm
    compile_blocks(model, backend=counting_backend)
    tokens = torch.randint(0, 256, (2, 17), generator=torch.Generator().manual_seed(3))
    _, loss = model(tokens[:, :-1], tokens[:, 1:])
    loss.backward()
    assert len(compiles) == graphs


def test_trainer_switches_and_mfu_in_the_records(corpus, tmp_path):
    """trainer.activation_checkpointing and trainer.compile reach the model; MFU uses trainer.peak_tflops."""
    import json

    from omegaconf import OmegaConf

    from moe.train import train, validate

    cfg = validate(
        OmegaConf.create(
            {
                "data": {
                    "source": "text",
                    "path": str(corpus),
                    "batch_size": 2,
                    "eval_batches": 1,
                    "cache_dir": str(tmp_path / "cache"),
                },
                "model": {"seq_len": 16, "num_layers": 2, "hidden_size": 32, "num_heads": 2, "ffn_hidden_size": 32},
                "trainer": {
                    "max_steps": 2,
                    "log_interval": 1,
                    "eval_interval": 0,
                    "device": "cpu",
                    "activation_checkpointing": "experts",
                    "compile": False,
                    "peak_tflops": 1e-3,
                    "export_safetensors": False,
                },
                "logger": {"progress": "lines"},
            }
        )
    )
    assert cfg.trainer.compile == "false"  # Hydra's bool, read as the mode
    summary = train(cfg, tmp_path / "run")
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if r["kind"] == "train"]
    from moe.train.trainer import build_model

    flops = build_model(cfg, 256).flops_per_token()
    for r in train_records:  # achieved FLOP/s over the 1e-3 TFLOP/s peak given
        assert r["mfu"] == pytest.approx(flops * r["tokens_per_s"] / 1e9, rel=1e-3)
    assert summary["mfu"] == pytest.approx(flops * summary["tokens_per_s"] / 1e9, rel=1e-3)
    with pytest.raises(ValueError, match=r"trainer.compile='sometimes' is not valid"):
        validate(OmegaConf.create({"trainer": {"compile": "sometimes"}}))
    with pytest.raises(ValueError, match=r"trainer.activation_checkpointing='all' is not valid"):
        validate(OmegaConf.create({"trainer": {"activation_checkpointing": "all"}}))


def test_the_end_of_run_sample_decodes_eagerly_with_compiled_blocks(tmp_path):
    """A compiled model would recompile for each new cache length; the sample must not call the compiler."""
    from omegaconf import OmegaConf

    from moe.train import validate
    from moe.train.sample import log_sample
    from moe.train.trainer import build_model

    compiles = []

    def counting_backend(graph, example_inputs):
        compiles.append(graph)
        return graph.forward

    cfg = validate(OmegaConf.create({}))
    model = build_model(cfg, 256).eval().to(torch.bfloat16)  # the fake torch._grouped_mm takes bf16 only
    compile_blocks(model, backend=counting_backend)
    lines = []
    log_sample(model, cfg, tmp_path, lines.append)
    assert lines and lines[0].startswith("sample         greedy, 64 tokens")
    assert compiles == []
    model(torch.zeros(1, 4, dtype=torch.long))  # outside the sample the blocks do compile
    assert compiles
