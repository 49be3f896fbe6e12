"""A key/value cache for incremental decoding with ``moe.model.GPT``, preallocated to a fixed length."""

from __future__ import annotations

import torch


class KVCache:
    """Keys and values (B, heads, max_length, D) of every attention layer for the tokens decoded so far.

    ``GPT.forward(idx, cache=cache)`` reads the positions ``[0, length)``, writes the new tokens' keys and
    values after them (rotary positions start at ``length``) and advances ``length``. ``max_length``
    defaults to the model's ``seq_len`` and cannot exceed it. Memory: ``2 * layers * B * max_length *
    hidden_size`` elements of ``dtype`` (default: the model's).
    """

    def __init__(self, model, batch_size: int, max_length: int | None = None, *, dtype: torch.dtype | None = None):
        cfg = model.cfg
        max_length = cfg.seq_len if max_length is None else max_length
        if not 1 <= max_length <= cfg.seq_len:
            raise ValueError(f"max_length={max_length} is not valid; it must be in [1, seq_len={cfg.seq_len}]")
        weight = model.embed.weight
        shape = (batch_size, cfg.num_heads, max_length, cfg.hidden_size // cfg.num_heads)
        dtype = dtype or weight.dtype
        self.max_length = max_length
        self.keys = [torch.zeros(shape, dtype=dtype, device=weight.device) for _ in range(cfg.num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=weight.device) for _ in range(cfg.num_layers)]
        self.length = 0

    def check_room(self, new_tokens: int) -> None:
        """Raise ValueError when ``new_tokens`` more would not fit in ``seq_len`` positions."""
        if self.length + new_tokens > self.max_length:
            raise ValueError(
                f"{self.length} cached + {new_tokens} new tokens exceed the cache's max_length={self.max_length} "
                "(at most the model's seq_len, where its rotary positions stop)"
            )

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store ``k``, ``v`` (B, heads, T, D) after the cached positions; return all keys and values so far."""
        end = self.length + k.shape[2]
        self.keys[layer][:, :, self.length : end] = k
        self.values[layer][:, :, self.length : end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def advance(self, new_tokens: int) -> None:
        """Count ``new_tokens`` as cached (after every layer has stored them)."""
        self.length += new_tokens
