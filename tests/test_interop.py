"""moe.interop: transformers Mixtral / Qwen2-MoE blocks <-> MoELayer, and whole-model compression."""

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="transformers is not installed (pip install -e .[hf])")
pytest.importorskip("scipy", reason="moe.compress merging needs scipy")

from transformers import MixtralConfig, MixtralForCausalLM, Qwen2MoeConfig, Qwen2MoeForCausalLM  # noqa: E402 (after the importorskip calls)
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock  # noqa: E402 (after the importorskip calls)
from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock  # noqa: E402 (after the importorskip calls)

import moe  # noqa: E402 (after the importorskip calls)
from moe import interop  # noqa: E402 (after the importorskip calls)

SMALL = {
    "hidden_size": 32,
    "intermediate_size": 48,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 64,
    "num_experts_per_tok": 2,
}


def mixtral_config():
    return MixtralConfig(num_local_experts=6, **SMALL)


def qwen_config(norm_topk_prob):
    return Qwen2MoeConfig(
        num_experts=6,
        moe_intermediate_size=24,
        shared_expert_intermediate_size=40,
        norm_topk_prob=norm_topk_prob,
        **SMALL,
    )


def randomised(block):
    """HF initialises some weights to zero (Qwen's router); give every parameter random values."""
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.3)
    return block.eval()


def blocks():
    return [
        ("mixtral", randomised(MixtralSparseMoeBlock(mixtral_config()))),
        ("qwen", randomised(Qwen2MoeSparseMoeBlock(qwen_config(False)))),
        ("qwen_norm", randomised(Qwen2MoeSparseMoeBlock(qwen_config(True)))),
    ]


@pytest.mark.parametrize("name,block", blocks())
@torch.no_grad()
def test_block_round_trip_changes_no_output(name, block):
    x = torch.randn(2, 9, 32)
    reference = block(x.clone())
    layer = interop.from_hf_block(block)
    assert isinstance(layer, moe.MoELayer) and layer.num_experts == 6
    torch.testing.assert_close(layer(x), reference, rtol=1e-5, atol=1e-5)
    back = interop.to_hf_block(layer, like=block)
    assert type(back) is type(block)
    torch.testing.assert_close(back(x.clone()), reference, rtol=1e-5, atol=1e-5)
    if name != "mixtral":
        assert back.gate.norm_topk_prob == block.gate.norm_topk_prob


@torch.no_grad()
def test_pruned_and_merged_layers_export_to_the_same_function():
    _, block = blocks()[0]
    x = torch.randn(2, 9, 32)
    layer = interop.from_hf_block(block)
    moe.compress.keep_experts(layer, [0, 2, 3, 5])
    exported = interop.to_hf_block(layer, like=block)
    assert exported.experts.num_experts == exported.gate.num_experts == 4
    torch.testing.assert_close(exported(x.clone()), layer(x), rtol=1e-5, atol=1e-5)
    layer = interop.from_hf_block(block)
    moe.compress.merge_groups(layer, [[0, 4], [1], [2, 3, 5]], torch.arange(1.0, 7.0))
    exported = interop.to_hf_block(layer, like=block)
    torch.testing.assert_close(exported(x.clone()), layer(x), rtol=1e-5, atol=1e-5)


def test_unsupported_routing_and_blocks_raise():
    _, block = blocks()[0]
    layer = moe.MoELayer(32, 48, 6, top_k=2, score_function="sigmoid")
    with pytest.raises(ValueError, match="score_function"):
        interop.to_hf_block(layer, like=block)
    with pytest.raises(TypeError, match="unsupported block"):
        interop.from_hf_block(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("family", ["mixtral", "qwen"])
@torch.no_grad()
def test_compress_whole_model_and_save_pretrained(family, tmp_path):
    torch.manual_seed(0)
    if family == "mixtral":
        model = MixtralForCausalLM(mixtral_config()).eval()
    else:
        model = Qwen2MoeForCausalLM(qwen_config(False)).eval()
        for layer in model.model.layers:
            torch.nn.init.normal_(layer.mlp.gate.weight, std=0.3)
    ids = torch.randint(0, 64, (2, 12))
    batches = [torch.randint(0, 64, (2, 12)) for _ in range(2)]
    kept = interop.compress_hf_model(model, batches, "prune", "frequency", 4)
    assert all(len(k) == 4 for k in kept.values())
    count_key = "num_local_experts" if family == "mixtral" else "num_experts"
    assert getattr(model.config, count_key) == 4
    out = model(ids).logits
    model.save_pretrained(tmp_path)
    loaded = type(model).from_pretrained(tmp_path).eval()
    assert getattr(loaded.config, count_key) == 4
    torch.testing.assert_close(loaded(ids).logits, out, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_failed_compression_leaves_the_model_unchanged():
    torch.manual_seed(0)
    model = MixtralForCausalLM(mixtral_config()).eval()
    ids = torch.randint(0, 64, (2, 12))
    before = model(ids).logits
    with pytest.raises(ValueError, match="top_k=2"):
        interop.compress_hf_model(model, [ids], "prune", "frequency", 1)
    assert type(model.model.layers[0].mlp) is MixtralSparseMoeBlock
    torch.testing.assert_close(model(ids).logits, before)
