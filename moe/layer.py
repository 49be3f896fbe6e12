"""``MoELayer``: router -> dispatcher.permute -> experts -> dispatcher.combine, plus model-wide helpers."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from moe.dispatch import LocalDispatcher
from moe.dispatch.fused import FusedDispatcher, build_kernel_router
from moe.experts import DenseMLP, ExpertMLP, build_experts
from moe.routers import Router, build_router
from moe.validation import check_positive_int


@dataclass
class RoutingStats:
    """What the last forward routed: detached tensors, read without a host sync until you need them."""

    tokens_per_expert: torch.Tensor
    dropped_fraction: float
    aux_loss: torch.Tensor
    experts_per_token: float = 0.0  # routed (token, expert) pairs per token: k for top-k, measured for dynamic-k


class MoELayer(nn.Module):
    """A Mixture-of-Experts feed-forward layer.

    Example::

        layer = moe.MoELayer(hidden_size=512, ffn_hidden_size=1024, num_experts=8, router="topk", top_k=2)
        y = layer(x)                    # x (..., 512) -> y (..., 512)
        loss = task_loss + moe.aux_loss(model)

    Args:
        router: a router name (``moe.routers.ROUTERS``: "topk", "expert_choice", "relu", "base", ...)
            built with ``**router_kwargs``, or a ``moe.routers.Router`` instance.
        activation: "swiglu" (default), "gelu" or "relu".
        experts: "grouped" (``torch._grouped_mm``, default), "loop" (reference), or an ``ExpertMLP``.
        shared_experts: number of always-on experts (DeepSeek-MoE); implemented as one dense MLP of
            width ``shared_experts * ffn_hidden_size``, or ``shared_ffn_hidden_size`` when given.
        shared_expert_gate: multiply the shared output by a learned ``sigmoid(x . w)`` (Qwen2-MoE).
        dispatcher: permute/combine strategy; default ``LocalDispatcher`` (expert parallel: pass an EP one).
        kernels: use the Triton kernels (``moe.kernels``): ``FusedDispatcher``, and for ``router="topk"``
            the fused top-k router; pure torch where they cannot run (no triton, or CPU tensors).

    Returns a tensor of the input's shape: the sum over each token's experts of weight * expert(x)
    (plus the shared experts). Tokens routed to no expert get zero; the caller adds the residual.
    After each forward, ``layer.aux_loss`` holds the router's weighted auxiliary loss (with grad)
    and ``layer.last_stats`` the routing statistics.

    Cost per token: the router GEMM (H x E) plus, for each of its ~k experts, 2 * H * F * (3 if
    swiglu else 2) FLOPs forward; memory for the N = T * k permuted rows and their hidden states.
    """

    def __init__(
        self,
        hidden_size: int,
        ffn_hidden_size: int,
        num_experts: int,
        router: str | Router = "topk",
        *,
        activation: str = "swiglu",
        experts: str | ExpertMLP = "grouped",
        shared_experts: int = 0,
        shared_ffn_hidden_size: int | None = None,
        shared_expert_gate: bool = False,
        dispatcher=None,
        kernels: bool = False,
        **router_kwargs,
    ):
        super().__init__()
        self.hidden_size = check_positive_int("hidden_size", hidden_size)
        self.num_experts = check_positive_int("num_experts", num_experts)
        check_positive_int("ffn_hidden_size", ffn_hidden_size)
        if isinstance(router, Router):
            if router_kwargs:
                raise TypeError(f"router keyword arguments {sorted(router_kwargs)} given with a router instance")
            self.router = router
        elif isinstance(router, str):
            build = build_kernel_router if kernels else build_router
            self.router = build(router, hidden_size, num_experts, **router_kwargs)
        else:
            raise TypeError(f"router must be a name or a moe.routers.Router, got {type(router).__name__}")
        if self.router.num_experts != num_experts or self.router.hidden_size != hidden_size:
            raise ValueError(
                f"router has hidden_size={self.router.hidden_size}, num_experts={self.router.num_experts}; "
                f"layer has hidden_size={hidden_size}, num_experts={num_experts}"
            )
        if kernels:
            if dispatcher is not None:
                raise ValueError("kernels=True selects FusedDispatcher; pass kernels=True or dispatcher=, not both")
            dispatcher = FusedDispatcher()
        self.dispatcher = dispatcher if dispatcher is not None else LocalDispatcher()
        num_local = getattr(self.dispatcher, "num_local_experts", num_experts)
        if isinstance(experts, ExpertMLP):
            if (experts.num_experts, experts.hidden_size) != (num_local, hidden_size):
                raise ValueError(
                    f"experts have num_experts={experts.num_experts}, hidden_size={experts.hidden_size}; "
                    f"layer needs num_experts={num_local} (local), hidden_size={hidden_size}"
                )
            self.experts = experts
        elif isinstance(experts, str):
            self.experts = build_experts(experts, num_local, hidden_size, ffn_hidden_size, activation)
        else:
            raise TypeError(f"experts must be a name or a moe.experts.ExpertMLP, got {type(experts).__name__}")
        check_positive_int("shared_experts", shared_experts, minimum=0)
        if shared_ffn_hidden_size is not None:
            check_positive_int("shared_ffn_hidden_size", shared_ffn_hidden_size)
        self.shared_experts = None
        self.shared_expert_gate = None
        if shared_experts > 0 or shared_ffn_hidden_size is not None:
            width = shared_ffn_hidden_size or shared_experts * ffn_hidden_size
            self.shared_experts = DenseMLP(hidden_size, width, activation)
            if shared_expert_gate:
                self.shared_expert_gate = nn.Linear(hidden_size, 1, bias=False)
        elif shared_expert_gate:
            raise ValueError("shared_expert_gate=True needs shared_experts > 0 or shared_ffn_hidden_size")
        self.aux_loss: torch.Tensor | None = None
        self.last_stats: RoutingStats | None = None

    def forward(self, x: torch.Tensor, token_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Route, run the experts and combine; ``token_ids`` (x's leading shape) feed the hash router."""
        if x.shape[-1] != self.hidden_size:
            raise ValueError(f"input last dimension must be hidden_size={self.hidden_size}, got shape {tuple(x.shape)}")
        seq_len = x.shape[-2] if x.dim() >= 3 else None
        flat = x.reshape(-1, self.hidden_size)
        routing = self.router(flat, seq_len=seq_len, token_ids=None if token_ids is None else token_ids.reshape(-1))
        dispatched = self.dispatcher.permute(flat, routing)
        expert_out = self.experts(dispatched.rows, dispatched.tokens_per_expert)
        out = self.dispatcher.combine(expert_out, dispatched, routing)
        if self.shared_experts is not None:
            shared = self.shared_experts(flat)
            if self.shared_expert_gate is not None:
                shared = shared * torch.sigmoid(self.shared_expert_gate(flat))
            out = out + shared
        self.aux_loss = routing.aux_loss
        self.last_stats = RoutingStats(
            tokens_per_expert=routing.tokens_per_expert.detach(),
            dropped_fraction=routing.dropped_fraction,
            aux_loss=routing.aux_loss.detach(),
            experts_per_token=routing.token_index.numel() / max(routing.num_tokens, 1),
        )
        return out.view(x.shape)


def moe_layers(model: nn.Module) -> list[tuple[str, MoELayer]]:
    """(name, layer) for every MoELayer in ``model``, in module order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, MoELayer)]


def name_moe_layers(model: nn.Module) -> None:
    """Tell each MoE layer's router its module path so errors (non-finite logits) can name it."""
    for name, layer in moe_layers(model):
        layer.router.layer_name = name or "moe"


def aux_loss(model: nn.Module) -> torch.Tensor:
    """Sum of every MoE layer's auxiliary loss from its last forward (add it to the task loss)."""
    losses = [layer.aux_loss for _, layer in moe_layers(model) if layer.aux_loss is not None]
    if not losses:
        param = next(model.parameters(), None)
        return torch.zeros((), device=param.device if param is not None else None)
    return torch.stack([loss.float() for loss in losses]).sum()


def update_routers(model: nn.Module, process_group: dist.ProcessGroup | None = None) -> None:
    """Run each router's once-per-optimizer-step update (balancing biases, ReLU coefficients).

    Call it after ``optimizer.step()``. Under data parallelism, pass the group whose loads should
    be summed (default: the whole world when torch.distributed is initialised).
    """
    by_class: dict[type, list[Router]] = {}
    for _, layer in moe_layers(model):
        by_class.setdefault(type(layer.router), []).append(layer.router)
    for cls, routers in by_class.items():
        cls.update_group(routers, process_group)
