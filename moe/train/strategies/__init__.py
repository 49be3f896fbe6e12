"""``trainer.strategy``: the registry of training strategies (``base.Strategy`` subclasses) by name."""

from __future__ import annotations

import torch

from moe.train.strategies.base import NonFiniteGradientError, Strategy
from moe.train.strategies.ddp import DDPStrategy
from moe.train.strategies.deepspeed import DeepSpeedStrategy
from moe.train.strategies.fsdp import FSDPStrategy
from moe.validation import check_choice

STRATEGIES: dict[str, type[Strategy]] = {cls.name: cls for cls in (DDPStrategy, FSDPStrategy, DeepSpeedStrategy)}


def strategy_class(name: str) -> type[Strategy]:
    """The strategy registered as ``name``; raises naming the valid ones."""
    check_choice("trainer.strategy", name, STRATEGIES)
    return STRATEGIES[name]


def make_strategy(cfg, world_size: int, device: torch.device) -> Strategy:
    """The strategy of a ``TrainConfig`` (``trainer.strategy``, ``parallel.ep_size``, ...)."""
    return strategy_class(cfg.trainer.strategy).from_config(cfg, world_size, device)


__all__ = [
    "STRATEGIES",
    "DDPStrategy",
    "DeepSpeedStrategy",
    "FSDPStrategy",
    "NonFiniteGradientError",
    "Strategy",
    "make_strategy",
    "strategy_class",
]
