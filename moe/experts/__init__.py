"""Expert implementations: stacked weights with interchangeable forward paths."""

from moe.experts.dense import DenseMLP
from moe.experts.mlp import ACTIVATIONS, ExpertMLP, GroupedExperts, LoopExperts

EXPERT_IMPLEMENTATIONS = {"grouped": GroupedExperts, "loop": LoopExperts}


def build_experts(name: str, num_experts: int, hidden_size: int, ffn_hidden_size: int, activation: str) -> ExpertMLP:
    """Build the expert implementation called ``name`` (see ``EXPERT_IMPLEMENTATIONS``)."""
    if name not in EXPERT_IMPLEMENTATIONS:
        raise ValueError(f"unknown experts implementation {name!r}; valid: {sorted(EXPERT_IMPLEMENTATIONS)}")
    return EXPERT_IMPLEMENTATIONS[name](num_experts, hidden_size, ffn_hidden_size, activation)


__all__ = [
    "ACTIVATIONS",
    "EXPERT_IMPLEMENTATIONS",
    "DenseMLP",
    "ExpertMLP",
    "GroupedExperts",
    "LoopExperts",
    "build_experts",
]
