"""Process groups for expert parallelism: EP groups of consecutive ranks and expert-data-parallel groups."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import timedelta

import torch.distributed as dist

from moe.validation import check_positive_int


def check_layout(world_size: int, ep_size: int, num_experts: int | Iterable[int] = ()) -> None:
    """Raise ValueError unless ``ep_size`` divides ``world_size`` and every layer's expert count."""
    check_positive_int("world_size", world_size)
    check_positive_int("ep_size", ep_size)
    if world_size % ep_size != 0:
        raise ValueError(
            f"world size {world_size} must be a multiple of ep_size={ep_size}; "
            f"valid ep_size values: {[d for d in range(1, world_size + 1) if world_size % d == 0]}"
        )
    counts = [num_experts] if isinstance(num_experts, int) else list(num_experts)
    for count in counts:
        if count % ep_size != 0:
            raise ValueError(
                f"num_experts={count} must be divisible by ep_size={ep_size} so every EP rank holds the same "
                f"number of experts; valid ep_size values: "
                f"{[d for d in range(1, world_size + 1) if world_size % d == 0 and count % d == 0]}"
            )


def ep_group_ranks(world_size: int, ep_size: int) -> list[list[int]]:
    """The EP groups: ``world_size / ep_size`` blocks of ``ep_size`` consecutive ranks."""
    check_layout(world_size, ep_size)
    return [list(range(start, start + ep_size)) for start in range(0, world_size, ep_size)]


def expert_data_group_ranks(world_size: int, ep_size: int) -> list[list[int]]:
    """The expert-data-parallel groups: ranks at the same position of every EP group (same experts)."""
    check_layout(world_size, ep_size)
    return [list(range(position, world_size, ep_size)) for position in range(ep_size)]


@dataclass(frozen=True)
class ExpertParallelGroups:
    """This rank's place in the layout and the process groups that go with it.

    ``ep_group`` exchanges tokens (all-to-all); ``expert_data_group`` averages the gradients of the
    experts this rank holds; ``data_group`` (the whole world) averages every other gradient.
    """

    world_size: int
    rank: int
    ep_size: int
    ep_rank: int
    ep_group: dist.ProcessGroup
    expert_data_group: dist.ProcessGroup
    data_group: dist.ProcessGroup

    @property
    def expert_data_size(self) -> int:
        """Number of ranks holding a copy of each expert: ``world_size / ep_size``."""
        return self.world_size // self.ep_size


def init_expert_parallel(
    ep_size: int, num_experts: int | Iterable[int] = (), timeout: timedelta | None = None
) -> ExpertParallelGroups:
    """Create the EP and expert-data-parallel groups on an initialised default process group.

    Every rank must call it (``new_group`` is collective) with the same arguments. ``num_experts``
    (one count or one per MoE layer) is checked against ``ep_size`` before any group is created.
    """
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("init_expert_parallel needs torch.distributed initialised (dist.init_process_group)")
    world_size, rank = dist.get_world_size(), dist.get_rank()
    check_layout(world_size, ep_size, num_experts)
    kwargs = {} if timeout is None else {"timeout": timeout}
    ep_group = expert_data_group = None
    for ranks in ep_group_ranks(world_size, ep_size):
        group = dist.new_group(ranks, **kwargs)
        if rank in ranks:
            ep_group = group
    for ranks in expert_data_group_ranks(world_size, ep_size):
        group = dist.new_group(ranks, **kwargs)
        if rank in ranks:
            expert_data_group = group
    return ExpertParallelGroups(
        world_size=world_size,
        rank=rank,
        ep_size=ep_size,
        ep_rank=rank % ep_size,
        ep_group=ep_group,
        expert_data_group=expert_data_group,
        data_group=dist.group.WORLD,
    )
