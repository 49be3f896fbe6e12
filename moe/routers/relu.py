"""ReLU routing with an adaptive load-balanced L1 regulariser (ReMoE, Wang et al., ICLR 2025)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

from moe.losses import load_balancing_loss
from moe.routers.base import Router, all_reduce_if_distributed
from moe.routers.registry import register_router
from moe.routing import Routing, count_per_expert
from moe.validation import check_positive_float, check_top_k


@register_router("relu")
class ReLURouter(Router):
    """Fully differentiable routing: weights ``R = ReLU(x W)``; a pair is active where ``R > 0``.

    Paper: "ReMoE: Fully Differentiable Mixture-of-Experts with ReLU Routing", Wang et al., ICLR 2025.

    There is no softmax, no top-k and no renormalisation: each token goes to every expert whose
    logit is positive, with weight equal to that logit. ``top_k`` only sets the target sparsity
    ``1 - top_k / E`` (the average number of active experts per token is driven towards ``top_k``).

    Regulariser (the aux loss): ``lambda * E / (k * T^2) * sum_e (sum_t R_te) * count_e``, the Switch
    load-balancing loss with R in place of probabilities, where ``count_e`` is the number of active
    tokens of expert e. ``lambda`` is the float32 buffer ``l1_lambda`` (saved in the state dict) and
    starts at ``lambda0``.

    Controller: in training, each forward adds its active-pair and total-pair counts to per-step
    accumulators (so micro-batches of one optimizer step are pooled). Once per optimizer step,
    ``moe.update_routers(model)`` calls ``update_group`` on all ReLU routers of the model, which
    computes each layer's sparsity ``1 - nnz / (T * E)`` over the step, averages it over the layers
    (each layer's counts are summed over ranks first when torch.distributed is initialised) and
    applies ONE decision to every layer, as ReMoE's code does: ``lambda <- lambda * multiplier`` if
    the layer-average sparsity is below ``1 - k / E``, else ``lambda <- lambda / multiplier``.
    Layers that routed no tokens since the last update are left out of the average; when none did,
    nothing changes. The averaged sparsity is kept in the ``last_sparsity`` buffer (NaN before the
    first update).

    Cost: one (T, H) x (H, E) GEMM, O(T * E) elementwise work and a ``nonzero`` over (E, T), which
    synchronises with the host on CUDA (the number of active pairs is data-dependent).
    """

    def __init__(
        self,
        hidden_size: int,
        num_experts: int,
        top_k: int,
        lambda0: float = 1e-8,
        multiplier: float = 1.2,
    ):
        super().__init__(hidden_size, num_experts)
        self.top_k = check_top_k(top_k, num_experts)
        lambda0 = check_positive_float("lambda0", lambda0)
        self.multiplier = check_positive_float("multiplier", multiplier)
        if self.multiplier <= 1.0:
            raise ValueError(f"multiplier must be > 1, got {multiplier}")
        self.target_sparsity = 1.0 - top_k / num_experts
        self.register_buffer("l1_lambda", torch.tensor(lambda0, dtype=torch.float32))
        # int64 so that ``model.to(dtype)`` leaves the counters exact
        self.register_buffer("step_active_pairs", torch.zeros((), dtype=torch.long), persistent=False)
        self.register_buffer("step_total_pairs", torch.zeros((), dtype=torch.long), persistent=False)
        self.register_buffer("last_sparsity", torch.tensor(float("nan"), dtype=torch.float32), persistent=False)

    def route(self, x, *, seq_len=None, token_ids=None) -> Routing:
        logits = self.compute_logits(x)
        num_tokens = logits.shape[0]
        relu = torch.relu(logits)
        pairs = relu.detach().t().nonzero()  # (N, 2) rows (expert, token), grouped by expert
        expert_index, token_index = pairs[:, 0], pairs[:, 1]
        tokens_per_expert = count_per_expert(expert_index, self.num_experts)
        weight = relu[token_index, expert_index]
        if self.training:
            self.step_active_pairs += expert_index.numel()
            self.step_total_pairs += num_tokens * self.num_experts
        aux_loss = self.l1_lambda * load_balancing_loss(relu, tokens_per_expert, self.top_k)
        return Routing(
            token_index=token_index,
            expert_index=expert_index,
            weight=weight,
            tokens_per_expert=tokens_per_expert,
            logits=logits,
            aux_loss=aux_loss,
            num_requested=token_index.numel(),
        )

    @torch.no_grad()
    def step_update(self, process_group: dist.ProcessGroup | None = None) -> None:
        """Adapt this router's lambda from its own step sparsity (``update_group`` with one layer)."""
        type(self).update_group([self], process_group)

    @classmethod
    @torch.no_grad()
    def update_group(cls, routers: list[ReLURouter], process_group: dist.ProcessGroup | None = None) -> None:
        """One controller for all ``routers``: scale every lambda by the layer-average step sparsity."""
        if not routers:
            return
        counts = torch.stack([torch.stack([r.step_active_pairs, r.step_total_pairs]) for r in routers])
        counts = all_reduce_if_distributed(counts, process_group).double()  # (L, 2): active, total pairs
        active, total = counts[:, 0], counts[:, 1]
        seen = total > 0
        per_layer = torch.where(seen, 1.0 - active / total.clamp_min(1.0), torch.zeros_like(total))
        num_seen = seen.sum()
        sparsity = per_layer.sum() / num_seen.clamp_min(1)
        for router in routers:
            target = router.target_sparsity
            factor = torch.where(sparsity < target, router.multiplier, 1.0 / router.multiplier)
            factor = torch.where(num_seen > 0, factor, torch.ones_like(factor))
            router.l1_lambda.mul_(factor.to(router.l1_lambda.dtype))
            router.last_sparsity.copy_(torch.where(num_seen > 0, sparsity, router.last_sparsity.double()))
            router.step_active_pairs.zero_()
            router.step_total_pairs.zero_()

    @property
    def min_experts(self) -> int:
        """``top_k``: the target sparsity ``1 - top_k / E`` needs at least top_k experts."""
        return self.top_k

    def keep_experts(self, keep: Sequence[int]) -> None:
        """Slice as the base router does; the target sparsity ``1 - top_k / E`` follows the new E."""
        super().keep_experts(keep)
        self.target_sparsity = 1.0 - self.top_k / self.num_experts

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, top_k={self.top_k}, multiplier={self.multiplier}"
