"""Turn a model's MoE layers expert-parallel, and move expert weights between full and sharded layouts."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from moe.dispatch.expert_parallel import ExpertParallelDispatcher
from moe.experts import ExpertMLP
from moe.layer import MoELayer, moe_layers


def expert_parallel_layer(
    hidden_size: int, ffn_hidden_size: int, num_experts: int, router="topk", *, ep_group: dist.ProcessGroup, **kwargs
) -> MoELayer:
    """An ``MoELayer`` holding only this EP rank's ``num_experts / ep_size`` experts.

    Takes the same arguments as ``MoELayer``. The router and shared experts are replicated: seed every
    rank the same before building it (or use ``to_expert_parallel`` on an identically built full model).
    """
    return MoELayer(
        hidden_size,
        ffn_hidden_size,
        num_experts,
        router,
        dispatcher=ExpertParallelDispatcher(ep_group, num_experts),
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


def to_expert_parallel(model: nn.Module, ep_group: dist.ProcessGroup) -> nn.Module:
    """Make every ``MoELayer`` of ``model`` expert-parallel over ``ep_group``, in place; returns ``model``.

    Each layer keeps its router and shared experts and keeps only this rank's slice of the experts, so
    a model built identically on every rank (same seed) behaves exactly like the single-process model
    on each rank's tokens. Cost: the full experts exist on each rank until this call frees them.
    """
    ep_size, ep_rank = dist.get_world_size(ep_group), dist.get_rank(ep_group)
    for name, layer in moe_layers(model):
        if isinstance(layer.dispatcher, ExpertParallelDispatcher):
            raise TypeError(f"MoE layer '{name}' is already expert-parallel")
        if layer.experts.num_experts != layer.num_experts:
            raise ValueError(f"MoE layer '{name}' holds {layer.experts.num_experts} of {layer.num_experts} experts")
        layer.dispatcher = ExpertParallelDispatcher(ep_group, layer.num_experts)
        layer.experts = shard_experts(layer.experts, ep_rank, ep_size)
    return model


def expert_parallel_layers(model: nn.Module) -> list[tuple[str, MoELayer]]:
    """(name, layer) for every MoE layer whose experts are sharded over an EP group."""
    return [(n, m) for n, m in moe_layers(model) if isinstance(m.dispatcher, ExpertParallelDispatcher)]


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


def gather_expert_tensor(shard: torch.Tensor, ep_group: dist.ProcessGroup) -> torch.Tensor:
    """Concatenate every EP rank's (L, ...) shard into the full (E, ...) tensor (collective)."""
    parts = [torch.empty_like(shard) for _ in range(dist.get_world_size(ep_group))]
    dist.all_gather(parts, shard.detach().contiguous(), group=ep_group)
    return torch.cat(parts)


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` with every sharded expert tensor gathered to its full (E, ...) size.

    The result has the single-process model's keys and shapes, so it loads into any EP layout. It is
    a collective over each layer's EP group: every rank must call it.
    """
    state = model.state_dict()
    for layer_name, layer in expert_parallel_layers(model):
        prefix = f"{layer_name}.experts." if layer_name else "experts."
        for name, param in layer.experts.named_parameters():
            state[prefix + name] = gather_expert_tensor(param, layer.dispatcher.ep_group)
    return state


def shard_state_dict(model: nn.Module, full_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Slice the full expert tensors of ``full_state`` down to what this rank's EP layers hold."""
    state = dict(full_state)
    for layer_name, layer in expert_parallel_layers(model):
        prefix = f"{layer_name}.experts." if layer_name else "experts."
        dispatcher: ExpertParallelDispatcher = layer.dispatcher
        for name, _ in layer.experts.named_parameters():
            key = prefix + name
            if key not in state:
                continue
            full = state[key]
            if full.shape[0] != dispatcher.num_experts:
                raise ValueError(
                    f"'{key}' has {full.shape[0]} experts in the checkpoint, the layer has {dispatcher.num_experts}"
                )
            local = dispatcher.local_experts
            state[key] = full[local.start : local.stop]
    return state


def load_full_state_dict(model: nn.Module, full_state: dict[str, torch.Tensor], strict: bool = True):
    """Load a layout-independent state dict (from ``full_state_dict`` or a single-process model)."""
    return model.load_state_dict(shard_state_dict(model, full_state), strict=strict)
