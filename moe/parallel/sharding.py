"""Turn a model's MoE layers expert-parallel, and move expert weights between full and sharded layouts."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from moe.dispatch import DISPATCHERS, build_dispatcher
from moe.experts import ExpertMLP
from moe.layer import MoELayer, moe_layers


def expert_parallel_layer(
    hidden_size: int,
    ffn_hidden_size: int,
    num_experts: int,
    router="topk",
    *,
    ep_group: dist.ProcessGroup,
    dispatcher: str = "expert_parallel",
    **kwargs,
) -> MoELayer:
    """An ``MoELayer`` holding only this EP rank's ``num_experts / ep_size`` experts.

    Takes the same arguments as ``MoELayer``; ``dispatcher`` names the registered dispatcher built with
    ``ep_group`` (``moe.dispatch.DISPATCHERS``). The router and shared experts are replicated: seed every
    rank the same before building it (or use ``to_expert_parallel`` on an identically built full model).
    """
    return MoELayer(
        hidden_size,
        ffn_hidden_size,
        num_experts,
        router,
        dispatcher=build_dispatcher(dispatcher, num_experts, ep_group=ep_group),
        **kwargs,
    )


def shard_experts(experts: ExpertMLP, ep_rank: int, ep_size: int) -> ExpertMLP:
    """A new expert module of the same class holding experts ``[ep_rank * L, (ep_rank + 1) * L)`` (copied)."""
    if experts.num_experts % ep_size != 0:
        raise ValueError(f"num_experts={experts.num_experts} must be divisible by ep_size={ep_size}")
    if not 0 <= ep_rank < ep_size:
        raise ValueError(f"ep_rank must be in [0, ep_size={ep_size}), got {ep_rank}")
    local = experts.num_experts // ep_size
    with torch.device("meta"):
        shard = type(experts)(local, experts.hidden_size, experts.ffn_hidden_size, experts.activation)
    shard = shard.to_empty(device=experts.w_in.device)
    with torch.no_grad():
        for name, param in shard.named_parameters():
            full = getattr(experts, name)
            param.copy_(full[ep_rank * local : (ep_rank + 1) * local])
    return shard


def to_expert_parallel(model: nn.Module, ep_group: dist.ProcessGroup, dispatcher: str = "expert_parallel") -> nn.Module:
    """Make every ``MoELayer`` of ``model`` expert-parallel over ``ep_group``, in place; returns ``model``.

    Each layer's single-process dispatcher ("local" or "triton") is replaced by the registered dispatcher
    ``dispatcher`` built with ``ep_group``, which keeps the old one for this rank's own permute and combine
    (``local=``), so a layer with the Triton kernels keeps them around the all-to-all. The layer keeps its
    router and shared experts and only the slice of the experts its placement names, so a model built
    identically on every rank (same seed) behaves exactly like the single-process model on each rank's
    tokens. Cost: the full experts exist on each rank until this call frees them.
    """
    for name, layer in moe_layers(model):
        local = dispatcher_name(layer.dispatcher)
        if layer.placement.ep_group is not None or local is None:
            raise TypeError(
                f"MoE layer '{name}' uses {type(layer.dispatcher).__name__}; to_expert_parallel replaces a "
                "registered single-process dispatcher (build the layer with dispatcher='local' or 'triton')"
            )
        if layer.experts.num_experts != layer.num_experts:
            raise ValueError(f"MoE layer '{name}' holds {layer.experts.num_experts} of {layer.num_experts} experts")
        layer.dispatcher = build_dispatcher(dispatcher, layer.num_experts, ep_group=ep_group, local=local)
        layer.experts = shard_experts(layer.experts, layer.placement.ep_rank, layer.placement.ep_size)
    return model


def dispatcher_name(dispatcher) -> str | None:
    """The name ``dispatcher``'s class is registered under (None when it is not registered)."""
    return next((name for name, cls in DISPATCHERS.items() if type(dispatcher) is cls), None)


def expert_parallel_layers(model: nn.Module) -> list[tuple[str, MoELayer]]:
    """(name, layer) for every MoE layer whose experts are placed over an EP group."""
    return [(n, m) for n, m in moe_layers(model) if m.placement.ep_group is not None]


def expert_parameter_names(model: nn.Module) -> list[str]:
    """State-dict names of the sharded expert parameters (``model`` unwrapped, as for ``state_dict``)."""
    names = []
    for layer_name, layer in expert_parallel_layers(model):
        prefix = f"{layer_name}.experts." if layer_name else "experts."
        names += [prefix + name for name, _ in layer.experts.named_parameters()]
    return names


def expert_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The sharded expert parameters: their gradients are averaged over the expert-data-parallel group."""
    return [p for _, layer in expert_parallel_layers(model) for p in layer.experts.parameters()]
