"""The short greedy sample that ends ``moe-train``'s printed summary."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from moe.generate import decoding_refusal, generate
from moe.train.config import TrainConfig
from moe.train.loading import run_codec

SAMPLE_TOKENS = 64


def sample_prompt(cfg: TrainConfig) -> str:
    """The fixed prompt: ``"def "`` for the standard-library corpus (Python sources), else ``"The"``."""
    return "def " if cfg.data.source == "stdlib" else "The"


def log_sample(model: nn.Module, cfg: TrainConfig, run_dir: Path, message: Callable[[str], None]) -> None:
    """Print (through ``message``) up to 64 greedy tokens after the fixed prompt; a model whose routers cannot
    decode one token at a time, or a run without a tokenizer, gets a line saying why instead."""
    refusal = decoding_refusal(model)
    if refusal is not None:
        message(f"sample         skipped: {refusal}")
        return
    try:
        codec = run_codec(cfg, run_dir)
    except FileNotFoundError as error:
        message(f"sample         skipped: {error}")
        return
    prompt = sample_prompt(cfg)
    ids = codec.encode(prompt)
    room = model.cfg.seq_len - len(ids)
    if not ids or room < 1:
        message(f"sample         skipped: the prompt {prompt!r} leaves no room in seq_len={model.cfg.seq_len}")
        return
    # Eager even where trainer.compile compiled the blocks: each decoded token has a new cache length, and
    # recompiling for each would cost more than the whole sample.
    with torch.compiler.set_stance("force_eager"):
        new = generate(model, ids, min(SAMPLE_TOKENS, room), temperature=0)
    message(f"sample         greedy, {len(new)} tokens: {prompt + codec.decode(new)!r}")
