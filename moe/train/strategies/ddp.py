"""``trainer.strategy=ddp``: DistributedDataParallel over the dense parameters (one process: the model as is)."""

from __future__ import annotations

from torch import nn

from moe.parallel import expert_parameter_names
from moe.train.strategies.base import Strategy


class DDPStrategy(Strategy):
    """DDP all-reduces the dense gradients in backward; sharded experts are left out of it (``Strategy.step``
    averages them over their expert-data-parallel group). With one process the model is trained unwrapped."""

    name = "ddp"

    def wrap(self, model: nn.Module) -> nn.Module:
        if not self.distributed:
            return model
        nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
            model, expert_parameter_names(model)
        )
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
