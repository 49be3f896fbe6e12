"""``ExpertPlacement``: which experts live on which expert-parallel rank (the one place that says so)."""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist

from moe.validation import check_positive_int


@dataclass(frozen=True)
class ExpertPlacement:
    """Experts ``[ep_rank * L, (ep_rank + 1) * L)`` live on this rank, ``L = num_experts / ep_size``.

    ``ep_group`` is the process group the experts are spread over (None for a single-process layer).
    """

    num_experts: int
    ep_size: int = 1
    ep_rank: int = 0
    ep_group: dist.ProcessGroup | None = None

    def __post_init__(self):
        check_positive_int("num_experts", self.num_experts)
        check_positive_int("ep_size", self.ep_size)
        if self.num_experts % self.ep_size != 0:
            raise ValueError(
                f"num_experts={self.num_experts} must be divisible by the EP group size ep_size={self.ep_size}"
            )
        if isinstance(self.ep_rank, bool) or not isinstance(self.ep_rank, int) or not 0 <= self.ep_rank < self.ep_size:
            raise ValueError(f"ep_rank must be an int in [0, ep_size={self.ep_size}), got {self.ep_rank!r}")

    @classmethod
    def over_group(cls, num_experts: int, ep_group: dist.ProcessGroup) -> ExpertPlacement:
        """The placement of this process's experts when ``num_experts`` are spread over ``ep_group``."""
        return cls(num_experts, dist.get_world_size(ep_group), dist.get_rank(ep_group), ep_group)

    @property
    def num_local_experts(self) -> int:
        """L, the number of experts this rank holds."""
        return self.num_experts // self.ep_size

    @property
    def local_experts(self) -> range:
        """Global indices of the experts this rank holds."""
        start = self.ep_rank * self.num_local_experts
        return range(start, start + self.num_local_experts)

    @property
    def is_sharded(self) -> bool:
        """True when the experts are split over more than one rank."""
        return self.ep_size > 1
