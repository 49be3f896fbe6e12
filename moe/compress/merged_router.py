"""A router for merged experts: the original router's E logits and selection, then an expert -> group map."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch

from moe.compress.wrapping_router import WrappingRouter, build_source
from moe.routers import Router, register_router
from moe.routing import Routing, group_by_expert
from moe.validation import check_expert_indices, check_positive_int


def group_logsumexp(logits: torch.Tensor, expert_to_group: torch.Tensor, num_groups: int) -> torch.Tensor:
    """(T, G) ``log Σ_{e in g} exp(z_e)``: the group's logit, so that softmax over groups sums member probabilities."""
    index = expert_to_group.expand_as(logits)
    peak = logits.new_full((logits.shape[0], num_groups), float("-inf")).scatter_reduce(
        1, index, logits, reduce="amax", include_self=True
    )
    mass = logits.new_zeros(logits.shape[0], num_groups).scatter_add(1, index, (logits - peak.gather(1, index)).exp())
    return peak + mass.log()


@register_router("merged", internal=True)
class MergedRouter(WrappingRouter):
    """Routes exactly like the router it wraps, then sends each pair to its expert's merged group.

    Why not merge the router rows: a group's routing mass under softmax is ``Σ_{e∈g} exp(z_e)``, which
    no single linear row reproduces, and top-k selection over E members differs from top-k over G
    groups (a token whose two choices share a group would get a second, different group). Keeping the
    E logits and mapping after selection is exactly MC-SMoE's rule: a token sent to any member reaches
    the merged expert with that member's weight, so the weights of members of one group add up.

    A token whose k choices fall in one group runs the merged expert once per choice (the outputs add
    to the merged expert times the summed weight). Keeping N = T*k pairs avoids a data-dependent row
    count, so there is no host sync. ``Routing.logits`` are the group log-sum-exps (T, G).

    Args:
        num_experts: G, the number of merged experts.
        expert_to_group: (E,) group of each original expert, every group in [0, G) used. When None,
            ``source_experts`` gives E and the map starts as ``e mod G`` until a saved map is loaded
            with the state dict (how ``moe-train`` rebuilds a merged model from its config: the name
            "merged" is registered as an internal router, buildable but not offered as a choice).
        source_router: the original router (instance with E experts) or a router name built with
            ``top_k`` (when given) and ``router_kwargs``.

    Cost: the wrapped router's, plus O(T*k) for the map and O(T*E) for the group logits.
    """

    def __init__(
        self,
        hidden_size: int,
        num_experts: int,
        expert_to_group=None,
        source_router: str | Router = "topk",
        *,
        source_experts: int | None = None,
        top_k: int | None = None,
        **router_kwargs,
    ):
        super().__init__(hidden_size, num_experts)
        if expert_to_group is None:
            if source_experts is None:
                raise ValueError("give expert_to_group or source_experts")
            check_positive_int("source_experts", source_experts, minimum=num_experts)
            expert_to_group = torch.arange(source_experts) % num_experts
        expert_to_group = torch.as_tensor(expert_to_group, dtype=torch.int64).flatten()
        if source_experts is not None and source_experts != expert_to_group.numel():
            raise ValueError(
                f"source_experts={source_experts} but expert_to_group has {expert_to_group.numel()} entries"
            )
        used = torch.unique(expert_to_group)
        if used.numel() != num_experts or used.min() != 0 or used.max() != num_experts - 1:
            raise ValueError(
                f"expert_to_group must use every group in [0, {num_experts}) and no other, got groups {used.tolist()}"
            )
        self.source = source = build_source(source_router, hidden_size, expert_to_group.numel(), top_k, router_kwargs)
        device = next(itertools.chain(source.parameters(), source.buffers())).device
        self.register_buffer("expert_to_group", expert_to_group.to(device))

    @classmethod
    def over(cls, router: Router, expert_to_group: torch.Tensor) -> MergedRouter:
        """A merged router sending ``router``'s expert e to group ``expert_to_group[e]`` (G = max + 1).

        When ``router`` is itself merged, the maps compose over its original experts (one level of
        merging, whatever the number of merges).
        """
        source, to_current = router.expert_grouping()
        composed = expert_to_group.to(to_current.device)[to_current]
        merged = cls(router.hidden_size, int(expert_to_group.max()) + 1, composed, source)
        merged.layer_name = router.layer_name
        return merged

    def expert_grouping(self) -> tuple[Router, torch.Tensor]:
        """The wrapped router (it selects among the original experts) and each original expert's group."""
        return self.source, self.expert_to_group

    @torch.no_grad()
    def keep_experts(self, keep: Sequence[int]) -> None:
        """Keep merged experts ``keep``: the wrapped router keeps the original members of those groups."""
        keep = check_expert_indices(keep, self.num_experts, f"layer '{self.layer_name}'")
        new_id = {g: i for i, g in enumerate(keep)}
        groups = self.expert_to_group.tolist()
        members = [e for e, g in enumerate(groups) if g in new_id]
        self.source.keep_experts(members)
        mapped = torch.tensor([new_id[groups[e]] for e in members], device=self.expert_to_group.device)
        self.register_buffer("expert_to_group", mapped)
        self.num_experts = len(keep)

    def route(self, x, *, seq_len=None, token_ids=None) -> Routing:
        """The wrapped router's pairs with each expert replaced by its group (weights unchanged)."""
        inner = self.route_source(x, seq_len=seq_len, token_ids=token_ids)
        group_logits = group_logsumexp(inner.logits, self.expert_to_group, self.num_experts)
        return group_by_expert(
            inner.token_index,
            self.expert_to_group[inner.expert_index],
            inner.weight,
            group_logits,
            inner.aux_loss,
            inner.num_requested,
        )
