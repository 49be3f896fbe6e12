"""Gradient averaging for expert parallelism combined with data parallelism."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

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
