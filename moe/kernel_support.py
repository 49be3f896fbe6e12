"""Whether the Triton kernels of ``moe.kernels`` can run (importable without triton)."""

from __future__ import annotations

import importlib.util
import os

import torch

HAVE_TRITON = importlib.util.find_spec("triton") is not None


def kernels_usable(x: torch.Tensor) -> bool:
    """True when the Triton kernels can run on ``x``: triton installed and x on CUDA (or the interpreter on)."""
    return HAVE_TRITON and (x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1")


def check_kernel_module_name(name: str) -> None:
    """Raise ImportError unless a kernel module runs as ``moe.kernels.<module>``: a second copy under another
    name (``kernels.rows`` from a checkout, whose root is on ``sys.path``) would define the ``moe::`` custom ops
    again, and torch frees the first definitions, which ``moe.kernels`` keeps calling."""
    if not name.startswith("moe.kernels."):
        module = name.rpartition(".")[2]
        raise ImportError(f"import {name!r} as 'moe.kernels.{module}': a second copy would redefine the moe:: ops")
