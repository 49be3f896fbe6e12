"""Triton kernels for the MoE data path and their autograd wrappers, importable as ``moe.kernels``
(need the ``triton`` package).

- ``topk_route``: fused router scores + top-k + normalisation + per-expert counts (the Triton selection
  path of ``moe.routers.TopKRouter``, on with ``MoELayer(dispatcher="triton")``).
- ``half_gate_logits``: float32 router logits of bf16/fp16 inputs from one GEMM (same path, on CUDA).
- ``token_major_index``, ``permute_rows``, ``combine_rows``: deterministic permute/combine (forward and
  backward) without atomics; ``moe.dispatch.FusedDispatcher`` (the "triton" dispatcher) uses them.
- ``scatter_rows``, ``segment_sum``: the two row kernels underneath.

They run on CUDA tensors, or on CPU tensors under the Triton interpreter (``TRITON_INTERPRET=1``, for tests).
The pure-torch paths (``TopKRouter``'s torch selection, ``moe.dispatch.LocalDispatcher``) are the reference.
"""

if __name__ != "moe.kernels":
    # From a checkout the repository root is on sys.path, so this folder is also importable as a top-level
    # "kernels" (transformers imports that name to probe for Hugging Face's package of it). Running the modules
    # again would define the moe:: custom ops a second time, and torch frees the first definitions, which
    # moe.kernels keeps calling: hand out moe.kernels itself instead.
    import importlib
    import sys

    sys.modules[__name__] = importlib.import_module("moe.kernels")
else:
    from .dispatch import combine_rows, permute_rows, token_major_index
    from .gate import half_gate_logits
    from .rows import scatter_rows, segment_sum
    from .topk import topk_route

__all__ = [
    "combine_rows",
    "half_gate_logits",
    "permute_rows",
    "scatter_rows",
    "segment_sum",
    "token_major_index",
    "topk_route",
]
