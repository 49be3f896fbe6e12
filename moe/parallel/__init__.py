"""Expert parallelism: process groups, the EP layer, gradient averaging and layout-independent checkpoints.

Quick start for a user with their own training loop (under ``torchrun``)::

    dist.init_process_group("nccl")
    groups = moe.parallel.init_expert_parallel(ep_size=4, num_experts=8)
    torch.manual_seed(0)                       # same dense weights on every rank
    model = build_model()                      # with moe.MoELayer(..., num_experts=8) inside
    moe.parallel.to_expert_parallel(model, groups.ep_group)
    ...
    loss.backward()
    moe.parallel.all_reduce_gradients(model, groups)
    optimizer.step()

See docs/distributed.md.
"""

from moe.dispatch.expert_parallel import ExpertParallelDispatcher, all_to_all
from moe.parallel.checkpoint import (
    full_optimizer_state_dict,
    full_state_dict,
    gather_expert_tensor,
    load_full_optimizer_state_dict,
    load_full_state_dict,
    shard_state_dict,
)
from moe.parallel.grads import all_reduce_gradients, clip_grad_norm_
from moe.parallel.groups import (
    ExpertParallelGroups,
    check_layout,
    ep_group_ranks,
    expert_data_group_ranks,
    init_expert_parallel,
)
from moe.parallel.sharding import (
    expert_parallel_layer,
    expert_parallel_layers,
    expert_parameter_names,
    expert_parameters,
    shard_experts,
    to_expert_parallel,
)

__all__ = [
    "ExpertParallelDispatcher",
    "ExpertParallelGroups",
    "all_reduce_gradients",
    "all_to_all",
    "check_layout",
    "clip_grad_norm_",
    "ep_group_ranks",
    "expert_data_group_ranks",
    "expert_parallel_layer",
    "expert_parallel_layers",
    "expert_parameter_names",
    "expert_parameters",
    "full_optimizer_state_dict",
    "full_state_dict",
    "gather_expert_tensor",
    "init_expert_parallel",
    "load_full_optimizer_state_dict",
    "load_full_state_dict",
    "shard_experts",
    "shard_state_dict",
    "to_expert_parallel",
]
