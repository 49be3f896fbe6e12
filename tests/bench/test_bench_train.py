"""moe.bench.train's bookkeeping on the CPU: the dense equivalent it times and the MoE/dense ratio."""

import torch

from moe.bench.train import add_dense_ratios, model_config
from moe.model import GPT


def test_dense_variant_matches_the_moe_active_parameters():
    moe_cfg, dense_cfg = model_config("small", 256, "kernels_compile"), model_config("small", 256, "dense")
    assert moe_cfg.dispatcher == "triton" and dense_cfg.moe_every == 0
    with torch.device("meta"):
        moe_model, dense_model = GPT(moe_cfg), GPT(dense_cfg)
    gates = moe_cfg.num_layers * moe_cfg.hidden_size * moe_cfg.num_experts
    assert dense_model.num_active_params() == moe_model.num_active_params() - gates
    medium = model_config("medium", 32768, "torch")
    assert (medium.hidden_size, medium.num_experts, medium.top_k, medium.tie_embeddings) == (2048, 32, 4, False)


def test_ratio_pairs_each_moe_variant_with_the_dense_one_of_the_same_compile_setting():
    results = [
        {"variant": v, "tokens_per_s": t}
        for v, t in [
            ("kernels", 50.0),
            ("kernels_compile", 80.0),
            ("torch_compile_blocks", 60.0),
            ("dense", 100.0),
            ("dense_compile", 160.0),
            ("dense_compile_blocks", 240.0),
        ]
    ]
    add_dense_ratios(results)
    assert [r.get("moe_over_dense") for r in results] == [0.5, 0.5, 0.25, None, None, None]
    alone = [{"variant": "torch", "tokens_per_s": 1.0}]
    add_dense_ratios(alone)
    assert alone[0]["moe_over_dense"] is None
