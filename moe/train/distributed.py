"""Where a ``moe-train`` process sits: joining the process group (torchrun or submitit tasks) and its device."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistContext:
    """Where this process sits: rank, world size, device, and the data-parallel process group."""

    rank: int
    world_size: int
    device: torch.device
    process_group: dist.ProcessGroup | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def setup_distributed(device_choice: str) -> DistContext:
    """Pick the device and, under torchrun (WORLD_SIZE > 1), join the process group (NCCL on GPU, gloo on CPU)."""
    export_submitit_env()
    use_cuda = device_choice == "cuda" or (device_choice == "auto" and torch.cuda.is_available())
    if device_choice == "cuda" and not torch.cuda.is_available():
        raise ValueError("trainer.device='cuda' but no CUDA device is available; valid here: auto, cpu")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return DistContext(rank=rank, world_size=world_size, device=device, process_group=None)


def export_submitit_env() -> bool:
    """Inside a hydra-submitit-launcher job with several tasks (no torchrun), export ``RANK``, ``WORLD_SIZE``,
    ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` from the job's environment for ``env://`` set-up.

    Returns whether it exported anything (not under torchrun, not outside submitit, not for one task).
    """
    if "WORLD_SIZE" in os.environ or "SUBMITIT_EXECUTOR" not in os.environ:
        return False
    from submitit.helpers import TorchDistributedEnvironment

    environment = TorchDistributedEnvironment()
    if environment.world_size <= 1:
        return False
    environment.export(set_cuda_visible_devices=False)
    return True
