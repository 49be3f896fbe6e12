"""Hugging Face transformers interop: MoE blocks <-> ``moe.MoELayer``, and whole-model compression.

Supported (transformers >= 5, stacked expert tensors): ``MixtralSparseMoeBlock`` and
``Qwen2MoeSparseMoeBlock`` (with its shared expert and sigmoid shared-expert gate). The routing maths
agree exactly:

- Mixtral takes the top-k of softmax(z) over all E and renormalises the k weights; that is
  ``TopKRouter(normalize_weights=True)`` (the same as a softmax over the top-k logits).
- Qwen2-MoE does the same but renormalises only when ``norm_topk_prob`` is set (False by default);
  this maps to ``normalize_weights=norm_topk_prob``. Its shared expert output is multiplied by
  ``sigmoid(x . w_gate)``: ``MoELayer(shared_expert_gate=True)``.
- Both compute the logits in the hidden-state dtype and softmax in float32; ``moe`` computes the
  logits in float32 too, so bf16 models can differ in the last bits, float32 models do not.
- Mixtral's training-time jitter multiplies the whole block input; ``TopKRouter.jitter_eps`` jitters
  only the router's input. Eval mode (how compression runs) is identical.
- Auxiliary losses: transformers computes them over all layers from the router logits when asked;
  converted layers carry zero loss coefficients.

Weight layout: HF ``gate_up_proj`` (E, 2F, H) with the gate half first and ``down_proj`` (E, H, F) are
the transposes of ``ExpertMLP.w_in`` (E, H, 2F) and ``w_out`` (E, F, H).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from moe.compress import calibrate, merge, prune
from moe.layer import MoELayer
from moe.routers import TopKRouter

SUPPORTED_BLOCKS = ("MixtralSparseMoeBlock", "Qwen2MoeSparseMoeBlock")


def _kind(block: nn.Module) -> str:
    name = type(block).__name__
    if name not in SUPPORTED_BLOCKS:
        raise TypeError(f"unsupported block {name}; supported: {SUPPORTED_BLOCKS}")
    experts = block.experts
    if not isinstance(getattr(experts, "gate_up_proj", None), torch.Tensor):
        raise TypeError(
            f"{name} has no stacked experts.gate_up_proj: this is a transformers < 5 layout (per-expert modules); "
            "install transformers >= 5"
        )
    probe = torch.linspace(-4, 4, 33)
    if not torch.allclose(experts.act_fn(probe), F.silu(probe)):
        raise ValueError(f"{name} uses activation {experts.act_fn!r}; only SiLU-gated experts (SwiGLU) map to moe")
    return name


def is_hf_moe_block(module: nn.Module) -> bool:
    """True for the transformers MoE blocks this module converts."""
    return type(module).__name__ in SUPPORTED_BLOCKS


@torch.no_grad()
def from_hf_block(block: nn.Module) -> MoELayer:
    """An ``moe.MoELayer`` computing exactly what ``block`` (Mixtral or Qwen2-MoE sparse block) computes.

    Weights are copied (the layer owns new tensors, same dtype and device). Cost: one copy of the weights.
    """
    kind = _kind(block)
    gate = block.gate
    num_experts, hidden = gate.weight.shape
    ffn = block.experts.down_proj.shape[-1]
    if kind == "MixtralSparseMoeBlock":
        router = TopKRouter(
            hidden,
            num_experts,
            top_k=gate.top_k,
            normalize_weights=True,
            jitter_eps=float(block.jitter_noise),
            load_balancing_coef=0.0,
            z_loss_coef=0.0,
        )
        shared = {}
    else:
        router = TopKRouter(
            hidden,
            num_experts,
            top_k=gate.top_k,
            normalize_weights=bool(gate.norm_topk_prob),
            load_balancing_coef=0.0,
            z_loss_coef=0.0,
        )
        shared = {"shared_ffn_hidden_size": block.shared_expert.down_proj.in_features, "shared_expert_gate": True}
    layer = MoELayer(hidden, ffn, num_experts, router=router, activation="swiglu", **shared)
    layer.to(device=gate.weight.device, dtype=block.experts.gate_up_proj.dtype)
    layer.router.gate.weight.copy_(gate.weight)
    layer.experts.w_in.copy_(block.experts.gate_up_proj.transpose(1, 2))
    layer.experts.w_out.copy_(block.experts.down_proj.transpose(1, 2))
    if kind == "Qwen2MoeSparseMoeBlock":
        mlp = block.shared_expert
        layer.shared_experts.w_in.weight.copy_(torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]))
        layer.shared_experts.w_out.weight.copy_(mlp.down_proj.weight)
        layer.shared_expert_gate.weight.copy_(block.shared_expert_gate.weight)
    layer.train(block.training)
    return layer


def _check_exportable(router: TopKRouter, kind: str) -> None:
    problems = []
    if router.score_function != "softmax":
        problems.append(f"score_function={router.score_function!r}")
    if router.route_scale != 1.0:
        problems.append(f"route_scale={router.route_scale}")
    if router.capacity_factor is not None:
        problems.append(f"capacity_factor={router.capacity_factor}")
    if router.num_groups is not None:
        problems.append("group-limited routing")
    if router.bias_update_rate is not None:
        problems.append("an expert bias (aux-loss-free balancing)")
    if kind == "MixtralSparseMoeBlock" and not router.normalize_weights and router.top_k > 1:
        problems.append("normalize_weights=False (Mixtral always renormalises)")
    if problems:
        raise ValueError(f"{kind} cannot express this router: {', '.join(problems)}")


@torch.no_grad()
def to_hf_block(layer: MoELayer, like: nn.Module) -> nn.Module:
    """A new block of ``like``'s type (Mixtral or Qwen2-MoE) computing what ``layer`` computes.

    ``like`` supplies the type and its non-expert settings; the expert count may differ (pruned layers).
    A merged layer (``MergedRouter``) is written with its original E router rows and each original
    expert slot holding its group's merged weights: exactly the same function in a format transformers
    can run (so the file does not shrink). Raises ValueError for routing transformers cannot express.
    """
    kind = _kind(like)
    router, to_group = layer.router.expert_grouping()  # a merged layer: its original E experts
    w_in, w_out = layer.experts.w_in[to_group], layer.experts.w_out[to_group]
    if not isinstance(router, TopKRouter):
        raise TypeError(f"{kind} needs a softmax top-k router, got {type(router).__name__}")
    _check_exportable(router, kind)
    if kind == "Qwen2MoeSparseMoeBlock" and layer.shared_experts is None:
        raise ValueError("Qwen2MoeSparseMoeBlock needs a shared expert; the layer has none")
    if kind == "MixtralSparseMoeBlock" and layer.shared_experts is not None:
        raise ValueError("MixtralSparseMoeBlock has no shared expert; the layer has one")
    block = copy.deepcopy(like)
    num_experts = router.num_experts
    dtype, device = like.experts.gate_up_proj.dtype, like.experts.gate_up_proj.device
    block.gate.weight = nn.Parameter(router.gate.weight.detach().to(device=device, dtype=dtype).clone())
    block.gate.num_experts = num_experts
    block.gate.top_k = router.top_k
    block.experts.num_experts = num_experts
    block.experts.gate_up_proj = nn.Parameter(w_in.detach().transpose(1, 2).to(device=device, dtype=dtype).contiguous())
    block.experts.down_proj = nn.Parameter(w_out.detach().transpose(1, 2).to(device=device, dtype=dtype).contiguous())
    if kind == "MixtralSparseMoeBlock":
        block.top_k = router.top_k
        block.jitter_noise = router.jitter_eps
    else:
        block.gate.norm_topk_prob = router.normalize_weights
        mlp, width = block.shared_expert, layer.shared_experts.w_out.in_features
        if mlp.down_proj.in_features != width:
            raise ValueError(f"shared expert width {width} differs from like's {mlp.down_proj.in_features}")
        gate_w, up_w = layer.shared_experts.w_in.weight.detach().split(width)
        mlp.gate_proj.weight.copy_(gate_w)
        mlp.up_proj.weight.copy_(up_w)
        mlp.down_proj.weight.copy_(layer.shared_experts.w_out.weight)
        block.shared_expert_gate.weight.copy_(layer.shared_expert_gate.weight)
    block.train(layer.training)
    return block


def convert_hf_model(model: nn.Module) -> dict[str, nn.Module]:
    """Replace every supported MoE block of ``model`` in place by an ``moe.MoELayer``; return the originals.

    The returned ``{module path: original block}`` is what ``restore_hf_model`` needs.
    """
    originals = {name: module for name, module in model.named_modules() if is_hf_moe_block(module)}
    if not originals:
        raise ValueError(f"no supported MoE block ({', '.join(SUPPORTED_BLOCKS)}) in {type(model).__name__}")
    for name, block in originals.items():
        model.set_submodule(name, from_hf_block(block))
    for name, module in model.named_modules():
        if isinstance(module, MoELayer):
            module.router.layer_name = name
    return originals


def restore_hf_model(model: nn.Module, originals: dict[str, nn.Module]) -> int:
    """Put transformers blocks back in place of the converted layers and update ``model.config``'s expert count.

    Every layer must end with the same number of experts (transformers configs hold one count); merged
    layers are exported at their original router width. Returns that count.
    """
    counts = {}
    blocks = {}
    for name, like in originals.items():
        layer = model.get_submodule(name)
        if not isinstance(layer, MoELayer):
            raise TypeError(f"{name} is {type(layer).__name__}, not a converted MoELayer")
        blocks[name] = to_hf_block(layer, like)
        counts[name] = blocks[name].experts.num_experts
    if len(set(counts.values())) != 1:
        raise ValueError(f"transformers configs hold one expert count; layers have {counts}")
    for name, block in blocks.items():
        model.set_submodule(name, block)
    count = next(iter(counts.values()))
    config = getattr(model, "config", None)
    if config is not None:
        for key in ("num_local_experts", "num_experts"):
            if hasattr(config, key):
                setattr(config, key, count)
    return count


def compress_hf_model(
    model: nn.Module,
    batches: Iterable,
    action: str,
    method: str,
    num_experts,
    *,
    forward: Callable | None = None,
    memory_budget: int | None = None,
    **method_kwargs,
) -> dict:
    """Prune or merge the MoE blocks of a transformers model in place (then ``model.save_pretrained``).

    ``action`` is ``"prune"`` or ``"merge"``; ``method``, ``num_experts`` and ``method_kwargs`` go to
    ``moe.compress.prune`` / ``merge``. Calibration runs ``model`` on ``batches`` (token id tensors by
    default). Returns the kept ids or groups per block. Cost: one calibration pass plus the method's.
    """
    if action not in ("prune", "merge"):
        raise ValueError(f"action must be 'prune' or 'merge', got {action!r}")
    originals = convert_hf_model(model)
    try:
        kwargs = {} if memory_budget is None else {"memory_budget": memory_budget}
        calibration = calibrate(model, batches, forward=forward, **kwargs)
        run = prune if action == "prune" else merge
        result = run(model, calibration, method=method, num_experts=num_experts, **method_kwargs)
    except BaseException:
        for name, block in originals.items():
            model.set_submodule(name, block)
        raise
    restore_hf_model(model, originals)
    return result
