"""Base for compression routers that wrap an existing router and rewrite its Routing."""

from __future__ import annotations

import torch.distributed as dist

from moe.routers import Router, build_router
from moe.routing import Routing


def build_source(
    source_router: str | Router, hidden_size: int, num_experts: int, top_k: int | None, router_kwargs: dict
) -> Router:
    """The router to wrap: ``source_router`` itself, or the one registered under that name built with
    ``top_k`` (when given) and ``router_kwargs``; checked to have ``hidden_size`` and ``num_experts``."""
    if isinstance(source_router, str):
        source = build_router(source_router, hidden_size, num_experts, top_k=top_k, **router_kwargs)
    elif router_kwargs or top_k is not None:
        raise TypeError(f"router keyword arguments {sorted(router_kwargs)} given with a router instance")
    else:
        source = source_router
    if source.num_experts != num_experts or source.hidden_size != hidden_size:
        raise ValueError(
            f"router has num_experts={source.num_experts}, hidden_size={source.hidden_size}; "
            f"expected num_experts={num_experts}, hidden_size={hidden_size}"
        )
    return source


class WrappingRouter(Router):
    """A router with no gate of its own: it runs ``self.source`` (set by the subclass) and rewrites the result.

    Gives subclasses the wrapped router's ``top_k``, ``experts_per_token`` and ``min_experts``, its
    routing under this layer's name, and its per-step updates, so ``moe.update_routers`` keeps
    balancing biases and ReLU coefficients working underneath.
    """

    source: Router

    def __init__(self, hidden_size: int, num_experts: int):
        super().__init__(hidden_size, num_experts)
        self.gate = None

    @property
    def top_k(self) -> int:
        """The wrapped router's experts per token."""
        return self.source.top_k

    @property
    def experts_per_token(self) -> int | None:
        return self.source.experts_per_token

    @property
    def min_experts(self) -> int:
        return self.source.min_experts

    def route_source(self, x, *, seq_len=None, token_ids=None) -> Routing:
        """The wrapped router's Routing; errors name this layer."""
        self.source.layer_name = self.layer_name
        return self.source.route(x, seq_len=seq_len, token_ids=token_ids)

    def decoding_refusal(self) -> str | None:
        """The wrapped router's reason (the rewrite itself acts on each token alone)."""
        return self.source.decoding_refusal()

    @classmethod
    def update_group(cls, routers: list[WrappingRouter], process_group: dist.ProcessGroup | None = None) -> None:
        """Run the wrapped routers' per-step updates, grouped by their own class."""
        by_class: dict[type, list[Router]] = {}
        for router in routers:
            by_class.setdefault(type(router.source), []).append(router.source)
        for source_cls, sources in by_class.items():
            source_cls.update_group(sources, process_group)
