"""``MoELayer``: router -> dispatcher.permute -> experts -> dispatcher.combine, plus model-wide helpers."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from moe.dispatch import Dispatcher, ExpertPlacement, build_dispatcher
from moe.experts import DenseMLP, ExpertMLP, build_experts
from moe.routers import Router, TopKRouter, build_router
from moe.routing import Routing
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
            built with ``**router_kwargs``, or a ``moe.routers.Router`` instance. ``top_k`` (and
            ``vocab_size``) mean the same for every name (``moe.routers.Router.layer_kwargs``): expert
            choice takes ``top_k`` as its capacity factor; BASE and hash give each token one expert and do
            not use it; hash needs ``vocab_size``.
        activation: "swiglu" (default), "gelu" or "relu".
        experts: "grouped" (``torch._grouped_mm``, default), "loop" (reference), or an ``ExpertMLP``.
        shared_experts: number of always-on experts (DeepSeek-MoE); implemented as one dense MLP of
            width ``shared_experts * ffn_hidden_size``, or ``shared_ffn_hidden_size`` when given.
        shared_expert_gate: multiply the shared output by a learned ``sigmoid(x . w)`` (Qwen2-MoE).
        dispatcher: the permute/combine strategy, a name of ``moe.dispatch.DISPATCHERS`` built for
            ``num_experts`` ("local": pure torch, the default; "triton": the ``moe.kernels`` permute/combine
            and, for a top-k router built by name, its Triton top-k selection; pure torch where they cannot
            run) or a ``moe.dispatch.Dispatcher`` instance (expert parallel: see ``moe.parallel``).

    Returns a tensor of the input's shape: the sum over each token's experts of weight * expert(x)
    (plus the shared experts). Tokens routed to no expert get zero; the caller adds the residual.
    After each forward, ``layer.aux_loss`` holds the router's weighted auxiliary loss (with grad),
    ``layer.last_routing`` the ``moe.Routing`` and ``layer.last_stats`` the routing statistics;
    ``moe.aux_loss(model)`` reads (and consumes) the layers' losses for training.

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
        dispatcher: str | Dispatcher = "local",
        **router_kwargs,
    ):
        super().__init__()
        self.hidden_size = check_positive_int("hidden_size", hidden_size)
        self.num_experts = check_positive_int("num_experts", num_experts)
        check_positive_int("ffn_hidden_size", ffn_hidden_size)
        if "kernels" in router_kwargs:
            raise ValueError(
                "MoELayer(kernels=...) was renamed: use dispatcher='triton' "
                "(it selects the Triton router top-k and permute/combine)"
            )
        if isinstance(dispatcher, str):
            self.dispatcher = build_dispatcher(dispatcher, num_experts)
        elif isinstance(dispatcher, Dispatcher):
            if dispatcher.placement.num_experts != num_experts:
                raise ValueError(
                    f"dispatcher is placed for num_experts={dispatcher.placement.num_experts}; "
                    f"layer has num_experts={num_experts}"
                )
            self.dispatcher = dispatcher
        else:
            raise TypeError(f"dispatcher must be a name or a moe.dispatch.Dispatcher, got {type(dispatcher).__name__}")
        if isinstance(router, Router):
            if router_kwargs:
                raise TypeError(f"router keyword arguments {sorted(router_kwargs)} given with a router instance")
            self.router = router
        elif isinstance(router, str):
            self.router = build_router(router, hidden_size, num_experts, **router_kwargs)
            if isinstance(self.router, TopKRouter):
                self.router.triton_topk = self.dispatcher.triton_topk
        else:
            raise TypeError(f"router must be a name or a moe.routers.Router, got {type(router).__name__}")
        if self.router.num_experts != num_experts or self.router.hidden_size != hidden_size:
            raise ValueError(
                f"router has hidden_size={self.router.hidden_size}, num_experts={self.router.num_experts}; "
                f"layer has hidden_size={hidden_size}, num_experts={num_experts}"
            )
        num_local = self.placement.num_local_experts
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
        self.last_routing: Routing | None = None
        self.last_stats: RoutingStats | None = None
        self._unread_aux_loss: torch.Tensor | None = None

    @property
    def placement(self) -> ExpertPlacement:
        """Which experts this layer holds (its dispatcher's ``ExpertPlacement``)."""
        return self.dispatcher.placement

    def take_aux_loss(self) -> torch.Tensor | None:
        """The aux loss of the forward that ran since the last call, once; None if none ran since."""
        loss, self._unread_aux_loss = self._unread_aux_loss, None
        return loss

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
        self._unread_aux_loss = routing.aux_loss
        self.last_routing = routing
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
    """Sum of the auxiliary losses of ``model``'s MoE layers that ran since the previous call (add it to the
    task loss); a scalar zero when none did.

    Reading consumes: each layer forward counts in exactly one call, so a layer the latest forward skipped
    contributes nothing, and a second call without a new forward returns zero. Call it once after each
    forward whose loss you train on (the trainer does, once per micro-batch). ``layer.aux_loss`` keeps the
    last forward's loss for inspection.
    """
    taken = [layer.take_aux_loss() for _, layer in moe_layers(model)]
    losses = [loss for loss in taken if loss is not None]
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
