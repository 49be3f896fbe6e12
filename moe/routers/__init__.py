"""Routers: each maps tokens (T, H) to a ``moe.Routing``; pick one by name with ``build_router``."""

from moe.routers.base import Router
from moe.routers.topk import TopKRouter

ROUTERS: dict[str, type[Router]] = {
    "topk": TopKRouter,
}


def build_router(name: str, hidden_size: int, num_experts: int, **kwargs) -> Router:
    """Build the router registered as ``name`` with its keyword arguments."""
    if name not in ROUTERS:
        raise ValueError(f"unknown router {name!r}; valid: {sorted(ROUTERS)}")
    return ROUTERS[name](hidden_size, num_experts, **kwargs)


__all__ = ["ROUTERS", "Router", "TopKRouter", "build_router"]
