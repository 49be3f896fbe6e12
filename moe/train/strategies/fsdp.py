"""``trainer.strategy=fsdp``: FSDP2 ``fully_shard`` of every block and the root over all ranks."""

from __future__ import annotations

import contextlib

from torch import nn

from moe.parallel import expert_parameters
from moe.train.strategies.base import Strategy


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


class FSDPStrategy(Strategy):
    """Dense parameters sharded over the world (sharded experts are left out of FSDP); checkpoints and the
    gradient norm go through the full-tensor helpers. With one process the model is trained unwrapped."""

    name = "fsdp"

    def wrap(self, model: nn.Module) -> nn.Module:
        """FSDP2 replaces parameters, so call this before building the optimizer."""
        if not self.distributed:
            return model
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(self.device.type, (self.world_size,))
        ignored = set(expert_parameters(model))
        for block in getattr(model, "blocks", []):
            fully_shard(block, mesh=mesh, ignored_params=ignored & set(block.parameters()) or None)
        fully_shard(model, mesh=mesh, ignored_params=ignored or None)
        return _FSDPRoot(model)

    def _layout_dependent(self) -> bool:
        return self.distributed or self.groups is not None
