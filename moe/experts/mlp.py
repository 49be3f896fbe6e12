"""Stacked expert MLP weights and their two forward implementations (grouped GEMM, per-expert loop)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from moe.validation import check_positive_int

ACTIVATIONS = ("gelu", "relu", "swiglu")


def activate(h: torch.Tensor, activation: str) -> torch.Tensor:
    """Apply the MLP nonlinearity; for ``swiglu`` the input holds [gate | up] halves."""
    if activation == "swiglu":
        gate, up = h.chunk(2, dim=-1)
        return F.silu(gate) * up
    if activation == "gelu":
        return F.gelu(h)
    return F.relu(h)


class ExpertMLP(nn.Module):
    """E independent two-layer MLPs stored as stacked weights.

    ``w_in`` is (E, H, F) — (E, H, 2F) for ``swiglu``, gate half first — and ``w_out`` is (E, F, H).
    ``forward(x_sorted, tokens_per_expert)`` takes rows already grouped by expert (N, H) and the
    (E,) counts, and returns (N, H). Subclasses differ only in how they run the matmuls, so their
    state dicts are interchangeable.
    """

    def __init__(self, num_experts: int, hidden_size: int, ffn_hidden_size: int, activation: str = "swiglu"):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
        self.num_experts = check_positive_int("num_experts", num_experts)
        self.hidden_size = check_positive_int("hidden_size", hidden_size)
        self.ffn_hidden_size = check_positive_int("ffn_hidden_size", ffn_hidden_size)
        self.activation = activation
        in_width = 2 * ffn_hidden_size if activation == "swiglu" else ffn_hidden_size
        self.w_in = nn.Parameter(torch.empty(num_experts, hidden_size, in_width))
        self.w_out = nn.Parameter(torch.empty(num_experts, ffn_hidden_size, hidden_size))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Normal init with std 1/sqrt(fan_in) for both projections."""
        nn.init.normal_(self.w_in, std=1.0 / math.sqrt(self.hidden_size))
        nn.init.normal_(self.w_out, std=1.0 / math.sqrt(self.ffn_hidden_size))

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, hidden_size={self.hidden_size}, "
            f"ffn_hidden_size={self.ffn_hidden_size}, activation={self.activation}"
        )


def _dense_grad(g: torch.Tensor) -> torch.Tensor:
    # An empty expanded gradient counts as contiguous, so .contiguous() would keep its 0 strides.
    return g.contiguous() if g.numel() else g.new_zeros(g.shape)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype experts run in: autocast's when autocast is on for x's device, else x's own."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def _contiguous_grad(t: torch.Tensor) -> torch.Tensor:
    # torch._grouped_mm's backward rejects expanded (stride-0) gradients such as that of y.sum(). Not under
    # torch.compile: a hook on an intermediate becomes an autograd-function node with symbolic sizes that
    # Inductor's partitioner mis-orders (dynamic shapes), and the compiled backward's gradients are dense.
    if t.requires_grad and not torch.compiler.is_compiling():
        t.register_hook(_dense_grad)
    return t


def _aligned(width: int, dtype: torch.dtype) -> int:
    """``width`` rounded up so that one row is a multiple of 16 bytes (torch._grouped_mm's stride rule)."""
    multiple = max(1, 16 // dtype.itemsize)
    return -(-width // multiple) * multiple


class GroupedExperts(ExpertMLP):
    """Experts run as two ``torch._grouped_mm`` calls over expert-sorted rows: no loop over experts.

    Works on CPU (float32, bf16) and CUDA (bf16). Experts with zero rows, and N = 0, are fine.
    ``torch._grouped_mm`` needs 16-byte rows; when H or F is not a multiple of 16 bytes (4 float32
    or 8 bf16 elements) the weights are zero-padded for the call, which is exact but copies them.
    Cost: 2 * N * H * F * (3 if swiglu else 2) FLOPs forward.
    """

    def forward(self, x: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
        """Rows (N, H) grouped by expert, counts (E,) -> expert outputs (N, H); no host sync."""
        offsets = torch.cumsum(tokens_per_expert, 0, dtype=torch.int32)
        x = x.to(compute_dtype(x))
        w_in, w_out = self._aligned_weights(x.dtype)
        hidden = w_out.shape[-1]
        if hidden != self.hidden_size:
            x = F.pad(x, (0, hidden - self.hidden_size))
        h = _contiguous_grad(torch._grouped_mm(x, w_in, offs=offsets))
        h = activate(h, self.activation)
        out = _contiguous_grad(torch._grouped_mm(h, w_out, offs=offsets))
        return out if hidden == self.hidden_size else out[:, : self.hidden_size]

    def _aligned_weights(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Weights in ``dtype``, zero-padded to 16-byte rows where needed (padding contributes 0)."""
        w_in, w_out = self.w_in.to(dtype), self.w_out.to(dtype)
        hidden, ffn = _aligned(self.hidden_size, dtype), _aligned(self.ffn_hidden_size, dtype)
        if (hidden, ffn) == (self.hidden_size, self.ffn_hidden_size):
            return w_in, w_out
        pad_h, pad_f = hidden - self.hidden_size, ffn - self.ffn_hidden_size
        halves = 2 if self.activation == "swiglu" else 1  # pad the gate and up halves separately
        w_in = w_in.view(self.num_experts, self.hidden_size, halves, self.ffn_hidden_size)
        w_in = F.pad(w_in, (0, pad_f, 0, 0, 0, pad_h)).reshape(self.num_experts, hidden, halves * ffn)
        w_out = F.pad(w_out, (0, pad_h, 0, pad_f))
        return w_in, w_out


class LoopExperts(ExpertMLP):
    """Readable reference: one dense MLP call per expert (syncs to split rows; any dtype)."""

    def forward(self, x: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
        """Rows (N, H) grouped by expert, counts (E,) -> expert outputs (N, H), one matmul pair per expert."""
        chunks = x.split(tokens_per_expert.tolist())
        outputs = [
            activate(chunk @ self.w_in[e].to(x.dtype), self.activation) @ self.w_out[e].to(x.dtype)
            for e, chunk in enumerate(chunks)
        ]
        return torch.cat(outputs) if outputs else x.new_zeros(0, self.hidden_size)
