"""Sparse upcycling of a Hugging Face dense decoder (Llama / Mistral) into a Mixtral MoE."""

from __future__ import annotations

import torch
from torch import nn

from moe.upcycle import check_drop_fraction
from moe.validation import check_positive_int, check_top_k

DENSE_KINDS = ("LlamaForCausalLM", "MistralForCausalLM")
# Config keys that Mixtral shares with Llama / Mistral and that carry over unchanged.
SHARED_KEYS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "hidden_act",
    "max_position_embeddings",
    "initializer_range",
    "rms_norm_eps",
    "rope_parameters",
    "sliding_window",
    "attention_dropout",
    "tie_word_embeddings",
    "pad_token_id",
    "bos_token_id",
    "eos_token_id",
)


def mixtral_config(dense_config, num_experts: int, top_k: int):
    """A ``MixtralConfig`` with the dense model's shape and ``num_experts`` experts of its MLP width."""
    from transformers import MixtralConfig

    for key in ("attention_bias", "mlp_bias"):
        if getattr(dense_config, key, False):
            raise ValueError(f"{key}=True has no Mixtral equivalent (Mixtral has no attention or MLP biases)")
    if getattr(dense_config, "pretraining_tp", 1) != 1:
        raise ValueError(f"pretraining_tp={dense_config.pretraining_tp} is not supported; it must be 1")
    values = {key: getattr(dense_config, key) for key in SHARED_KEYS if hasattr(dense_config, key)}
    return MixtralConfig(**values, num_local_experts=num_experts, num_experts_per_tok=top_k, router_jitter_noise=0.0)


@torch.no_grad()
def upcycle_hf(dense: nn.Module, num_experts: int, top_k: int = 2, drop_fraction: float = 0.0, seed: int = 0):
    """A ``MixtralForCausalLM`` whose embeddings, attention and norms are ``dense``'s and whose every expert
    is a copy of the dense layer's MLP; routers (``gate``) are drawn from N(0, initializer_range).

    ``dense``: a ``LlamaForCausalLM`` or ``MistralForCausalLM``. Mixtral renormalises its top-k weights,
    so at ``drop_fraction=0`` the logits equal ``dense``'s. ``drop_fraction`` > 0: Drop-Upcycling, each
    expert re-initialises that fraction of its hidden units (gate, up and down weights of the unit,
    redrawn from the matrix's mean and std). Save with ``save_pretrained``; nothing is downloaded.
    Cost: E copies of every MLP.
    """
    from transformers import MixtralForCausalLM

    kind = type(dense).__name__
    if kind not in DENSE_KINDS:
        raise TypeError(f"upcycle_hf takes one of {DENSE_KINDS}, got {kind}")
    check_positive_int("num_experts", num_experts)
    check_top_k(top_k, num_experts)
    drop_fraction = check_drop_fraction(drop_fraction)
    config = mixtral_config(dense.config, num_experts, top_k)
    parameter = next(dense.parameters())
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        moe = MixtralForCausalLM(config).to(device=parameter.device, dtype=parameter.dtype)
    moe_state = moe.state_dict()
    for name, tensor in dense.state_dict().items():
        if ".mlp." not in name:
            moe_state[name].copy_(tensor)
    ffn = config.intermediate_size
    for dense_layer, moe_layer in zip(dense.model.layers, moe.model.layers):
        mlp, experts = dense_layer.mlp, moe_layer.mlp.experts
        gate_up = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight])  # (2F, H), gate first as Mixtral
        experts.gate_up_proj.copy_(gate_up.expand_as(experts.gate_up_proj))
        experts.down_proj.copy_(mlp.down_proj.weight.expand_as(experts.down_proj))
        if drop_fraction > 0:
            _drop_units(experts, ffn, round(drop_fraction * ffn), generator)
    moe.train(dense.training)
    return moe


def _drop_units(experts: nn.Module, ffn: int, count: int, generator: torch.Generator) -> None:
    """Redraw ``count`` random hidden units of every Mixtral expert from its matrices' statistics."""
    if count == 0:
        return
    for e in range(experts.gate_up_proj.shape[0]):
        units = torch.randperm(ffn, generator=generator)[:count]
        for half in range(2):
            rows = experts.gate_up_proj[e, half * ffn : (half + 1) * ffn]
            fresh = torch.randn(count, rows.shape[1], generator=generator)
            rows[units.to(rows.device)] = (fresh * rows.float().std() + rows.float().mean()).to(rows)
        down = experts.down_proj[e]
        fresh = torch.randn(down.shape[0], count, generator=generator)
        down[:, units.to(down.device)] = (fresh * down.float().std() + down.float().mean()).to(down)
