"""Whether the Triton kernels of ``moe.kernels`` can run (importable without triton)."""

from __future__ import annotations

import importlib.util
import os

import torch

HAVE_TRITON = importlib.util.find_spec("triton") is not None


def kernels_usable(x: torch.Tensor) -> bool:
    """True when the Triton kernels can run on ``x``: triton installed and x on CUDA (or the interpreter on)."""
    return HAVE_TRITON and (x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1")
