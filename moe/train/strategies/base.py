"""``trainer.strategy`` and ``parallel.ep_size`` for ``moe-train``: wrapping, gradient sync, clipping, checkpoints.

One ``ParallelPlan`` per run decides, from the strategy and the expert-parallel size:

- ``prepare``: shard each MoE layer's experts over its EP group (``ep_size > 1``);
- ``wrap``: ``ddp`` (DistributedDataParallel over the dense parameters; sharded experts are left out
  of it) or ``fsdp`` (FSDP2 ``fully_shard`` of every block and the root over all ranks; sharded experts
  are left out);
- ``finish_gradients``: after the last micro-batch, sum the expert gradients over the expert-data-parallel
  group and divide by the world size (see ``moe.parallel.all_reduce_gradients``);
- ``clip_grad_norm``: clip by the global norm, identical on every rank;
- ``model_state`` / ``optimizer_state`` and their loaders: layout-independent checkpoints (full expert
  tensors, unsharded FSDP parameters), so a run saved with one ``ep_size`` or strategy resumes with another.

``deepspeed`` (ZeRO stage 1/2) is ``moe.train.deepspeed_strategy.DeepSpeedPlan``, which overrides the
loop hooks (``attach_optimizer``, ``accumulate``, ``backward``, ``optimizer_step``); ``make_plan`` picks
the plan for a config.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable

import torch
from torch import nn

import moe
from moe.parallel import (
    ExpertParallelGroups,
    all_reduce_gradients,
    clip_grad_norm_,
    expert_parameter_names,
    expert_parameters,
    full_optimizer_state_dict,
    full_state_dict,
    init_expert_parallel,
    load_full_optimizer_state_dict,
    load_full_state_dict,
    to_expert_parallel,
)

STRATEGIES = ("ddp", "fsdp", "deepspeed")


class _FSDPRoot(nn.Module):
    """Holds an FSDP2-sharded model and gives it the ``no_sync`` context the training loop uses."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    @contextlib.contextmanager
    def no_sync(self):
        """Accumulate gradients locally (no reduce-scatter) inside the block."""
        self.module.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            self.module.set_requires_gradient_sync(True)


class ParallelPlan:
    """The run's data/expert-parallel layout and the operations that depend on it.

    With one process every method is the plain single-process operation. ``ep_size`` must divide the
    world size and every MoE layer's expert count (checked in ``prepare``, naming the values).
    """

    def __init__(self, strategy: str, ep_size: int, world_size: int, device: torch.device):
        if strategy not in STRATEGIES:
            raise ValueError(f"trainer.strategy={strategy!r} is not valid; valid: {list(STRATEGIES)}")
        if strategy == "deepspeed" and type(self) is ParallelPlan:
            raise TypeError("trainer.strategy='deepspeed' is DeepSpeedPlan: build it with make_plan(cfg, ...)")
        moe.parallel.check_layout(world_size, ep_size)
        self.strategy = strategy
        self.ep_size = ep_size
        self.world_size = world_size
        self.device = device
        self.groups: ExpertParallelGroups | None = None
        self.sharded_dense = False

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def prepare(self, model: nn.Module) -> nn.Module:
        """Shard the experts over EP groups (in place) when ``ep_size > 1``; call before building the optimizer."""
        if self.ep_size == 1:
            return model
        counts = [layer.num_experts for _, layer in moe.moe_layers(model)]
        self.groups = init_expert_parallel(self.ep_size, counts)
        return to_expert_parallel(model, self.groups.ep_group)

    def wrap(self, model: nn.Module) -> nn.Module:
        """Apply the strategy; returns the module to call in the loop (``model`` itself may change in place).

        FSDP2 replaces parameters, so call this before building the optimizer.
        """
        if not self.distributed:
            return model
        if self.strategy == "ddp":
            nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
                model, expert_parameter_names(model)
            )
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(self.device.type, (self.world_size,))
        ignored = set(expert_parameters(model))
        for block in getattr(model, "blocks", []):
            fully_shard(block, mesh=mesh, ignored_params=ignored & set(block.parameters()) or None)
        fully_shard(model, mesh=mesh, ignored_params=ignored or None)
        self.sharded_dense = True
        return _FSDPRoot(model)

    def attach_optimizer(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> nn.Module:
        """Called once the optimizer exists; returns the module to call in the loop (here ``model``)."""
        return model

    def accumulate(self, model: nn.Module, last_micro: bool):
        """Context for one micro-batch's forward and backward: no gradient sync before the last one."""
        return contextlib.nullcontext() if last_micro or not self.distributed else model.no_sync()

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of one micro-batch's loss (already divided by the number of micro-batches)."""
        loss.backward()

    def optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Apply the update (after ``finish_gradients`` and ``clip_grad_norm``)."""
        optimizer.step()

    def finish_gradients(self, model: nn.Module) -> None:
        """After the last micro-batch's backward: average the sharded experts' gradients (no-op without EP)."""
        if self.groups is not None:
            all_reduce_gradients(model, self.groups, dense=False)

    def clip_grad_norm(self, model: nn.Module, max_norm: float) -> torch.Tensor:
        """Clip by the global gradient norm and return it (the same on every rank)."""
        if self.groups is None and not self.sharded_dense:
            return nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        return clip_grad_norm_(model, max_norm, self.groups)

    def _layout_dependent(self) -> bool:
        return self.groups is not None or self.sharded_dense

    def model_state(self, model: nn.Module) -> dict:
        """The single-process model's state dict (collective under EP/FSDP: every rank calls it)."""
        return full_state_dict(model) if self._layout_dependent() else model.state_dict()

    def load_model_state(self, model: nn.Module, state: dict) -> None:
        """Load a state dict saved by any layout."""
        if self._layout_dependent():
            load_full_state_dict(model, state)
        else:
            model.load_state_dict(state)

    def optimizer_state(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
        """The optimizer state at full parameter shapes (collective under EP/FSDP)."""
        if self._layout_dependent():
            return full_optimizer_state_dict(model, optimizer)
        return optimizer.state_dict()

    def load_optimizer_state(self, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
        """Load an optimizer state saved by any layout."""
        if self._layout_dependent():
            load_full_optimizer_state_dict(model, optimizer, state)
        else:
            optimizer.load_state_dict(state)

    def export_model(self, model: nn.Module, build: Callable[[], nn.Module], is_main: bool) -> nn.Module | None:
        """A single-process copy of ``model`` on the main rank (None elsewhere), for exports. Collective."""
        if not self._layout_dependent():
            return model if is_main else None
        state = full_state_dict(model)
        if not is_main:
            return None
        single = build().to(self.device)
        single.load_state_dict(state)
        return single


def make_plan(cfg, world_size: int, device: torch.device) -> ParallelPlan:
    """The ``ParallelPlan`` for a ``TrainConfig`` (``trainer.strategy``, ``parallel.ep_size``, ...)."""
    strategy = cfg.trainer.strategy
    if strategy == "deepspeed":
        from moe.train.deepspeed_strategy import DeepSpeedPlan

        return DeepSpeedPlan(
            cfg.parallel.ep_size,
            world_size,
            device,
            zero_stage=cfg.trainer.zero_stage,
            micro_batch_size=cfg.data.batch_size,
            grad_accum=cfg.trainer.grad_accum,
            grad_clip=cfg.optim.grad_clip,
        )
    return ParallelPlan(strategy, cfg.parallel.ep_size, world_size, device)


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
