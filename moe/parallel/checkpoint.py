"""Layout-independent model and optimizer state: full expert tensors and unsharded FSDP2 parameters.

A state dict from ``full_state_dict`` has the single-process model's keys and shapes whatever the
expert-parallel size or FSDP sharding it came from, so it loads into any layout (``ep_size`` 1, 2, 4,
DDP or FSDP2). The optimizer counterpart keeps ``torch.optim``'s index-based format, with each state
tensor at its parameter's full shape; parameter order does not depend on the layout.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from moe.dispatch import ExpertPlacement
from moe.parallel.sharding import expert_parallel_layers


def gather_expert_tensor(shard: torch.Tensor, ep_group: dist.ProcessGroup) -> torch.Tensor:
    """Concatenate every EP rank's (L, ...) shard into the full (E, ...) tensor (collective)."""
    parts = [torch.empty_like(shard) for _ in range(dist.get_world_size(ep_group))]
    dist.all_gather(parts, shard.detach().contiguous(), group=ep_group)
    return torch.cat(parts)


def _expert_groups_by_param(model: nn.Module) -> dict[int, tuple[str, ExpertPlacement]]:
    """id(expert parameter) -> (state-dict name, its layer's expert placement)."""
    found = {}
    for layer_name, layer in expert_parallel_layers(model):
        prefix = f"{layer_name}.experts." if layer_name else "experts."
        for name, param in layer.experts.named_parameters():
            found[id(param)] = (prefix + name, layer.placement)
    return found


def _to_full(value, param: torch.Tensor, placement: ExpertPlacement | None) -> object:
    """A state value at its parameter's full shape (collective when sharded); other values unchanged."""
    if not isinstance(value, torch.Tensor):
        return value
    if isinstance(value, DTensor):
        return value.full_tensor()
    if placement is not None and value.shape == param.shape:
        return gather_expert_tensor(value, placement.ep_group)
    return value


def _to_local(value, param: torch.Tensor, placement: ExpertPlacement | None, name: str) -> object:
    """The inverse of ``_to_full``: this rank's slice or shard of a full-shape state value."""
    if not isinstance(value, torch.Tensor) or value.dim() == 0:
        return value
    if placement is not None:
        if value.shape[0] != placement.num_experts:
            raise ValueError(
                f"'{name}' has {value.shape[0]} experts in the checkpoint, the layer has {placement.num_experts}"
            )
        local = placement.local_experts
        return value[local.start : local.stop]
    if isinstance(param, DTensor):
        return distribute_tensor(value.to(param.device), param.device_mesh, param.placements)
    return value


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` with sharded expert tensors gathered to (E, ...) and FSDP2 DTensors unsharded.

    Collective over the EP groups and the FSDP mesh: every rank must call it. Keys and shapes are the
    single-process model's.
    """
    experts = dict(_expert_groups_by_param(model).values())
    state = model.state_dict()
    for key, value in state.items():
        if isinstance(value, DTensor):
            state[key] = value.full_tensor()
        elif key in experts:
            state[key] = gather_expert_tensor(value, experts[key].ep_group)
    return state


def shard_state_dict(model: nn.Module, full_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """This rank's part of ``full_state``: expert slices for EP layers, DTensor shards for FSDP2 parameters.

    Collective when the model has FSDP2 parameters (``distribute_tensor`` scatters from rank 0).
    """
    experts = dict(_expert_groups_by_param(model).values())
    current = model.state_dict()
    state = dict(full_state)
    for key, value in full_state.items():
        if key in experts:
            state[key] = _to_local(value, value, experts[key], key)
        elif isinstance(current.get(key), DTensor):
            state[key] = _to_local(value, current[key], None, key)
    return state


def load_full_state_dict(model: nn.Module, full_state: dict[str, torch.Tensor], strict: bool = True):
    """Load a layout-independent state dict (from ``full_state_dict`` or a single-process model)."""
    return model.load_state_dict(shard_state_dict(model, full_state), strict=strict)


def _params_in_order(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"]]


def full_optimizer_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """``optimizer.state_dict()`` with every per-parameter tensor at its parameter's full shape (collective)."""
    experts = _expert_groups_by_param(model)
    state = optimizer.state_dict()
    params = _params_in_order(optimizer)
    full = {}
    for index in sorted(state["state"]):
        param = params[index]
        placement = experts.get(id(param), (None, None))[1]
        full[index] = {k: _to_full(v, param, placement) for k, v in state["state"][index].items()}
    return {"state": full, "param_groups": state["param_groups"]}


def load_full_optimizer_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer, full_state: dict) -> None:
    """Load a ``full_optimizer_state_dict`` into this layout's optimizer (slices experts, shards DTensors)."""
    experts = _expert_groups_by_param(model)
    params = _params_in_order(optimizer)
    local = {}
    for index in sorted(full_state["state"]):
        if index >= len(params):
            raise ValueError(f"optimizer state has parameter index {index}; this optimizer has {len(params)}")
        param = params[index]
        name, placement = experts.get(id(param), (f"parameter {index}", None))
        local[index] = {k: _to_local(v, param, placement, name) for k, v in full_state["state"][index].items()}
    optimizer.load_state_dict({"state": local, "param_groups": full_state["param_groups"]})
