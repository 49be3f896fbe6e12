"""Expert-parallel permute/combine: the local gather plus an uneven all-to-all over the EP group."""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
import torch.distributed as dist

from moe.dispatch.base import Dispatched, Dispatcher
from moe.dispatch.placement import ExpertPlacement
from moe.dispatch.registry import DISPATCHERS, build_dispatcher, register_dispatcher
from moe.routing import Routing


class _AllToAll(torch.autograd.Function):
    """Differentiable ``all_to_all_single`` with uneven splits; the backward is the reverse exchange."""

    @staticmethod
    def forward(ctx, x, output_splits, input_splits, group):
        ctx.output_splits, ctx.input_splits, ctx.group = output_splits, input_splits, group
        out = x.new_empty((sum(output_splits), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), output_splits, input_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        grad_in = grad.new_empty((sum(ctx.input_splits), *grad.shape[1:]))
        dist.all_to_all_single(grad_in, grad.contiguous(), ctx.input_splits, ctx.output_splits, group=ctx.group)
        return grad_in, None, None, None


def all_to_all(x: torch.Tensor, output_splits: list[int], input_splits: list[int], group) -> torch.Tensor:
    """Send ``x``'s row blocks (sizes ``input_splits``) to the group's ranks; receive ``output_splits`` rows.

    Differentiable: gradients travel back by the reverse all-to-all. Every rank of ``group`` must call it.
    """
    return _AllToAll.apply(x, output_splits, input_splits, group)


@dataclass(frozen=True)
class ExchangeState:
    """What ``ExpertParallelDispatcher.combine`` needs to send the expert outputs home."""

    send_splits: list[int]
    recv_splits: list[int]
    order: torch.Tensor | None  # received-row index of each expert-sorted row; None when already sorted
    gathered: Dispatched  # the local dispatcher's permute of this rank's tokens, for its combine


@register_dispatcher("expert_parallel")
class ExpertParallelDispatcher(Dispatcher):
    """Moves each routed row to the EP rank holding its expert and brings the expert output back.

    EP rank ``p`` of ``ep_group`` holds experts ``[p * L, (p + 1) * L)`` with ``L = num_experts / ep_size``
    (``placement``, an ``ExpertPlacement`` over ``ep_group``). ``permute`` gathers this rank's rows in expert
    order with the single-process dispatcher ``local`` ("local": torch gather; "triton": the Triton permute),
    exchanges the per-expert counts (one small all-to-all), sends the rows with an uneven
    ``all_to_all_single`` and regroups what arrives by local expert; ``combine`` undoes the regrouping, sends
    the expert outputs back and lets ``local`` sum ``weight * y`` per token. Routing stays on each rank's own
    tokens.

    Host sync: ``all_to_all_single`` takes its split sizes as Python ints, so each forward copies the
    (2, ep_size) send/receive row counts to the host once. That is inherent to an uneven all-to-all;
    the backward reuses the saved splits and does not sync.

    Cost per layer: two all-to-alls of N x H elements (forward), two more in the backward, and one of
    E integers.
    """

    def __init__(self, ep_group: dist.ProcessGroup, num_experts: int, local: str = "local"):
        super().__init__(ExpertPlacement.over_group(num_experts, ep_group))
        if local not in DISPATCHERS or "ep_group" in inspect.signature(DISPATCHERS[local]).parameters:
            raise ValueError(f"local={local!r} must name a single-process dispatcher (such as 'local' or 'triton')")
        self.local = build_dispatcher(local, num_experts)
        if self.local.placement.ep_group is not None:
            raise ValueError(f"local={local!r} must be a single-process dispatcher (such as 'local' or 'triton')")
        self.triton_topk = getattr(self.local, "triton_topk", False)

    def permute(self, x: torch.Tensor, routing: Routing) -> Dispatched[ExchangeState]:
        """Rows (N_local, H) for this rank's experts, grouped by local expert, and their (L,) counts."""
        placement = self.placement
        if routing.num_experts != placement.num_experts:
            raise ValueError(
                f"routing has {routing.num_experts} experts, dispatcher was built for "
                f"num_experts={placement.num_experts}"
            )
        local, ep_size, group = placement.num_local_experts, placement.ep_size, placement.ep_group
        send_counts = routing.tokens_per_expert.to(torch.int64)
        recv_counts = torch.empty_like(send_counts)
        dist.all_to_all_single(recv_counts, send_counts, group=group)
        recv_matrix = recv_counts.view(ep_size, local)
        splits = torch.stack([send_counts.view(ep_size, local).sum(1), recv_matrix.sum(1)])
        send_splits, recv_splits = splits.cpu().tolist()
        gathered = self.local.permute(x, routing)
        received = all_to_all(gathered.rows, recv_splits, send_splits, group)
        order = None
        if local > 1 and ep_size > 1:
            # Rows arrive grouped by source rank, then by expert; the experts want them by expert first.
            expert_of_row = torch.repeat_interleave(
                torch.arange(local, device=x.device).repeat(ep_size),
                recv_matrix.flatten(),
                output_size=received.shape[0],
            )
            order = torch.argsort(expert_of_row, stable=True)
            received = received.index_select(0, order)
        return Dispatched(
            rows=received,
            tokens_per_expert=recv_matrix.sum(0),
            state=ExchangeState(send_splits=send_splits, recv_splits=recv_splits, order=order, gathered=gathered),
        )

    def combine(
        self, expert_out: torch.Tensor, dispatched: Dispatched[ExchangeState], routing: Routing
    ) -> torch.Tensor:
        """(T, H) sum over each local token's pairs of ``weight * expert_out``; tokens with no pair get 0."""
        state = dispatched.state
        if state.order is not None:
            expert_out = expert_out.new_empty(expert_out.shape).index_copy(0, state.order, expert_out)
        returned = all_to_all(expert_out, state.send_splits, state.recv_splits, self.placement.ep_group)
        return self.local.combine(returned, state.gathered, routing)
