"""Routers: each maps tokens (T, H) to a ``moe.Routing``; pick one by name with ``build_router``.

A router registers its name with ``@register_router(name)`` where its class is defined; the modules
below are imported so that the built-in names exist.
"""

from moe.routers.balanced_assignment import BASERouter
from moe.routers.base import Router
from moe.routers.expert_choice import ExpertChoiceRouter
from moe.routers.hash import HashRouter
from moe.routers.null_experts import NullExpertRouter
from moe.routers.registry import INTERNAL_ROUTERS, ROUTERS, build_router, register_router, router_name, router_names
from moe.routers.relu import ReLURouter
from moe.routers.sinkhorn import SinkhornRouter
from moe.routers.top_p import TopPRouter
from moe.routers.topk import TopKRouter

__all__ = [
    "INTERNAL_ROUTERS",
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
    "register_router",
    "router_name",
    "router_names",
]
