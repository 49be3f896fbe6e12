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


class DeviceChoiceError(ValueError):
    """``trainer.device`` cannot be met on this machine (no GPU, or fewer GPUs than local processes)."""


def use_cuda_for(device_choice: str, local_processes: int, num_gpus: int) -> bool:
    """Whether this node's processes train on CUDA: each needs a GPU of its own.

    ``auto`` takes CUDA only when every local process gets one (else the CPU); ``cuda`` without enough GPUs
    is refused with both counts, since two processes sharing a GPU under NCCL fail or hang.
    """
    if device_choice == "cpu":
        return False
    if device_choice == "auto":
        return 0 < local_processes <= num_gpus
    if num_gpus == 0:
        raise DeviceChoiceError("trainer.device='cuda' but no CUDA device is available; valid here: auto, cpu")
    if local_processes > num_gpus:
        raise DeviceChoiceError(
            f"trainer.device='cuda' needs one GPU per process: {local_processes} local processes but {num_gpus} "
            "GPU(s) on this node; start fewer processes (torchrun --nproc_per_node) or use trainer.device=cpu"
        )
    return True


def setup_distributed(device_choice: str) -> DistContext:
    """Pick the device and, under torchrun (WORLD_SIZE > 1), join the process group (NCCL on GPU, gloo on CPU)."""
    export_submitit_env()
    use_cuda = use_cuda_for(device_choice, int(os.environ.get("LOCAL_WORLD_SIZE", "1")), torch.cuda.device_count())
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
