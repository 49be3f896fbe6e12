"""moe.model.GPT: shapes, causality, tying, parameter and FLOP counts, overfitting, every registered router."""

import dataclasses
import math

import pytest
import torch

import moe
from moe.model import GPT, ModelConfig, apply_rotary, dense_baseline_config, rotary_tables
from moe.routers import ROUTERS, TopKRouter

TINY = {"vocab_size": 64, "seq_len": 16, "num_layers": 2, "hidden_size": 32, "num_heads": 2}
TINY |= {"ffn_hidden_size": 48, "num_experts": 4}
# Routers that cannot be built from a model config alone get the arguments they need here.
EXTRA_ROUTER_KWARGS = {"merged": {"source_experts": 8}}


def tiny(**overrides) -> ModelConfig:
    return ModelConfig(**{**TINY, **overrides})


def test_output_shapes_and_initial_loss():
    torch.manual_seed(0)
    model = GPT(tiny())
    idx = torch.randint(0, 64, (3, 16))
    targets = torch.randint(0, 64, (3, 16))
    logits, loss = model(idx, targets)
    assert logits.shape == (3, 16, 64) and loss.shape == ()
    # Small init: predictions start close to uniform over the vocabulary.
    assert loss.item() == pytest.approx(math.log(64), abs=0.1)
    logits_short, no_loss = model(idx[:, :5])
    assert logits_short.shape == (3, 5, 64) and no_loss is None
    with pytest.raises(ValueError, match="sequence length 17 exceeds the model's seq_len=16"):
        model(torch.zeros(1, 17, dtype=torch.long))


@pytest.mark.parametrize("moe_every", [1, 2])
def test_changing_a_future_token_never_changes_earlier_logits(moe_every):
    model = GPT(tiny(moe_every=moe_every, router="topk")).eval()
    idx = torch.randint(0, 64, (2, 16))
    base, _ = model(idx)
    for position in (3, 9, 15):
        changed = idx.clone()
        changed[:, position] = (changed[:, position] + 1) % 64
        logits, _ = model(changed)
        assert torch.allclose(logits[:, :position], base[:, :position], atol=1e-5)
        assert not torch.allclose(logits[:, position], base[:, position], atol=1e-3)


def test_rotary_is_a_rotation_that_makes_scores_relative():
    cos, sin = rotary_tables(12, 8, 10000.0)
    q, k = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)
    rq = apply_rotary(q.expand(1, 12, 1, 8), cos, sin)[0, :, 0]
    rk = apply_rotary(k.expand(1, 12, 1, 8), cos, sin)[0, :, 0]
    assert torch.allclose(rq.norm(dim=-1), q.norm().expand(12), atol=1e-5)
    # <R_m q, R_n k> depends only on m - n.
    assert torch.allclose(rq[5] @ rk[2], rq[9] @ rk[6], atol=1e-5)


def test_tied_embeddings_share_one_tensor():
    tied, untied = GPT(tiny(tie_embeddings=True)), GPT(tiny(tie_embeddings=False))
    assert tied.lm_head.weight is tied.embed.weight
    assert untied.lm_head.weight is not untied.embed.weight
    assert untied.num_params() - tied.num_params() == 64 * 32
    idx = torch.randint(0, 64, (2, 8))
    tied(idx, idx)[1].backward()
    assert tied.embed.weight.grad is not None and tied.embed.weight.grad.abs().sum() > 0


def independent_counts(cfg: ModelConfig) -> tuple[int, int]:
    """(total, active) parameters written out from the architecture description."""
    h, f, v, e = cfg.hidden_size, cfg.ffn_hidden_size, cfg.vocab_size, cfg.num_experts
    mlp = (2 * f if cfg.activation == "swiglu" else f) * h + f * h
    total = active = v * h * (1 if cfg.tie_embeddings else 2) + h  # embeddings, head, final norm
    for layer in range(cfg.num_layers):
        common = 4 * h * h + 2 * h  # qkv + out projection, two norms
        total, active = total + common, active + common
        if cfg.moe_every and (layer + 1) % cfg.moe_every == 0:
            router = h * e
            shared = cfg.shared_experts * f
            shared_mlp = ((2 * shared if cfg.activation == "swiglu" else shared) * h + shared * h) if shared else 0
            total += router + e * mlp + shared_mlp
            active += router + cfg.top_k * mlp + shared_mlp
        else:
            total, active = total + mlp, active + mlp
    return total, active


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"moe_every": 2, "num_layers": 4, "shared_experts": 1, "tie_embeddings": False, "activation": "gelu"},
        {"moe_every": 0},
        {"top_k": 1, "shared_experts": 2},
    ],
)
def test_parameter_counts_match_an_independent_count(overrides):
    cfg = tiny(**overrides)
    model = GPT(cfg)
    total, active = independent_counts(cfg)
    assert model.num_params() == total and model.num_active_params() == active
    matmul = active - (0 if cfg.tie_embeddings else cfg.vocab_size * cfg.hidden_size)
    matmul -= (2 * cfg.num_layers + 1) * cfg.hidden_size  # norm weights
    attention = 12 * cfg.num_layers * cfg.hidden_size * cfg.seq_len
    assert model.flops_per_token() == 6 * matmul + attention


def test_dense_baseline_has_the_same_active_parameters():
    cfg = tiny(top_k=2, shared_experts=1)
    dense_cfg = dense_baseline_config(cfg)
    assert dense_cfg.moe_every == 0 and dense_cfg.ffn_hidden_size == 3 * 48
    moe_model, dense_model = GPT(cfg), GPT(dense_cfg)
    assert not moe.moe_layers(dense_model)
    router_gates = cfg.num_layers * cfg.hidden_size * cfg.num_experts
    assert dense_model.num_active_params() == moe_model.num_active_params() - router_gates
    assert dense_model.num_params() == dense_model.num_active_params()
    with pytest.raises(ValueError, match="moe_every=1.*moe_every=2"):
        dense_baseline_config(tiny(moe_every=2))


def test_overfits_one_batch():
    torch.manual_seed(0)
    model = GPT(tiny(num_experts=4, top_k=2))
    idx = torch.randint(0, 64, (4, 16))
    targets = torch.randint(0, 64, (4, 16))
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-2, weight_decay=0.0)
    first = None
    for _ in range(20):
        _, loss = model(idx, targets)
        first = loss.item() if first is None else first
        (loss + moe.aux_loss(model)).backward()
        optimizer.step()
        optimizer.zero_grad()
        moe.update_routers(model)
    assert loss.item() < 0.1 * first


@pytest.mark.parametrize("router", sorted(ROUTERS))
def test_runs_with_every_registered_router(router):
    cfg = tiny(router=router, router_kwargs=EXTRA_ROUTER_KWARGS.get(router, {}))
    model = GPT(cfg)
    assert [layer.router.layer_name for _, layer in moe.moe_layers(model)] == ["blocks.0.ffn", "blocks.1.ffn"]
    idx = torch.randint(0, 64, (2, 16))
    logits, loss = model(idx, idx.roll(-1, 1))
    total = loss + moe.aux_loss(model)
    assert torch.isfinite(total)
    total.backward()
    moe.update_routers(model)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    model.eval()
    eval_logits, _ = model(idx)
    assert eval_logits.shape == logits.shape and torch.isfinite(eval_logits).all()


def test_token_ids_reach_the_router(monkeypatch):
    seen = []

    class RecordingRouter(TopKRouter):
        def route(self, x, *, seq_len=None, token_ids=None):
            seen.append((token_ids, seq_len))
            return super().route(x, seq_len=seq_len, token_ids=token_ids)

    monkeypatch.setitem(ROUTERS, "recording", RecordingRouter)
    model = GPT(tiny(router="recording"))
    idx = torch.randint(0, 64, (3, 16))
    model(idx)
    assert len(seen) == 2 and all(torch.equal(ids, idx.reshape(-1)) and length == 16 for ids, length in seen)


def test_bad_config_names_the_value():
    with pytest.raises(ValueError, match="hidden_size=30 must be divisible by num_heads=4"):
        tiny(hidden_size=30, num_heads=4)
    with pytest.raises(ValueError, match="top_k must be in \\[1, num_experts=4\\], got 5"):
        tiny(top_k=5)
    with pytest.raises(ValueError, match="unknown router 'nope'; valid: .*'topk'"):
        tiny(router="nope")
    with pytest.raises(ValueError, match="unknown experts 'fast'"):
        tiny(experts="fast")
    with pytest.raises(ValueError, match="moe_every must be an int >= 0, got -1"):
        tiny(moe_every=-1)
    with pytest.raises(ValueError, match="head size .*=3 must be even"):
        tiny(hidden_size=6, num_heads=2)
    with pytest.raises(ValueError, match="idx must be an int64"):
        GPT(tiny())(torch.zeros(2, 4))


def test_config_round_trips_through_a_dict():
    cfg = tiny(router_kwargs={"z_loss_coef": 0.0})
    assert ModelConfig(**dataclasses.asdict(cfg)) == cfg


def test_parameter_counts_cover_the_whole_model_when_experts_are_sharded():
    """A process holding half of each layer's experts (as under ep_size=2) reports the whole model's counts."""
    from moe.parallel.sharding import shard_experts

    cfg = tiny(num_experts=4, top_k=2, shared_experts=1)
    model = GPT(cfg)
    total, active = independent_counts(cfg)
    for _, layer in moe.moe_layers(model):
        layer.experts = shard_experts(layer.experts, ep_rank=1, ep_size=2)
    assert sum(p.numel() for p in model.parameters()) < total
    assert model.num_params() == total and model.num_active_params() == active
