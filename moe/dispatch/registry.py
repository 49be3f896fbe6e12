"""Dispatchers selectable by name (``MoELayer(dispatcher="local")``, ``ModelConfig.dispatcher``)."""

from __future__ import annotations

from collections.abc import Callable

from moe.dispatch.base import Dispatcher

DISPATCHERS: dict[str, type[Dispatcher]] = {}


def register_dispatcher(name: str) -> Callable[[type[Dispatcher]], type[Dispatcher]]:
    """Class decorator: make a ``Dispatcher`` subclass buildable as ``build_dispatcher(name, ...)``."""

    def register(cls: type[Dispatcher]) -> type[Dispatcher]:
        if not (isinstance(cls, type) and issubclass(cls, Dispatcher)):
            raise TypeError(f"register_dispatcher({name!r}) needs a moe.dispatch.Dispatcher subclass, got {cls!r}")
        if name in DISPATCHERS and DISPATCHERS[name] is not cls:
            raise ValueError(f"dispatcher name {name!r} is already taken by {DISPATCHERS[name].__name__}")
        DISPATCHERS[name] = cls
        return cls

    return register


def build_dispatcher(name: str, num_experts: int, **kwargs) -> Dispatcher:
    """The dispatcher registered as ``name`` for ``num_experts`` experts; ``kwargs`` go to its constructor."""
    if name not in DISPATCHERS:
        raise ValueError(f"unknown dispatcher {name!r}; valid: {sorted(DISPATCHERS)}")
    return DISPATCHERS[name](num_experts=num_experts, **kwargs)
