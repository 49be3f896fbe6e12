"""The interface of a ``trainer.strategy``: wrapping, the optimizer step, and layout-independent checkpoints.

A ``Strategy`` decides, from the data-parallel scheme and ``parallel.ep_size``:

- ``prepare``: shard each MoE layer's experts over its EP group (``ep_size > 1``);
- ``wrap`` / ``attach_optimizer``: the module the loop calls;
- ``accumulate`` / ``backward``: one micro-batch's forward and backward;
- ``step``: finish the gradients, clip them by the global norm, refuse a non-finite norm, apply the update;
- ``model_state`` / ``optimizer_state`` and their loaders: layout-independent checkpoints (full expert
  tensors, unsharded parameters), so a run saved with one ``ep_size`` or strategy resumes with another.

With one process every method is the plain single-process operation. The methods here serve strategies
that own the optimizer step themselves (``ddp``, ``fsdp``); ``deepspeed`` overrides what its engine does.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import ClassVar

import torch
from torch import nn

import moe
from moe.parallel import (
    ExpertParallelGroups,
    all_reduce_gradients,
    clip_grad_norm_,
    full_optimizer_state_dict,
    full_state_dict,
    init_expert_parallel,
    load_full_optimizer_state_dict,
    load_full_state_dict,
    to_expert_parallel,
)


class NonFiniteGradientError(FloatingPointError):
    """The global gradient norm was not finite; the update was not applied."""

    def __init__(self, grad_norm: float):
        self.grad_norm = grad_norm
        super().__init__(f"non-finite gradient norm {grad_norm}; the update was not applied")


def check_finite_grad_norm(grad_norm: torch.Tensor) -> None:
    """Raise ``NonFiniteGradientError`` unless ``grad_norm`` is finite (one host sync).

    The norm is global, so every rank sees the same verdict: an inf or NaN on one rank's gradients
    reaches every rank's norm through the gradient reduction.
    """
    if not torch.isfinite(grad_norm).item():
        raise NonFiniteGradientError(float(grad_norm))


class Strategy:
    """One run's data/expert-parallel layout and the operations that depend on it.

    ``ep_size`` must divide the world size and every MoE layer's expert count (checked here and in
    ``prepare``, naming the values). Subclasses set ``name`` (their ``trainer.strategy`` value).
    """

    name: ClassVar[str]

    def __init__(self, ep_size: int, world_size: int, device: torch.device):
        moe.parallel.check_layout(world_size, ep_size)
        self.ep_size = ep_size
        self.world_size = world_size
        self.device = device
        self.groups: ExpertParallelGroups | None = None
        self.model: nn.Module | None = None

    @classmethod
    def from_config(cls, cfg, world_size: int, device: torch.device) -> Strategy:
        """The strategy for a ``TrainConfig``."""
        return cls(cfg.parallel.ep_size, world_size, device)

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def prepare(self, model: nn.Module) -> nn.Module:
        """Shard the experts over EP groups (in place) when ``ep_size > 1`` and keep ``model`` as the module
        this strategy trains (``self.model``); call before building the optimizer."""
        if self.ep_size > 1:
            counts = [layer.num_experts for _, layer in moe.moe_layers(model)]
            self.groups = init_expert_parallel(self.ep_size, counts)
            model = to_expert_parallel(model, self.groups.ep_group)
        self.model = model
        return model

    def wrap(self, model: nn.Module) -> nn.Module:
        """The module to call in the loop (``model`` itself may change in place); before building the optimizer."""
        return model

    def attach_optimizer(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> nn.Module:
        """Called once the optimizer exists; returns the module to call in the loop (here ``model``)."""
        return model

    def accumulate(self, model: nn.Module, last_micro: bool):
        """Context for one micro-batch's forward and backward: no gradient sync before the last one."""
        return contextlib.nullcontext() if last_micro or not self.distributed else model.no_sync()

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of one micro-batch's loss (already divided by the number of micro-batches)."""
        loss.backward()

    def step(self, optimizer: torch.optim.Optimizer, max_norm: float) -> torch.Tensor:
        """After the last micro-batch: finish the gradients, clip them to ``max_norm`` (inf: no clipping),
        raise ``NonFiniteGradientError`` on a non-finite norm before anything is applied, then
        ``optimizer.step()``. Returns the global gradient norm before clipping (the same on every rank)."""
        if self.groups is not None:
            all_reduce_gradients(self.model, self.groups, dense=False)
        if self._layout_dependent():
            grad_norm = clip_grad_norm_(self.model, max_norm, self.groups)
        else:
            grad_norm = nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        check_finite_grad_norm(grad_norm)
        optimizer.step()
        return grad_norm

    def _layout_dependent(self) -> bool:
        """Whether this process holds only part of some tensors (so states go through the full-tensor helpers)."""
        return self.groups is not None

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
