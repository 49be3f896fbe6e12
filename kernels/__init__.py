"""Triton kernels for the MoE data path, importable as ``moe.kernels`` (need the ``triton`` package).

- ``topk_route``: fused router scores + top-k + normalisation + per-expert counts (``FusedTopKRouter``).
- ``token_major_index``, ``permute_rows``, ``combine_rows``: deterministic permute/combine (forward and
  backward) without atomics; ``moe.dispatch.FusedDispatcher`` uses them.
- ``scatter_rows``, ``segment_sum``: the two row kernels underneath.

They run on CUDA tensors, or on CPU tensors under the Triton interpreter (``TRITON_INTERPRET=1``, for tests).
The pure-torch equivalents (``moe.routers.TopKRouter``, ``moe.dispatch.LocalDispatcher``) are the reference.
"""

from .dispatch import combine_rows, permute_rows, token_major_index
from .router import FusedTopKRouter
from .rows import scatter_rows, segment_sum
from .topk import topk_route

__all__ = [
    "FusedTopKRouter",
    "combine_rows",
    "permute_rows",
    "scatter_rows",
    "segment_sum",
    "token_major_index",
    "topk_route",
]
