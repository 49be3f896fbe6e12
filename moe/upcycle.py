"""Sparse upcycling (Komatsuzaki et al. 2023) and Drop-Upcycling (Nakamura et al. 2025) of a dense ``GPT``.

Every dense MLP becomes an MoE layer of E copies of itself with a freshly initialised router; with a
router whose weights sum to 1 per token (renormalised top-k) the upcycled model computes exactly the
dense model's function at initialisation. Drop-Upcycling re-initialises a fraction of each expert's
hidden units so that the copies can diverge.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from moe.experts import DenseMLP
from moe.layer import MoELayer
from moe.model import GPT, ModelConfig

# The fields that may differ between the dense source and the upcycled model.
MOE_FIELDS = ("num_experts", "top_k", "moe_every", "shared_experts", "router", "router_kwargs", "experts", "kernels")


def check_drop_fraction(drop_fraction) -> float:
    """``drop_fraction`` as a float in [0, 1], else a ValueError naming it."""
    if isinstance(drop_fraction, bool) or not isinstance(drop_fraction, (int, float)) or not 0 <= drop_fraction <= 1:
        raise ValueError(f"drop_fraction must be a number in [0, 1], got {drop_fraction!r}")
    return float(drop_fraction)


def upcycled_config(dense: ModelConfig, num_experts: int, top_k: int, router: str = "topk", **kwargs) -> ModelConfig:
    """The MoE config of ``dense`` with E experts of the dense MLP's width in every layer."""
    if dense.moe_every != 0:
        raise ValueError(f"upcycling needs a dense model (moe_every=0), got moe_every={dense.moe_every}")
    return dataclasses.replace(dense, moe_every=1, num_experts=num_experts, top_k=top_k, router=router, **kwargs)


def differing_fields(a: ModelConfig, b: ModelConfig) -> str:
    """The fields outside ``MOE_FIELDS`` where ``a`` and ``b`` differ, as "name: a vs b; ..." ("" if none)."""
    return "; ".join(
        f"{f.name}: {getattr(a, f.name)!r} vs {getattr(b, f.name)!r}"
        for f in dataclasses.fields(ModelConfig)
        if f.name not in MOE_FIELDS and getattr(a, f.name) != getattr(b, f.name)
    )


@torch.no_grad()
def drop_hidden_units(layer: MoELayer, drop_fraction: float, generator: torch.Generator) -> None:
    """Re-initialise ``round(r * F)`` random hidden units of every expert of ``layer`` (Drop-Upcycling).

    Each expert draws its own units; a unit's input column(s) (gate and up for SwiGLU) and output row
    are redrawn from N(mean, std) of the matrix they belong to, measured before the drop.
    """
    experts = layer.experts
    ffn = experts.ffn_hidden_size
    count = round(drop_fraction * ffn)
    if count == 0:
        return
    halves = 2 if experts.activation == "swiglu" else 1
    for e in range(experts.num_experts):
        units = torch.randperm(ffn, generator=generator)[:count].to(experts.w_in.device)
        for half in range(halves):
            block = experts.w_in[e, :, half * ffn : (half + 1) * ffn]
            fresh = torch.randn(block.shape[0], count, generator=generator, dtype=torch.float32)
            block[:, units] = (fresh * block.float().std() + block.float().mean()).to(block)
        out = experts.w_out[e]
        fresh = torch.randn(count, out.shape[1], generator=generator, dtype=torch.float32)
        out[units] = (fresh * out.float().std() + out.float().mean()).to(out)


@torch.no_grad()
def upcycle_into(moe_model: GPT, dense_model: GPT, drop_fraction: float = 0.0, seed: int = 0) -> GPT:
    """Copy ``dense_model`` into ``moe_model`` in place: attention, norms and embeddings as they are, every
    dense MLP into all experts of the matching MoE layer; routers keep ``moe_model``'s initialisation.

    The two configs must agree on everything but the MoE fields (``MOE_FIELDS``); every layer of
    ``moe_model`` must be MoE and ``dense_model`` must be dense. ``drop_fraction`` > 0: Drop-Upcycling
    (``drop_hidden_units``), seeded by ``seed``. Returns ``moe_model``.
    """
    drop_fraction = check_drop_fraction(drop_fraction)
    dense_cfg, moe_cfg = dense_model.cfg, moe_model.cfg
    if dense_cfg.moe_every != 0:
        raise ValueError(f"the source must be dense (model.moe_every=0), got moe_every={dense_cfg.moe_every}")
    if moe_cfg.moe_every != 1 or moe_cfg.shared_experts != 0:
        raise ValueError(
            f"the upcycled model needs an MoE layer in every layer and no shared experts, got "
            f"moe_every={moe_cfg.moe_every}, shared_experts={moe_cfg.shared_experts}"
        )
    differ = differing_fields(dense_cfg, moe_cfg)
    if differ:
        raise ValueError(f"dense and MoE configs differ outside the MoE fields: {differ}")
    dense_state = dense_model.state_dict()
    moe_state = moe_model.state_dict()
    for name, tensor in dense_state.items():
        if ".ffn." not in name:
            moe_state[name].copy_(tensor)
    generator = torch.Generator().manual_seed(seed)
    for dense_block, moe_block in zip(dense_model.blocks, moe_model.blocks):
        mlp, layer = dense_block.ffn, moe_block.ffn
        assert isinstance(mlp, DenseMLP) and isinstance(layer, MoELayer)  # guaranteed by the config checks
        layer.experts.w_in.copy_(mlp.w_in.weight.T.expand_as(layer.experts.w_in))
        layer.experts.w_out.copy_(mlp.w_out.weight.T.expand_as(layer.experts.w_out))
        if drop_fraction > 0:
            drop_hidden_units(layer, drop_fraction, generator)
    return moe_model


def upcycle(
    dense_model: GPT,
    num_experts: int,
    top_k: int,
    router: str = "topk",
    router_kwargs: dict | None = None,
    drop_fraction: float = 0.0,
    seed: int = 0,
) -> GPT:
    """A new MoE ``GPT``: ``dense_model`` upcycled to ``num_experts`` experts per layer, ``top_k`` per token.

    The router (``router`` with ``router_kwargs``) is freshly initialised from ``seed``. With the
    default renormalised top-k (k >= 2, or ``normalize_weights=True``) the logits equal the dense
    model's at initialisation; ``drop_fraction`` > 0 (Drop-Upcycling, the paper uses 0.5) trades that
    exact start for diverse experts. Cost: E copies of every MLP's weights.
    """
    cfg = upcycled_config(dense_model.cfg, num_experts, top_k, router, router_kwargs=dict(router_kwargs or {}))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        moe_model = GPT(cfg)
    device = next(dense_model.parameters()).device
    dtype = next(dense_model.parameters()).dtype
    return upcycle_into(moe_model.to(device=device, dtype=dtype), dense_model, drop_fraction, seed)


def init_model_from(model: GPT, source: str | Path, *, drop_fraction: float = 0.0, seed: int = 0) -> GPT:
    """Initialise ``model`` in place from ``source``, a ``moe-train`` checkpoint or run directory of a
    dense model (``model.moe_every=0``): an MoE ``model`` is upcycled from it (``upcycle_into``), a dense
    one of the same shape loads its weights. Only weights move; optimizer state, schedule, step and
    data position start fresh. Returns ``model``.
    """
    from moe.train.loading import load_run

    loaded = load_run(source)
    if loaded.vocab_size != model.cfg.vocab_size:
        raise ValueError(
            f"init_from={source}: vocabulary {loaded.vocab_size} differs from this model's {model.cfg.vocab_size}"
        )
    dense = loaded.model
    if dense.cfg.moe_every != 0:
        raise ValueError(
            f"init_from={source} is an MoE run (model.moe_every={dense.cfg.moe_every}); it needs a dense run "
            "(to continue an MoE run use trainer.resume)"
        )
    if model.cfg.moe_every == 0:
        differ = differing_fields(dense.cfg, model.cfg)
        if differ:
            raise ValueError(f"init_from={source}: the dense source differs from this dense model: {differ}")
        model.load_state_dict(dense.state_dict())
        return model
    return upcycle_into(model, dense.to(next(model.parameters()).device), drop_fraction, seed)
