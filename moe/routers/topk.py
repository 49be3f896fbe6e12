"""Token-choice top-k routing (Switch, GShard, Mixtral, DeepSeek-V2/V3 variants)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.distributed as dist

from moe.kernel_support import HAVE_TRITON, kernels_usable
from moe.losses import load_balancing_loss, sequence_load_balancing_loss, z_loss
from moe.routers.base import Router, all_reduce_if_distributed
from moe.routers.global_balance import BALANCE_SCOPES, GlobalBatchCounts
from moe.routers.noise import NoisyGating
from moe.routers.registry import register_router
from moe.routing import Routing, count_per_expert, group_by_expert
from moe.validation import check_nonnegative_float, check_positive_float, check_positive_int, check_top_k

SCORE_FUNCTIONS = ("softmax", "sigmoid")
DROP_POLICIES = ("probability", "position")


@register_router("topk")
class TopKRouter(Router):
    """Each token picks its ``top_k`` highest-scoring experts.

    Papers: Switch Transformer (Fedus et al. 2021), GShard (Lepikhin et al. 2020), Mixtral (Jiang et
    al. 2024), DeepSeek-V3 (2024) for sigmoid scores, group-limited routing and aux-loss-free
    balancing (Wang et al. 2024).

    Args:
        top_k: experts per token, in [1, num_experts].
        score_function: ``"softmax"`` over all experts or ``"sigmoid"`` per expert.
        normalize_weights: renormalise the chosen k weights to sum to 1. Default: True when
            top_k > 1 (GShard, Mixtral), False when top_k == 1 (Switch keeps the raw probability,
            otherwise the router gets no gradient). Mixtral's "top-k of the logits, then softmax over
            the k" is exactly softmax-then-top-k with normalisation, so there is one option, not two.
        route_scale: multiplies the final weights (DeepSeek-V3 uses 2.5 with sigmoid scores).
        jitter_eps: in training only, multiply the router input by U(1 - eps, 1 + eps) (Switch: 0.01).
        noisy_gating: in training only, select and weight with the noisy logits
            ``z + ε · softplus(x · W_noise)`` of Shazeer et al. 2017 (``moe.routers.noise.NoisyGating``,
            a learned zero-initialised ``W_noise``); ``Routing.logits`` and the aux losses see them too.
        capacity_factor: None for dropless; otherwise each expert keeps at most
            ``C = ceil(k * T / E * capacity_factor)`` pairs and the rest are dropped.
        drop_policy: with a capacity, keep each expert's highest-``"probability"`` pairs or its first
            pairs by token ``"position"``.
        num_groups, groups_kept: group-limited routing (DeepSeek-V3): experts split into
            ``num_groups`` groups scored by the sum of their top-2 scores; only the best
            ``groups_kept`` groups are eligible.
        bias_update_rate: gamma of aux-loss-free balancing (DeepSeek-V3 uses 1e-3); None disables
            it. Selection uses score + bias, weights use the unbiased score; the bias is a buffer
            updated by ``step_update`` once per optimizer step, never by the optimizer.
        load_balancing_coef, z_loss_coef, sequence_balance_coef: weights of the Switch
            load-balancing loss (1e-2), the ST-MoE z-loss (1e-3) and the DeepSeek-V3 sequence-wise
            balance loss (0; V3 uses 1e-4 together with the bias). Sigmoid scores are normalised to
            sum to 1 per token inside the balance losses. The counts are taken before capacity drops.
        balance_scope: ``"micro_batch"`` counts the Switch loss's tokens per expert in this forward;
            ``"global_batch"`` (Qiu et al. 2025) sums them over the data-parallel group and over the
            step's micro-batches so far (``moe.routers.global_balance.GlobalBatchCounts``, reset by
            ``step_update``) while the probabilities stay local.

    Attribute ``triton_topk`` (default False; ``MoELayer(dispatcher="triton")`` sets it): select with the
    fused Triton kernel ``moe.kernels.topk_route`` (scores, top-k, normalisation and counts in one pass)
    where it can run: triton installed, the input on CUDA or ``TRITON_INTERPRET=1``, dropless and without
    groups. It also takes bf16/fp16 logits on CUDA from one half-precision GEMM accumulating in float32.
    Same outputs, parameters and state dict either way; the aux losses use the same formulas.

    Cost: one (T, H) x (H, E) GEMM plus O(T * E) elementwise work and a sort of T * k pairs. No host
    sync when dropless; with a capacity factor the kept pairs are selected by a boolean mask, whose
    data-dependent size synchronises once per forward on CUDA.
    """

    def __init__(
        self,
        hidden_size: int,
        num_experts: int,
        top_k: int = 2,
        *,
        score_function: str = "softmax",
        normalize_weights: bool | None = None,
        route_scale: float = 1.0,
        jitter_eps: float = 0.0,
        noisy_gating: bool = False,
        capacity_factor: float | None = None,
        drop_policy: str = "probability",
        num_groups: int | None = None,
        groups_kept: int | None = None,
        bias_update_rate: float | None = None,
        load_balancing_coef: float = 1e-2,
        z_loss_coef: float = 1e-3,
        sequence_balance_coef: float = 0.0,
        balance_scope: str = "micro_batch",
    ):
        super().__init__(hidden_size, num_experts)
        self.top_k = check_top_k(top_k, num_experts)
        if score_function not in SCORE_FUNCTIONS:
            raise ValueError(f"score_function must be one of {SCORE_FUNCTIONS}, got {score_function!r}")
        if balance_scope not in BALANCE_SCOPES:
            raise ValueError(f"balance_scope must be one of {BALANCE_SCOPES}, got {balance_scope!r}")
        if drop_policy not in DROP_POLICIES:
            raise ValueError(f"drop_policy must be one of {DROP_POLICIES}, got {drop_policy!r}")
        if capacity_factor is not None:
            check_positive_float("capacity_factor", capacity_factor)
        if not 0.0 <= jitter_eps < 1.0:
            raise ValueError(f"jitter_eps must be in [0, 1), got {jitter_eps}")
        check_positive_float("route_scale", route_scale)
        for name, coef in [
            ("load_balancing_coef", load_balancing_coef),
            ("z_loss_coef", z_loss_coef),
            ("sequence_balance_coef", sequence_balance_coef),
        ]:
            check_nonnegative_float(name, coef)
        if (num_groups is None) != (groups_kept is None):
            raise ValueError(
                f"num_groups and groups_kept go together, got num_groups={num_groups}, groups_kept={groups_kept}"
            )
        if num_groups is not None:
            check_positive_int("num_groups", num_groups)
            if num_experts % num_groups != 0:
                raise ValueError(f"num_groups={num_groups} must divide num_experts={num_experts}")
            check_positive_int("groups_kept", groups_kept)
            if groups_kept > num_groups:
                raise ValueError(f"groups_kept must be in [1, num_groups={num_groups}], got {groups_kept}")
            if groups_kept * (num_experts // num_groups) < top_k:
                raise ValueError(
                    f"groups_kept={groups_kept} groups of {num_experts // num_groups} experts cannot hold top_k={top_k}"
                )
        self.score_function = score_function
        self.normalize_weights = top_k > 1 if normalize_weights is None else bool(normalize_weights)
        self.route_scale = float(route_scale)
        self.jitter_eps = float(jitter_eps)
        self.noise = NoisyGating(hidden_size, num_experts) if noisy_gating else None
        self.capacity_factor = capacity_factor
        self.drop_policy = drop_policy
        self.num_groups = num_groups
        self.groups_kept = groups_kept
        self.bias_update_rate = bias_update_rate
        self.load_balancing_coef = load_balancing_coef
        self.z_loss_coef = z_loss_coef
        self.sequence_balance_coef = sequence_balance_coef
        self.triton_topk = False
        self.balance_scope = balance_scope
        self.global_counts = GlobalBatchCounts(num_experts) if balance_scope == "global_batch" else None
        if bias_update_rate is not None:
            check_positive_float("bias_update_rate", bias_update_rate)
            self.register_buffer("expert_bias", torch.zeros(num_experts, dtype=torch.float32))
            # int64 so that model.to(dtype) leaves the step's counts exact (see also _apply for the bias).
            self.register_buffer("step_load", torch.zeros(num_experts, dtype=torch.int64), persistent=False)

    def capacity(self, num_tokens: int) -> int | None:
        """Per-expert capacity ``ceil(k * T / E * capacity_factor)``, or None when dropless."""
        if self.capacity_factor is None:
            return None
        return math.ceil(self.top_k * num_tokens / self.num_experts * self.capacity_factor)

    def _select(self, scores: torch.Tensor) -> torch.Tensor:
        """Indices (T, k) of the chosen experts: top-k of score (+ bias), within the kept groups."""
        selection = scores + self.expert_bias if self.bias_update_rate is not None else scores
        if self.num_groups is not None and self.groups_kept < self.num_groups:
            grouped = selection.view(-1, self.num_groups, self.num_experts // self.num_groups)
            per_group = min(2, grouped.shape[-1])
            group_scores = grouped.topk(per_group, dim=-1).values.sum(-1)
            kept = group_scores.topk(self.groups_kept, dim=-1).indices
            group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, kept, True)
            selection = grouped.masked_fill(~group_mask.unsqueeze(-1), float("-inf")).view_as(selection)
        return selection.topk(self.top_k, dim=-1).indices

    def compute_logits(self, x: torch.Tensor) -> torch.Tensor:
        """``Router.compute_logits``; with ``triton_topk`` on CUDA and x and the gate both bf16 (or fp16), one
        half-precision GEMM with float32 accumulation and output (same maths, no float32 copy of x)."""
        weight = self.gate.weight
        half = x.dtype in (torch.bfloat16, torch.float16) and weight.dtype == x.dtype
        if self.triton_topk and HAVE_TRITON and x.is_cuda and half:
            from moe.kernels import half_gate_logits

            return self.check_finite(half_gate_logits(x, weight))
        return super().compute_logits(x)

    def uses_triton_selection(self, x: torch.Tensor) -> bool:
        """True when this forward on ``x`` selects with the Triton kernel (see ``triton_topk``)."""
        return self.triton_topk and self.capacity_factor is None and self.num_groups is None and kernels_usable(x)

    def route(self, x, *, seq_len=None, token_ids=None) -> Routing:
        """Top-k pairs grouped by expert, with capacity drops and the weighted aux losses."""
        triton = self.uses_triton_selection(x)
        if self.training and self.jitter_eps > 0:
            x = x * torch.empty_like(x).uniform_(1.0 - self.jitter_eps, 1.0 + self.jitter_eps)
        logits = self.compute_logits(x)
        if self.noise is not None:
            logits = self.noise(x, logits)
        num_tokens = logits.shape[0]
        scores = logits.softmax(-1) if self.score_function == "softmax" else logits.sigmoid()

        if triton:
            weights, chosen, counts = self._triton_select(logits)
        else:
            chosen = self._select(scores.detach())
            weights = scores.gather(1, chosen)
            if self.normalize_weights:
                weights = weights / weights.sum(-1, keepdim=True)
            weights = weights * self.route_scale
            counts = count_per_expert(chosen.flatten(), self.num_experts)

        if self.training and self.bias_update_rate is not None:
            self.step_load += counts
        aux_loss = self._aux_loss(logits, scores, chosen, counts, seq_len or num_tokens)

        if triton:
            return self._group_topk_pairs(chosen, weights, counts, logits, aux_loss)
        token_index = torch.arange(num_tokens, device=x.device).repeat_interleave(self.top_k)
        expert_index, weight = chosen.flatten(), weights.flatten()
        capacity = self.capacity(num_tokens)
        if capacity is None:
            return group_by_expert(token_index, expert_index, weight, logits, aux_loss)
        priority = scores.detach().gather(1, chosen).flatten()
        return self._apply_capacity(token_index, expert_index, weight, priority, logits, aux_loss, capacity)

    def _triton_select(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(weights (T, k), experts (T, k) int64, counts (E,) int64) from ``moe.kernels.topk_route``."""
        from moe.kernels import topk_route

        bias = self.expert_bias if self.bias_update_rate is not None else None
        weights, chosen, counts = topk_route(
            logits, self.top_k, self.score_function, self.normalize_weights, self.route_scale, bias
        )
        return weights, chosen.long(), counts.long()

    def _group_topk_pairs(self, chosen, weights, counts, logits, aux_loss) -> Routing:
        """The (T, k) choices as a Routing grouped by expert; ``counts`` are already known, and an int32 sort
        key is faster on the GPU than ``group_by_expert``'s int64 one (same stable order)."""
        flat_experts = chosen.flatten()
        order = torch.argsort(flat_experts.to(torch.int32), stable=True)
        return Routing(
            token_index=order // self.top_k,
            expert_index=flat_experts.index_select(0, order),
            weight=weights.flatten().index_select(0, order),
            tokens_per_expert=counts,
            logits=logits,
            aux_loss=aux_loss,
            num_requested=order.numel(),
        )

    def decoding_refusal(self) -> str | None:
        """A reason when a capacity is set: drops depend on the other tokens routed together."""
        if self.capacity_factor is None:
            return None
        return (
            f"top-k with capacity_factor={self.capacity_factor} drops pairs beyond each expert's capacity among all "
            "the tokens routed together, so a token routed alone is never dropped"
        )

    def _apply_capacity(self, token_index, expert_index, weight, priority, logits, aux_loss, capacity) -> Routing:
        """Keep each expert's first ``capacity`` pairs by priority or position (pairs start in token order)."""
        order = torch.arange(token_index.numel(), device=token_index.device)
        if self.drop_policy == "probability":
            order = torch.argsort(priority, descending=True, stable=True)
        order = order[torch.argsort(expert_index[order], stable=True)]
        sorted_experts = expert_index[order]
        counts = count_per_expert(sorted_experts, self.num_experts)
        starts = torch.cumsum(counts, 0) - counts
        rank = torch.arange(order.numel(), device=order.device) - starts[sorted_experts]
        order = order[rank < capacity]
        kept_experts = expert_index[order]
        return Routing(
            token_index=token_index[order],
            expert_index=kept_experts,
            weight=weight[order],
            tokens_per_expert=count_per_expert(kept_experts, self.num_experts),
            logits=logits,
            aux_loss=aux_loss,
            num_requested=token_index.numel(),
        )

    def _aux_loss(self, logits, scores, chosen, counts, seq_len) -> torch.Tensor:
        total = logits.new_zeros(())
        probs = scores if self.score_function == "softmax" else scores / scores.sum(-1, keepdim=True)
        if self.load_balancing_coef > 0:
            if self.global_counts is not None:
                counts = self.global_counts(counts, logits.shape[0])
            total = total + self.load_balancing_coef * load_balancing_loss(probs, counts, self.top_k)
        if self.z_loss_coef > 0:
            total = total + self.z_loss_coef * z_loss(logits)
        if self.sequence_balance_coef > 0:
            mask = torch.zeros_like(scores).scatter_(1, chosen, 1.0)
            total = total + self.sequence_balance_coef * sequence_load_balancing_loss(scores, mask, self.top_k, seq_len)
        return total

    def _apply(self, fn, recurse=True):
        # The balancing bias stays float32 under model.to(bf16): gamma = 1e-3 steps vanish in bf16 rounding.
        # Only a dtype change is undone (from the float32 original, so no value is rounded); device moves
        # and to_empty (whose source may be a meta tensor, which cannot be copied) keep fn's result.
        bias = self._buffers.get("expert_bias")
        load = self._buffers.get("step_load")
        super()._apply(fn, recurse)
        if bias is not None:
            moved = self._buffers["expert_bias"]
            if moved.dtype != torch.float32:
                self._buffers["expert_bias"] = bias.to(device=moved.device, dtype=torch.float32)
        if load is not None and load.is_meta and not self.step_load.is_meta:
            # to_empty after meta init: nothing was counted yet, and step_load is not in the state dict.
            self.step_load.zero_()
        return self

    @torch.no_grad()
    def step_update(self, process_group: dist.ProcessGroup | None = None) -> None:
        """Aux-loss-free balancing: ``b_e += gamma * sign(mean(c) - c_e)`` over the step's loads; a new
        step for the global-batch counts."""
        if self.global_counts is not None:
            self.global_counts.reset()
        if self.bias_update_rate is None:
            return
        load = all_reduce_if_distributed(self.step_load.clone(), process_group).float()
        self.expert_bias += self.bias_update_rate * torch.sign(load.mean() - load)
        self.step_load.zero_()

    @property
    def experts_per_token(self) -> int:
        return self.top_k

    def keep_experts(self, keep: Sequence[int]) -> None:
        """Slice the gate rows and balancing bias; refused for group-limited routing (E is split in groups)."""
        if self.num_groups is not None:
            raise ValueError(
                f"layer '{self.layer_name}' uses group-limited routing (num_groups={self.num_groups}); "
                "removing experts would break its contiguous expert groups"
            )
        super().keep_experts(keep)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, top_k={self.top_k}, score_function={self.score_function}"
