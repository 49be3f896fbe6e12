"""Triton kernels for the MoE data path, importable as ``moe.kernels`` (CUDA; pure-torch fallbacks live in moe/)."""
