"""Routers: each maps tokens (T, H) to a ``moe.Routing``; pick one by name with ``build_router``."""

from moe.routers.base import Router
from moe.routers.base_layer import BASERouter
from moe.routers.expert_choice import ExpertChoiceRouter
from moe.routers.hash import HashRouter
from moe.routers.null_experts import NullExpertRouter
from moe.routers.relu import ReLURouter
from moe.routers.sinkhorn import SinkhornRouter
from moe.routers.top_p import TopPRouter
from moe.routers.topk import TopKRouter

ROUTERS: dict[str, type[Router]] = {
    "topk": TopKRouter,
    "expert_choice": ExpertChoiceRouter,
    "relu": ReLURouter,
    "base": BASERouter,
    "sinkhorn": SinkhornRouter,
    "hash": HashRouter,
    "top_p": TopPRouter,
    "null_experts": NullExpertRouter,
}


def build_router(name: str, hidden_size: int, num_experts: int, **kwargs) -> Router:
    """Build the router registered as ``name`` with its keyword arguments."""
    if name not in ROUTERS:
        raise ValueError(f"unknown router {name!r}; valid: {sorted(ROUTERS)}")
    return ROUTERS[name](hidden_size, num_experts, **kwargs)


__all__ = [
    "ROUTERS",
    "BASERouter",
    "ExpertChoiceRouter",
    "HashRouter",
    "NullExpertRouter",
    "ReLURouter",
    "Router",
    "SinkhornRouter",
    "TopKRouter",
    "TopPRouter",
    "build_router",
]
