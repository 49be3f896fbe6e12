"""A dense feed-forward block: the shared expert of an MoE layer and the dense baseline's MLP."""

from __future__ import annotations

import torch
from torch import nn

from moe.experts.mlp import ACTIVATIONS, activate
from moe.validation import check_positive_int


class DenseMLP(nn.Module):
    """``w_out(act(w_in(x)))`` with the same activations as the experts (``swiglu`` is gated)."""

    def __init__(self, hidden_size: int, ffn_hidden_size: int, activation: str = "swiglu"):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
        check_positive_int("ffn_hidden_size", ffn_hidden_size)
        self.activation = activation
        in_width = 2 * ffn_hidden_size if activation == "swiglu" else ffn_hidden_size
        self.w_in = nn.Linear(hidden_size, in_width, bias=False)
        self.w_out = nn.Linear(ffn_hidden_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., H) -> (..., H)."""
        return self.w_out(activate(self.w_in(x), self.activation))
