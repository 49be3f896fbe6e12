"""Noisy top-k gating (Shazeer et al. 2017): learned, input-dependent Gaussian noise on the router logits."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class NoisyGating(nn.Module):
    """``H = z + ε · softplus(x · W_noise)``, ε ~ N(0, 1), in training; ``H = z`` in eval.

    ``W_noise`` (E, H) starts at zero (as in the paper), so the initial noise scale is softplus(0) = ln 2
    for every expert; it is learned through the routing weights of the selected experts. Computed in
    float32 like the gate. Cost: one more (T, H) x (H, E) GEMM and O(T * E) elementwise work in training.
    """

    def __init__(self, hidden_size: int, num_experts: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(num_experts, hidden_size))

    def forward(self, x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """The noisy logits H for router input ``x`` (T, H) and clean logits ``logits`` (T, E)."""
        if not self.training:
            return logits
        with torch.autocast(x.device.type, enabled=False):
            scale = F.softplus(F.linear(x.to(logits.dtype), self.weight.to(logits.dtype)))
        return logits + torch.randn_like(logits) * scale
