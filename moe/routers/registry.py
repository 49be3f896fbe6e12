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


def build_router(
    name: str, hidden_size: int, num_experts: int, *, top_k: int | None = None, vocab_size: int | None = None, **kwargs
) -> Router:
    """Build the router registered as ``name`` (internal names included) with its keyword arguments.

    ``top_k`` and ``vocab_size`` are the layer's: each router maps them to its own arguments
    (``Router.layer_kwargs``), so every router name works with the same layer arguments.
    """
    if name not in ROUTERS:
        raise ValueError(f"unknown router {name!r}; valid: {router_names()}")
    cls = ROUTERS[name]
    return cls(hidden_size, num_experts, **cls.layer_kwargs(name, kwargs, top_k, vocab_size))
