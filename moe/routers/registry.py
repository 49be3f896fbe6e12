"""The router registry: names that build Router classes, for configs, the layer and checkpoints."""

from __future__ import annotations

from collections.abc import Callable

from moe.routers.base import Router

# Every buildable router by name, internal ones included (a checkpoint's config may name them).
ROUTERS: dict[str, type[Router]] = {}
# Names that rebuild compressed models (merged, skipping) but are not offered as choices.
INTERNAL_ROUTERS: set[str] = set()


def register_router(name: str, *, internal: bool = False) -> Callable[[type[Router]], type[Router]]:
    """Class decorator: ``build_router(name, ...)`` builds the class; ``internal`` names are not listed as choices.

    The class is built as ``cls(hidden_size, num_experts, **kwargs)``.
    """

    def register(cls: type[Router]) -> type[Router]:
        if ROUTERS.get(name, cls) is not cls:
            raise ValueError(f"router name {name!r} is already registered to {ROUTERS[name].__name__}")
        ROUTERS[name] = cls
        if internal:
            INTERNAL_ROUTERS.add(name)
        return cls

    return register


def router_names() -> list[str]:
    """The router names users choose from (configs, error messages, docs): all registered but the internal ones."""
    return sorted(set(ROUTERS) - INTERNAL_ROUTERS)


def router_name(router: Router) -> str | None:
    """The name ``router``'s class is registered under, or None."""
    return next((name for name, cls in ROUTERS.items() if cls is type(router)), None)


def build_router(name: str, hidden_size: int, num_experts: int, **kwargs) -> Router:
    """Build the router registered as ``name`` (internal names included) with its keyword arguments."""
    if name not in ROUTERS:
        raise ValueError(f"unknown router {name!r}; valid: {router_names()}")
    return ROUTERS[name](hidden_size, num_experts, **kwargs)
