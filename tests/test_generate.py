"""moe.generate and moe.kv_cache: cached decoding equals the full forward; sampling rules; router refusals."""

import pytest
import torch

from moe.generate import decoding_refusal, generate, next_token
from moe.kv_cache import KVCache
from moe.model import GPT, ModelConfig

TINY = {"vocab_size": 50, "seq_len": 24, "num_layers": 2, "hidden_size": 32, "num_heads": 4, "ffn_hidden_size": 32}


def tiny_model(**overrides) -> GPT:
    torch.manual_seed(0)
    model = GPT(ModelConfig(**{**TINY, "num_experts": 4, "top_k": 2, **overrides})).eval()
    with torch.no_grad():  # larger router and expert weights: routing far from ties, and it shows in the logits
        for name, p in model.named_parameters():
            if "gate" in name or "experts.w_out" in name:
                p.normal_(0, 0.5)
    return model


@torch.no_grad()
def cached_logits(model: GPT, idx: torch.Tensor, chunks: list[int]) -> torch.Tensor:
    """Logits of ``idx`` fed through a KV cache in pieces of the given lengths."""
    cache = KVCache(model, idx.shape[0])
    out, start = [], 0
    for length in chunks:
        logits, _ = model(idx[:, start : start + length], cache=cache)
        out.append(logits)
        start += length
    assert cache.length == idx.shape[1]
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("layers", [{"moe_every": 1}, {"moe_every": 0}, {"moe_every": 2, "shared_experts": 1}])
@pytest.mark.parametrize("chunks", [[8] + [1] * 12, [5, 3, 1, 7, 4]])
def test_cached_decoding_gives_the_full_forward_logits(layers, chunks):
    model = tiny_model(**layers)
    idx = torch.randint(0, 50, (2, sum(chunks)))
    with torch.no_grad():
        full, _ = model(idx)
    torch.testing.assert_close(cached_logits(model, idx, chunks), full, rtol=0, atol=1e-5)


PER_TOKEN_ROUTERS = [
    ("topk", {}),
    ("topk", {"bias_update_rate": 1e-3, "num_groups": 2, "groups_kept": 1}),
    ("topk", {"score_function": "sigmoid"}),
    ("relu", {}),
    ("base", {}),
    ("sinkhorn", {}),
    ("hash", {}),
]


@pytest.mark.parametrize("router,kwargs", PER_TOKEN_ROUTERS)
def test_routers_that_route_each_token_alone_decode_exactly(router, kwargs):
    model = tiny_model(router=router, router_kwargs=kwargs)
    assert decoding_refusal(model) is None
    idx = torch.randint(0, 50, (1, 16))
    with torch.no_grad():
        full, _ = model(idx)
    torch.testing.assert_close(cached_logits(model, idx, [4] + [1] * 12), full, rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    "router,kwargs,reason",
    [("expert_choice", {}, "not causal"), ("topk", {"capacity_factor": 0.5}, "capacity_factor=0.5")],
)
def test_routers_whose_routing_depends_on_other_tokens_are_refused(router, kwargs, reason):
    model = tiny_model(router=router, router_kwargs=kwargs)
    assert reason in decoding_refusal(model)
    idx = torch.randint(0, 50, (1, 16))
    with torch.no_grad():
        full, _ = model(idx)
    # The refusal is real: one token at a time gives other logits than the whole sequence.
    assert (cached_logits(model, idx, [1] * 16) - full).abs().max() > 1e-3
    with pytest.raises(ValueError, match="cannot decode one token at a time: layer 'blocks.0.ffn'"):
        generate(model, [1, 2], 3)


def test_merged_routers_take_the_wrapped_routers_answer():
    from moe.compress.merged_router import MergedRouter

    assert MergedRouter(8, 2, [0, 1, 0, 1], "expert_choice").decoding_refusal() is not None
    assert MergedRouter(8, 2, [0, 1, 0, 1], "topk", top_k=2).decoding_refusal() is None


def test_greedy_generation_is_the_argmax_of_full_forwards():
    model = tiny_model()
    prompt = [3, 1, 4, 1, 5]
    out = generate(model, prompt, 10, temperature=0)
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(10):
            ids.append(int(model(torch.tensor([ids]))[0][0, -1].argmax()))
    assert out == ids[len(prompt) :]
    assert model.training is False


def test_the_cache_refuses_tokens_beyond_its_length():
    model = tiny_model()
    cache = KVCache(model, 1, 6)
    with torch.no_grad():
        model(torch.zeros(1, 4, dtype=torch.long), cache=cache)
        with pytest.raises(ValueError, match="4 cached . 3 new tokens exceed the cache's max_length=6"):
            model(torch.zeros(1, 3, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match=r"max_length=25 is not valid; it must be in \[1, seq_len=24\]"):
        KVCache(model, 1, 25)


def test_generation_refuses_to_run_past_seq_len():
    model = tiny_model()
    with pytest.raises(ValueError, match="exceeds the model's seq_len=24; use max_new_tokens <= 19"):
        generate(model, [1, 2, 3, 4, 5], 20)
    assert len(generate(model, [1, 2, 3, 4, 5], 19, temperature=0)) == 19


def test_sampling_is_seeded_and_respects_top_k_and_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert next_token(logits, temperature=0).tolist() == [0]

    def draws(**kwargs):
        generator = torch.Generator().manual_seed(0)
        return torch.stack([next_token(logits, generator=generator, **kwargs) for _ in range(2000)]).flatten()

    assert torch.equal(draws(), draws())
    assert set(draws(top_k=2).tolist()) == {0, 1}
    # Nucleus with top_p=0.8: 0.5 < 0.8 keeps token 1, 0.5 + 0.3 reaches 0.8, so {0, 1}.
    assert set(draws(top_p=0.8).tolist()) == {0, 1}
    assert set(draws(top_p=0.81).tolist()) == {0, 1, 2}
    counts = torch.bincount(draws(), minlength=4).float() / 2000
    torch.testing.assert_close(counts, logits.exp()[0], atol=0.04, rtol=0)
    cold = torch.bincount(draws(temperature=0.5), minlength=4).float() / 2000
    expected = (logits[0] / 0.5).softmax(-1)
    torch.testing.assert_close(cold, expected, atol=0.04, rtol=0)
