"""Speed and memory switches of ``moe-train``: the dispatcher ``auto`` picks, and the activation checkpointing
and compile applied to a built GPT from outside the model.

Both keep the model's modules and state-dict keys as they are (the wrapped ``forward`` is an instance
attribute), so checkpoints, exports and the parallel strategies see the same model.
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from moe.experts import DenseMLP
from moe.kernel_support import HAVE_TRITON
from moe.layer import MoELayer

ACTIVATION_CHECKPOINTING = ("none", "full", "experts")
COMPILE_MODES = ("auto", "true", "false")


def _recompute_in_backward(module: nn.Module) -> None:
    """Make ``module`` keep only its inputs in the forward and recompute its activations in the backward."""
    module.forward = functools.partial(checkpoint, type(module).forward.__get__(module), use_reentrant=False)


def apply_activation_checkpointing(model: nn.Module, mode: str) -> int:
    """Recompute activations in the backward: ``full`` = every block's attention, dense MLP and experts
    (shared ones too), ``experts`` = the expert MLPs only, ``none`` = nothing. Returns the modules wrapped.

    Routers, permute and combine are never recomputed: their outputs are small next to the experts' (N, F)
    hidden states, and a router's per-step state (balancing loads, ReLU sparsity) must be updated once.
    """
    if mode not in ACTIVATION_CHECKPOINTING:
        raise ValueError(
            f"trainer.activation_checkpointing={mode!r} is not valid; valid: {list(ACTIVATION_CHECKPOINTING)}"
        )
    if mode == "none":
        return 0
    wrapped = []
    for block in getattr(model, "blocks", []):
        ffn = block.ffn
        if isinstance(ffn, MoELayer):
            wrapped.append(ffn.experts)
            if mode == "full" and ffn.shared_experts is not None:
                wrapped.append(ffn.shared_experts)
        elif mode == "full" and isinstance(ffn, DenseMLP):
            wrapped.append(ffn)
        if mode == "full":
            wrapped.append(block.attn)
    for module in wrapped:
        _recompute_in_backward(module)
    return len(wrapped)


def resolve_dispatch(name: str, device: torch.device) -> str:
    """``dispatch.name``: ``auto`` is "triton" (the Triton router top-k, permute and combine) on CUDA with
    triton installed, else "local" (pure torch; on a CPU the kernels would fall back to it anyway)."""
    if name != "auto":
        return name
    return "triton" if device.type == "cuda" and HAVE_TRITON else "local"


def use_compile(mode: str, device: torch.device) -> bool:
    """``trainer.compile``: ``auto`` compiles on CUDA only (on a CPU compiling takes longer than it saves)."""
    if mode not in COMPILE_MODES:
        raise ValueError(f"trainer.compile={mode!r} is not valid; valid: {list(COMPILE_MODES)}")
    return mode == "true" or (mode == "auto" and device.type == "cuda")


def compile_blocks(model: nn.Module, **options) -> int:
    """``torch.compile`` each decoder block in place (as torchtitan does): one compiled graph per block shape,
    reused by every layer, instead of one whole-model graph. Returns the number of blocks compiled."""
    blocks = list(getattr(model, "blocks", []))
    for block in blocks:
        block.compile(**options)
    return len(blocks)
