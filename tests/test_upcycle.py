"""Sparse upcycling and Drop-Upcycling, of moe's GPT and of Hugging Face Llama / Mistral models."""

import pytest
import torch

from moe.model import GPT, ModelConfig
from moe.upcycle import upcycle

DENSE = ModelConfig(
    vocab_size=40, seq_len=12, num_layers=2, hidden_size=16, num_heads=2, ffn_hidden_size=24, moe_every=0
)


def dense_model():
    torch.manual_seed(0)
    return GPT(DENSE).eval()


@pytest.mark.parametrize("top_k, router_kwargs", [(2, {}), (1, {"normalize_weights": True}), (3, {})])
def test_upcycled_logits_equal_the_dense_model_at_initialisation(top_k, router_kwargs):
    dense = dense_model()
    moe_model = upcycle(dense, num_experts=4, top_k=top_k, router_kwargs=router_kwargs).eval()
    assert moe_model.cfg.moe_every == 1 and moe_model.cfg.num_experts == 4 and moe_model.cfg.top_k == top_k
    idx = torch.randint(0, 40, (3, 12))
    torch.testing.assert_close(moe_model(idx)[0], dense(idx)[0], rtol=1e-5, atol=1e-5)
    layer = moe_model.blocks[0].ffn
    for e in range(4):
        torch.testing.assert_close(layer.experts.w_in[e], dense.blocks[0].ffn.w_in.weight.T, rtol=0, atol=0)
        torch.testing.assert_close(layer.experts.w_out[e], dense.blocks[0].ffn.w_out.weight.T, rtol=0, atol=0)
    other_seed = upcycle(dense, num_experts=4, top_k=top_k, router_kwargs=router_kwargs, seed=1)
    assert not torch.equal(other_seed.blocks[0].ffn.router.gate.weight, layer.router.gate.weight)


def test_drop_upcycling_redraws_the_requested_fraction_of_each_experts_units():
    dense = dense_model()
    dropped = upcycle(dense, num_experts=3, top_k=2, drop_fraction=0.5, seed=3).eval()
    idx = torch.randint(0, 40, (2, 12))
    assert not torch.allclose(dropped(idx)[0], dense(idx)[0], rtol=1e-3, atol=1e-3)
    source = dense.blocks[1].ffn
    experts = dropped.blocks[1].ffn.experts
    changed_sets = []
    for e in range(3):
        w_in = experts.w_in[e]
        gate_changed = (w_in[:, :24] != source.w_in.weight.T[:, :24]).any(0)
        up_changed = (w_in[:, 24:] != source.w_in.weight.T[:, 24:]).any(0)
        out_changed = (experts.w_out[e] != source.w_out.weight.T).any(1)
        assert torch.equal(gate_changed, up_changed) and torch.equal(gate_changed, out_changed)
        assert int(gate_changed.sum()) == 12
        changed_sets.append(frozenset(gate_changed.nonzero().flatten().tolist()))
    assert len(set(changed_sets)) > 1  # experts draw their own units
    again = upcycle(dense, num_experts=3, top_k=2, drop_fraction=0.5, seed=3)
    assert torch.equal(again.blocks[1].ffn.experts.w_in, experts.w_in)


def test_upcycling_refuses_a_moe_source_and_bad_fractions():
    dense = dense_model()
    moe_model = upcycle(dense, num_experts=2, top_k=2)
    with pytest.raises(ValueError, match="moe_every"):
        upcycle(moe_model, num_experts=2, top_k=2)
    with pytest.raises(ValueError, match="drop_fraction"):
        upcycle(dense, num_experts=2, top_k=2, drop_fraction=1.5)


transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize("kind", ["llama", "mistral"])
def test_hf_dense_model_upcycles_to_mixtral_with_equal_logits(kind, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, MixtralForCausalLM

    from moe.upcycle_hf import upcycle_hf

    config_cls, model_cls = (LlamaConfig, LlamaForCausalLM) if kind == "llama" else (MistralConfig, MistralForCausalLM)
    torch.manual_seed(0)
    config = config_cls(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    dense = model_cls(config).eval()
    moe_model = upcycle_hf(dense, num_experts=4, top_k=2).eval()
    assert isinstance(moe_model, MixtralForCausalLM)
    assert moe_model.config.num_local_experts == 4 and moe_model.config.num_experts_per_tok == 2
    idx = torch.randint(0, 64, (2, 10))
    with torch.no_grad():
        expected = dense(idx).logits
        torch.testing.assert_close(moe_model(idx).logits, expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(moe_model.model.embed_tokens.weight, dense.model.embed_tokens.weight, rtol=0, atol=0)
        moe_model.save_pretrained(tmp_path / "mixtral")
        loaded = MixtralForCausalLM.from_pretrained(tmp_path / "mixtral").eval()
        torch.testing.assert_close(loaded(idx).logits, expected, rtol=1e-5, atol=1e-5)
        dropped = upcycle_hf(dense, num_experts=4, top_k=2, drop_fraction=0.5).eval()
        assert not torch.allclose(dropped(idx).logits, expected, rtol=1e-3, atol=1e-3)
    with pytest.raises(TypeError, match="LlamaForCausalLM"):
        upcycle_hf(moe_model, num_experts=4)
