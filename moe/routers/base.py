"""The router base class: a linear gate in float32."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from moe.routing import Routing
from moe.validation import check_positive_int


class NonFiniteLogitsError(ValueError, FloatingPointError):
    """Router logits contain NaN or inf; the message names the MoE layer."""


class Router(nn.Module):
    """Base class: ``forward(x: (T, H)) -> Routing``; the gate is a bias-free linear map to E logits.

    Logits are computed in float32 whatever the input dtype. Subclasses implement ``route``.
    Routers with per-step state (balancing biases, adaptive coefficients) override
    ``step_update``, which ``moe.update_routers`` calls once per optimizer step.
    """

    def __init__(self, hidden_size: int, num_experts: int):
        super().__init__()
        self.hidden_size = check_positive_int("hidden_size", hidden_size)
        self.num_experts = check_positive_int("num_experts", num_experts)
        self.gate = nn.Linear(hidden_size, num_experts, bias=False)
        nn.init.normal_(self.gate.weight, std=hidden_size**-0.5)
        self.layer_name = "moe"  # set by the owning MoELayer so errors can name the layer

    def compute_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (T, E) in float32 (float64 for float64 input, so gradcheck sees exact maths).

        Raises on non-finite values (device-side assert on CUDA, no host sync).
        """
        dtype = torch.promote_types(x.dtype, torch.float32)
        with torch.autocast(x.device.type, enabled=False):  # autocast would run this linear in bf16
            logits = torch.nn.functional.linear(x.to(dtype), self.gate.weight.to(dtype))
        finite = torch.isfinite(logits).all()
        message = f"non-finite router logits in layer '{self.layer_name}' (check the layer input and learning rate)"
        if logits.is_cuda:
            torch._assert_async(finite, message)
        elif not bool(finite):
            raise NonFiniteLogitsError(message)
        return logits

    def forward(self, x: torch.Tensor, *, seq_len: int | None = None, token_ids: torch.Tensor | None = None) -> Routing:
        """Route tokens ``x`` (T, H); ``seq_len`` splits them into sequences, ``token_ids`` feed hash routing."""
        if x.dim() != 2 or x.shape[-1] != self.hidden_size:
            raise ValueError(f"router input must have shape (T, hidden_size={self.hidden_size}), got {tuple(x.shape)}")
        return self.route(x, seq_len=seq_len, token_ids=token_ids)

    def route(self, x: torch.Tensor, *, seq_len: int | None, token_ids: torch.Tensor | None) -> Routing:
        """The router's method: (T, H) tokens with a checked shape -> Routing."""
        raise NotImplementedError  # abstractmethod: every concrete router defines it

    def decoding_refusal(self) -> str | None:
        """Why routing tokens one at a time (incremental decoding, eval mode) would differ from routing the
        whole sequence at once, or None when it would not. The default router routes each token alone."""
        return None

    @torch.no_grad()
    def step_update(self, process_group: dist.ProcessGroup | None = None) -> None:
        """Per-optimizer-step state update; the default router has none."""

    @classmethod
    def update_group(cls, routers: list[Router], process_group: dist.ProcessGroup | None = None) -> None:
        """Update every router of this class once per optimizer step (classes may couple them)."""
        for router in routers:
            router.step_update(process_group)

    def extra_repr(self) -> str:
        return f"hidden_size={self.hidden_size}, num_experts={self.num_experts}"


def all_reduce_if_distributed(tensor: torch.Tensor, process_group: dist.ProcessGroup | None) -> torch.Tensor:
    """Sum ``tensor`` over ``process_group`` in place when torch.distributed is initialised."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor, group=process_group)
    return tensor
