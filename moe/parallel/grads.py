"""Gradient averaging for expert parallelism combined with data parallelism."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from moe.parallel.groups import ExpertParallelGroups
from moe.parallel.sharding import expert_parameters


def _all_reduce_flat(grads: list[torch.Tensor], group, scale: float) -> None:
    """Sum ``grads`` over ``group`` in one flat buffer per dtype, then multiply by ``scale``, in place."""
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for grad in grads:
        by_dtype.setdefault(grad.dtype, []).append(grad)
    for same_dtype in by_dtype.values():
        flat = torch.cat([g.reshape(-1) for g in same_dtype])
        if dist.get_world_size(group) > 1:
            dist.all_reduce(flat, group=group)
        flat.mul_(scale)
        for grad, part in zip(same_dtype, flat.split([g.numel() for g in same_dtype])):
            grad.copy_(part.view_as(grad))


def all_reduce_gradients(
    model: nn.Module, groups: ExpertParallelGroups, *, dense: bool = True, experts: bool = True
) -> None:
    """Average gradients over the data-parallel world when each rank's loss is a mean over its own batch.

    The global loss is the mean of the ``world_size`` rank losses. A dense parameter's gradient is the
    mean over all ranks. A sharded expert's local gradient already sums the contributions of every
    token of its EP group (the all-to-all backward brings them), so its gradient is the *sum* over the
    expert-data-parallel group (the ranks holding the same experts) divided by ``world_size`` -- not the
    mean over that group, which would be ``ep_size`` times too large.

    ``dense=False`` skips the dense parameters (when DDP or FSDP already reduced them). Parameters
    without a gradient are skipped. Cost: one all-reduce per dtype and kind.
    """
    expert_ids = {id(p) for p in expert_parameters(model)}
    expert_grads, dense_grads = [], []
    for param in model.parameters():
        if param.grad is None:
            continue
        (expert_grads if id(param) in expert_ids else dense_grads).append(param.grad)
    scale = 1.0 / groups.world_size
    if experts and expert_grads:
        _all_reduce_flat(expert_grads, groups.expert_data_group, scale)
    if dense and dense_grads:
        _all_reduce_flat(dense_grads, groups.data_group, scale)


def clip_grad_norm_(model: nn.Module, max_norm: float, groups: ExpertParallelGroups | None) -> torch.Tensor:
    """Clip all gradients by their global L2 norm and return that norm (a 0-d float32 tensor, no host sync).

    The norm covers every parameter once: replicated gradients count locally, FSDP2 (DTensor) shards are
    summed over their mesh, sharded experts over the EP group. Every rank gets the same norm, so
    replicated parameters stay identical. Call after ``all_reduce_gradients``. Collective.
    """
    expert_ids = {id(p) for p in expert_parameters(model)}
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return torch.zeros(())
    device = (grads[0].to_local() if isinstance(grads[0], DTensor) else grads[0]).device
    replicated, sharded, experts = (torch.zeros((), device=device, dtype=torch.float32) for _ in range(3))
    mesh_group = None
    for param in model.parameters():
        grad = param.grad
        if grad is None:
            continue
        if isinstance(grad, DTensor):
            mesh_group = grad.device_mesh.get_group()
            sharded += grad.to_local().float().square().sum()
        elif id(param) in expert_ids:
            experts += grad.float().square().sum()
        else:
            replicated += grad.float().square().sum()
    if mesh_group is not None:
        dist.all_reduce(sharded, group=mesh_group)
    if expert_ids and groups is not None:
        dist.all_reduce(experts, group=groups.ep_group)
    total = (replicated + sharded + experts).sqrt()
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for grad in grads:
        (grad.to_local() if isinstance(grad, DTensor) else grad).mul_(coef.to(grad.dtype))
    return total
