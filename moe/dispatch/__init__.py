"""Dispatchers: the seam between routing and experts (local gather, Triton kernels, all-to-all for EP).

``build_dispatcher(name, num_experts, ...)`` builds one of ``DISPATCHERS`` ("local", "triton",
"expert_parallel"); ``register_dispatcher(name)`` adds a ``Dispatcher`` subclass (docs/architecture.md).
``ExpertPlacement`` says which experts each expert-parallel rank holds.
"""

from moe.dispatch.base import Dispatched, Dispatcher, weighted_scatter_add
from moe.dispatch.expert_parallel import ExchangeState, ExpertParallelDispatcher
from moe.dispatch.fused import FusedDispatcher, FusedState
from moe.dispatch.local import LocalDispatcher
from moe.dispatch.placement import ExpertPlacement
from moe.dispatch.registry import DISPATCHERS, build_dispatcher, register_dispatcher

__all__ = [
    "DISPATCHERS",
    "Dispatched",
    "Dispatcher",
    "ExchangeState",
    "ExpertParallelDispatcher",
    "ExpertPlacement",
    "FusedDispatcher",
    "FusedState",
    "LocalDispatcher",
    "build_dispatcher",
    "register_dispatcher",
    "weighted_scatter_add",
]
