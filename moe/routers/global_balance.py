"""Expert counts for global-batch load balancing (Qiu et al. 2025, "Demons in the Detail")."""

from __future__ import annotations

import torch
from torch import nn

from moe.routers.base import all_reduce_if_distributed

BALANCE_SCOPES = ("micro_batch", "global_batch")


class GlobalBatchCounts(nn.Module):
    """Per-step running sums of the expert counts and token counts over the data-parallel group.

    Each training micro-batch adds its counts, all-reduced over ``process_group`` (None: the whole world
    when torch.distributed is initialised), to the buffers; the balancing loss then reads the counts of
    every micro-batch of the step so far, on every rank. ``reset`` (once per optimizer step) clears
    them. This is Megatron-Core's ``global_aux_loss`` accumulation: micro-batches run one after the
    other, so micro-batch m sees the counts of micro-batches 1..m. Buffers are not saved.
    Cost: one all-reduce of E + 1 numbers per micro-batch and MoE layer.
    """

    def __init__(self, num_experts: int):
        super().__init__()
        self.process_group = None
        self.register_buffer("counts", torch.zeros(num_experts, dtype=torch.float64), persistent=False)
        self.register_buffer("tokens", torch.zeros((), dtype=torch.float64), persistent=False)

    def forward(self, counts: torch.Tensor, num_tokens: int) -> torch.Tensor:
        """Counts (E,) scaled to this micro-batch's ``num_tokens``: ``T · C_e / N`` over the step so far.

        With them the local Switch loss is ``E/k · Σ_e (C_e / N) · P_e`` with P local; in eval the
        micro-batch's own counts are returned (no collective, nothing accumulated).
        """
        if not self.training:
            return counts
        local = torch.cat([counts.to(torch.float64), counts.new_full((1,), num_tokens, dtype=torch.float64)])
        reduced = all_reduce_if_distributed(local, self.process_group)
        self.counts += reduced[:-1]
        self.tokens += reduced[-1]
        return (self.counts * num_tokens / self.tokens.clamp_min(1)).to(torch.float32)

    def reset(self) -> None:
        """Start a new optimizer step."""
        self.counts.zero_()
        self.tokens.zero_()

    def _apply(self, fn, recurse=True):
        # The counts stay float64 under model.to(bf16): token counts must stay exact.
        kept = {name: self._buffers[name] for name in ("counts", "tokens")}
        super()._apply(fn, recurse)
        for name, value in kept.items():
            self._buffers[name] = value.to(device=self._buffers[name].device, dtype=torch.float64)
        return self
