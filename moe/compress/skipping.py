"""Dynamic expert skipping for top-2 routing ("Not All Experts are Equal", Lu et al. 2024)."""

from __future__ import annotations

import torch
from torch import nn

from moe.compress.calibration import Calibration
from moe.compress.wrapping_router import WrappingRouter, build_source
from moe.layer import moe_layers
from moe.routers import Router, register_router, router_name
from moe.routing import Routing, count_per_expert


@register_router("skipping", internal=True)
class SkippingRouter(WrappingRouter):
    """Wraps a top-2 router and drops a token's second expert when ``w2 < beta * w1``.

    ``renormalize=True`` (default, as the authors' code does): a token's kept weights are rescaled to
    the total of its original weights, so with a renormalised top-2 router a token that skips runs its
    first expert at weight 1. ``renormalize=False`` keeps ``w1`` as it was. ``beta`` is a buffer (saved
    with the model). Inference feature: dropping pairs makes the row count data
    dependent (one host sync per layer). ``last_skip_fraction`` holds the share of tokens that ran one
    expert in the last forward. Cost: the wrapped router's plus O(N) for the per-token maximum.

    Args:
        source_router: the router to wrap (an instance with ``experts_per_token == 2``) or a router
            name built with ``top_k`` (when given) and ``router_kwargs``.
        beta: the skip threshold; the default 0 skips nothing until a saved beta is loaded with the
            state dict (how a model with skipping is rebuilt by the internal router name "skipping").
        renormalize: see above; not saved with the state dict: rebuilding by the name "skipping" takes it
            as a keyword argument (default True).
    """

    def __init__(
        self,
        hidden_size: int,
        num_experts: int,
        source_router: str | Router = "topk",
        *,
        beta: float = 0.0,
        renormalize: bool = True,
        top_k: int | None = None,
        **router_kwargs,
    ):
        super().__init__(hidden_size, num_experts)
        source = build_source(source_router, hidden_size, num_experts, top_k, router_kwargs)
        if source.experts_per_token != 2:
            raise ValueError(f"dynamic skipping needs a top-2 router, got top_k={source.experts_per_token}")
        if not 0.0 <= beta <= 1.0:
            raise ValueError(f"beta must be in [0, 1], got {beta}")
        self.source = source
        self.register_buffer("beta", torch.tensor(float(beta)))
        self.renormalize = bool(renormalize)
        self.last_skip_fraction: torch.Tensor | None = None

    @property
    def experts_per_token(self) -> None:
        """None: a token runs one or two experts."""
        return None

    def route(self, x, *, seq_len=None, token_ids=None) -> Routing:
        """The wrapped router's routing less the second pairs with ``w2 < beta * w1``."""
        inner = self.route_source(x, seq_len=seq_len, token_ids=token_ids)
        weight = inner.weight.detach().float()
        first = weight.new_zeros(inner.num_tokens).scatter_reduce(0, inner.token_index, weight, "amax")
        keep = weight >= self.beta * first[inner.token_index]
        kept_experts = inner.expert_index[keep]
        skipped = inner.token_index.numel() - kept_experts.numel()
        self.last_skip_fraction = (~keep).sum() / max(inner.num_tokens, 1)
        kept_tokens, kept_weight = inner.token_index[keep], inner.weight[keep]
        if self.renormalize:
            total = inner.weight.new_zeros(inner.num_tokens).index_add(0, inner.token_index, inner.weight)
            kept_total = inner.weight.new_zeros(inner.num_tokens).index_add(0, kept_tokens, kept_weight)
            kept_weight = kept_weight * (total / kept_total.clamp_min(torch.finfo(total.dtype).tiny))[kept_tokens]
        return Routing(
            token_index=kept_tokens,
            expert_index=kept_experts,
            weight=kept_weight,
            tokens_per_expert=count_per_expert(kept_experts, self.num_experts),
            logits=inner.logits,
            aux_loss=inner.aux_loss,
            num_requested=inner.num_requested - skipped,
        )


def skipping_betas(calibration: Calibration) -> dict[str, float]:
    """beta per layer: the median of ``w2 / w1`` over the calibration tokens that had two experts."""
    betas = {}
    for name, stats in calibration.layers.items():
        if stats.top2_ratio.numel() == 0:
            raise ValueError(f"layer '{name}' recorded no top-2 weight ratios (is it a top-2 router?)")
        betas[name] = float(stats.top2_ratio.float().median())
    return betas


def enable_skipping(
    model: nn.Module,
    calibration: Calibration | None = None,
    betas: dict[str, float] | None = None,
    *,
    renormalize: bool = True,
):
    """Wrap every top-2 MoE layer's router in a ``SkippingRouter`` and return the betas used.

    Lu et al. 2024, dynamic skipping: beta per layer is the median ratio ``w2 / w1`` on calibration data
    (``calibration``), or given explicitly (``betas``). ``renormalize``: see ``SkippingRouter``.
    Calibration: the recorded top-2 ratios only.
    Cost: O(layers); at inference about half the tokens skip their second expert when beta is the median.
    """
    if (calibration is None) == (betas is None):
        raise ValueError("pass exactly one of calibration= or betas=")
    betas = skipping_betas(calibration) if calibration is not None else dict(betas)
    layers = dict(moe_layers(model))
    unknown = set(betas) - set(layers)
    if unknown:
        raise ValueError(f"unknown layers {sorted(unknown)}; MoE layers: {sorted(layers)}")
    for name, beta in betas.items():
        layer = layers[name]
        if router_name(layer.router) == "skipping":
            raise TypeError(f"layer '{name}' already has a SkippingRouter")
        wrapped = SkippingRouter(layer.hidden_size, layer.num_experts, layer.router, beta=beta, renormalize=renormalize)
        wrapped.layer_name = layer.router.layer_name
        layer.router = wrapped.to(next(wrapped.source.parameters()).device)
    return betas
