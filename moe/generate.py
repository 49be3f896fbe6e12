"""Sampling text from a ``moe.model.GPT``: incremental decoding with a KV cache, greedy or temperature/top-k/top-p.

Decoding feeds the prompt once (prefill) and then one token per step; each step attends to the cached
keys and values, so it costs one token's forward instead of the whole sequence's. A model whose routers
route a token differently alone than within its sequence is refused (``decoding_refusal``). The context
never slides: prompt plus new tokens must fit in the model's ``seq_len`` (its rotary positions stop
there), or ``generate`` raises before any work.
"""

from __future__ import annotations

import torch
from torch import nn

from moe.kv_cache import KVCache
from moe.layer import moe_layers


def decoding_refusal(model: nn.Module) -> str | None:
    """Why ``model`` cannot decode one token at a time (naming the layer and its router), or None when it can."""
    for name, layer in moe_layers(model):
        reason = layer.router.decoding_refusal()
        if reason is not None:
            return f"layer '{name}' ({type(layer.router).__name__}): {reason}"
    return None


def next_token(
    logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Pick one token per row of ``logits`` (B, V): argmax for ``temperature == 0``, else a sample of
    ``softmax(logits / temperature)`` restricted to the ``top_k`` most likely tokens and then to the smallest
    set whose probability reaches ``top_p`` (nucleus). Returns (B,) int64."""
    if temperature == 0:
        return logits.argmax(-1)
    scaled = logits.float() / temperature
    if top_k is not None and top_k < scaled.shape[-1]:
        kth = scaled.topk(top_k, dim=-1).values[:, -1:]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    if top_p < 1.0:
        ordered, order = scaled.sort(dim=-1, descending=True)
        probs = ordered.softmax(-1)
        # Drop a token when the more likely ones already reach top_p (the most likely one always stays).
        drop = probs.cumsum(-1) - probs >= top_p
        scaled = scaled.scatter(-1, order, ordered.masked_fill(drop, float("-inf")))
    return torch.multinomial(scaled.softmax(-1), 1, generator=generator).squeeze(-1)


def check_sampling(temperature: float, top_k: int | None, top_p: float) -> None:
    """Raise ValueError naming a bad sampling setting."""
    if not temperature >= 0:
        raise ValueError(f"temperature={temperature!r} is not valid; it must be >= 0 (0 = greedy)")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k={top_k!r} is not valid; it must be an int >= 1 or None (no limit)")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p={top_p!r} is not valid; it must be in (0, 1]")


@torch.no_grad()
def generate(
    model: nn.Module,
    prompt: list[int],
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> list[int]:
    """The ``max_new_tokens`` token ids that ``model`` continues ``prompt`` with (eval mode, KV cache).

    Raises ValueError for an empty prompt, a prompt plus ``max_new_tokens`` beyond ``model.cfg.seq_len``,
    bad sampling settings, or routers that cannot decode one token at a time. ``generator`` (on the model's
    device) seeds the sampling. Cost: one forward of the prompt, then one single-token forward per new token.
    """
    refusal = decoding_refusal(model)
    if refusal is not None:
        raise ValueError(f"this model cannot decode one token at a time: {refusal}")
    check_sampling(temperature, top_k, top_p)
    if not prompt:
        raise ValueError("the prompt is empty; give at least one token")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens={max_new_tokens} is not valid; it must be >= 0")
    seq_len = model.cfg.seq_len
    if len(prompt) + max_new_tokens > seq_len:
        raise ValueError(
            f"a prompt of {len(prompt)} tokens plus max_new_tokens={max_new_tokens} exceeds the model's "
            f"seq_len={seq_len}; use max_new_tokens <= {max(seq_len - len(prompt), 0)} or a shorter prompt"
        )
    device = model.embed.weight.device
    was_training = model.training
    model.eval()
    try:
        cache = KVCache(model, 1, len(prompt) + max_new_tokens)
        logits, _ = model(torch.tensor([prompt], dtype=torch.long, device=device), cache=cache)
        out: list[torch.Tensor] = []
        for step in range(max_new_tokens):
            token = next_token(logits[:, -1], temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
            out.append(token)
            if step + 1 < max_new_tokens:
                logits, _ = model(token[:, None], cache=cache)
        return torch.cat(out).tolist() if out else []
    finally:
        model.train(was_training)
