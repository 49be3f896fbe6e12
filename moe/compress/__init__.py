"""Expert compression: calibration, pruning, merging and dynamic skipping of trained MoE layers.

Example::

    from moe import compress
    calibration = compress.calibrate(model, batches)
    compress.prune(model, calibration, method="reconstruction", num_experts=6)
    # or: compress.merge(model, calibration, method="hc_smoe", num_experts=6)
"""

from moe.compress.calibration import Calibration, LayerCalibration, calibrate
from moe.compress.merge import MERGE_METHODS, hierarchical_groups, merge, msmoe_groups
from moe.compress.merged_router import MergedRouter
from moe.compress.prune import BUDGETS, PRUNE_METHODS, prune
from moe.compress.skipping import SkippingRouter, enable_skipping, skipping_betas
from moe.compress.surgery import align_to, keep_experts, merge_groups

__all__ = [
    "BUDGETS",
    "MERGE_METHODS",
    "PRUNE_METHODS",
    "Calibration",
    "LayerCalibration",
    "MergedRouter",
    "SkippingRouter",
    "align_to",
    "calibrate",
    "enable_skipping",
    "hierarchical_groups",
    "keep_experts",
    "merge",
    "merge_groups",
    "msmoe_groups",
    "prune",
    "skipping_betas",
]
