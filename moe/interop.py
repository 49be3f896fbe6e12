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
from moe.experts import DenseMLP
from moe.layer import MoELayer, moe_layers
from moe.model import ModelConfig
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
        width = block.shared_expert.down_proj.in_features  # 0: no shared expert
        shared = {"shared_ffn_hidden_size": width, "shared_expert_gate": True} if width else {}
    layer = MoELayer(hidden, ffn, num_experts, router=router, activation="swiglu", **shared)
    layer.to(device=gate.weight.device, dtype=block.experts.gate_up_proj.dtype)
    layer.router.gate.weight.copy_(gate.weight)
    layer.experts.w_in.copy_(block.experts.gate_up_proj.transpose(1, 2))
    layer.experts.w_out.copy_(block.experts.down_proj.transpose(1, 2))
    if layer.shared_experts is not None:
        dense_from_hf(block.shared_expert, layer.shared_experts)
        layer.shared_expert_gate.weight.copy_(block.shared_expert_gate.weight)
    layer.train(block.training)
    return layer


@torch.no_grad()
def dense_from_hf(mlp: nn.Module, dense: DenseMLP) -> None:
    """Copy a transformers gated MLP (``gate_proj``, ``up_proj``, ``down_proj``) into a swiglu ``DenseMLP``."""
    dense.w_in.weight.copy_(torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]))
    dense.w_out.weight.copy_(mlp.down_proj.weight)


@torch.no_grad()
def dense_to_hf(dense: DenseMLP, mlp: nn.Module, scale: float = 1.0) -> None:
    """Copy a swiglu ``DenseMLP`` into a transformers gated MLP, its down projection times ``scale``."""
    width = dense.w_out.in_features
    if mlp.down_proj.in_features != width:
        raise ValueError(f"MLP width {width} differs from the target's {mlp.down_proj.in_features}")
    gate_w, up_w = dense.w_in.weight.detach().split(width)
    mlp.gate_proj.weight.copy_(gate_w)
    mlp.up_proj.weight.copy_(up_w)
    mlp.down_proj.weight.copy_(dense.w_out.weight * scale)


def export_problems(router, kind: str) -> list[str]:
    """What of ``router`` the transformers block ``kind`` cannot express (empty when it can express it all)."""
    router = _source(router)
    if not isinstance(router, TopKRouter):
        return [f"{type(router).__name__} routing"]
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
    if kind == "MixtralSparseMoeBlock" and not router.normalize_weights:
        problems.append("normalize_weights=False (Mixtral always renormalises, even top-1 to weight 1)")
    return problems


def _check_exportable(router: TopKRouter, kind: str) -> None:
    problems = export_problems(router, kind)
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
        _write_shared_expert(layer, block)
    block.train(layer.training)
    return block


def _write_shared_expert(layer: MoELayer, block: nn.Module) -> None:
    """Qwen2-MoE's gated shared expert from the layer's: none is a zero-width one; an ungated one gets a zero
    gate (sigmoid(0) = 1/2) and a doubled down projection, which is exact (scaling by 2 rounds nothing)."""
    mlp = block.shared_expert
    if layer.shared_experts is None:
        if mlp.down_proj.in_features != 0:
            raise ValueError(f"the layer has no shared expert; like's is {mlp.down_proj.in_features} wide")
        block.shared_expert_gate.weight.zero_()
        return
    if layer.shared_expert_gate is None:
        dense_to_hf(layer.shared_experts, mlp, scale=2.0)
        block.shared_expert_gate.weight.zero_()
    else:
        dense_to_hf(layer.shared_experts, mlp)
        block.shared_expert_gate.weight.copy_(layer.shared_expert_gate.weight)


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


# Whole models: moe.model.GPT <-> transformers MixtralForCausalLM / Qwen2MoeForCausalLM.

HF_ARCHITECTURES = {"mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM"}
_BLOCK_OF = {"MixtralForCausalLM": "MixtralSparseMoeBlock", "Qwen2MoeForCausalLM": "Qwen2MoeSparseMoeBlock"}
NORM_EPS = 1e-6  # moe.model's RMSNorm epsilon
EXPORTABLE = (
    "exportable: router=topk with softmax scores, no bias_update_rate, capacity_factor or num_groups, and "
    "route_scale=1 (Mixtral also needs normalize_weights=true; Qwen2-MoE takes either), swiglu experts"
)


def _moe_routers(model) -> list:
    return [layer.router for _, layer in moe_layers(model)]


def _source(router):
    """The router whose choices a merged layer follows (the router itself otherwise)."""
    return router.expert_grouping()[0]


def hf_architecture(model, architecture: str = "auto") -> str:
    """The transformers class ``model`` (a ``GPT``) exports to: ``mixtral`` when every layer is MoE with no shared
    expert and renormalised weights, else ``qwen2_moe``; ``architecture`` forces one. Raises ValueError (one line
    naming what is exportable) for routing or layers the target cannot express."""
    if architecture != "auto" and architecture not in HF_ARCHITECTURES:
        raise ValueError(f"architecture={architecture!r} is not valid; valid: {['auto', *HF_ARCHITECTURES]}")
    cfg = model.cfg
    routers = _moe_routers(model)
    target = (
        "neither Mixtral nor Qwen2-MoE can" if architecture == "auto" else f"{HF_ARCHITECTURES[architecture]} cannot"
    )
    if architecture == "auto":
        mixtral_shaped = len(routers) == cfg.num_layers and cfg.shared_experts == 0
        normalised = all(getattr(_source(r), "normalize_weights", False) for r in routers)
        architecture = "mixtral" if mixtral_shaped and normalised else "qwen2_moe"
    name = HF_ARCHITECTURES[architecture]
    problems = []
    if cfg.activation != "swiglu":
        problems.append(f"activation={cfg.activation!r}")
    if name == "MixtralForCausalLM":
        if len(routers) != cfg.num_layers:
            problems.append(f"dense layers (moe_every={cfg.moe_every})")
        if cfg.shared_experts:
            problems.append(f"shared_experts={cfg.shared_experts}")
    for router in routers[:1]:  # every layer is built from one config
        problems += export_problems(router, _BLOCK_OF[name])
    if problems:
        found = ", ".join(problems)
        raise ValueError(f"{target} express router={cfg.router} {cfg.router_kwargs}: {found}; {EXPORTABLE}")
    return architecture


def _hf_config(model, architecture: str):
    from transformers import MixtralConfig, Qwen2MoeConfig

    cfg = model.cfg
    routers = _moe_routers(model)
    router = _source(routers[0]) if routers else None
    num_experts = router.num_experts if router is not None else cfg.num_experts
    common = {
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_heads,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.seq_len,
        "rms_norm_eps": NORM_EPS,
        "tie_word_embeddings": cfg.tie_embeddings,
        "rope_parameters": {"rope_type": "default", "rope_theta": float(cfg.rope_base)},
        "attention_dropout": 0.0,
        "num_experts_per_tok": cfg.top_k,
        "intermediate_size": cfg.ffn_hidden_size,
        "bos_token_id": None,
        "eos_token_id": None,
        "pad_token_id": None,
    }
    if architecture == "mixtral":
        return MixtralConfig(
            num_local_experts=num_experts, router_jitter_noise=router.jitter_eps, sliding_window=None, **common
        )
    return Qwen2MoeConfig(
        num_experts=num_experts,
        moe_intermediate_size=cfg.ffn_hidden_size,
        shared_expert_intermediate_size=cfg.shared_experts * cfg.ffn_hidden_size,
        norm_topk_prob=bool(router.normalize_weights) if router is not None else cfg.top_k > 1,
        decoder_sparse_step=1,
        mlp_only_layers=[i for i in range(cfg.num_layers) if not cfg.is_moe_layer(i)],
        qkv_bias=False,
        use_sliding_window=False,
        **common,
    )


@torch.no_grad()
def to_hf_model(model, architecture: str = "auto") -> nn.Module:
    """A transformers ``MixtralForCausalLM`` or ``Qwen2MoeForCausalLM`` (float32, eval) computing what ``model``
    (a ``moe.model.GPT``) computes; see ``hf_architecture`` for the choice and what is refused."""
    from transformers import AutoModelForCausalLM

    architecture = hf_architecture(model, architecture)
    hf = AutoModelForCausalLM.from_config(_hf_config(model, architecture), dtype=torch.float32).eval()
    base = hf.model
    base.embed_tokens.weight.copy_(model.embed.weight)
    base.norm.weight.copy_(model.norm.weight)
    if not model.cfg.tie_embeddings:
        hf.lm_head.weight.copy_(model.lm_head.weight)
    for block, layer in zip(model.blocks, base.layers):
        attn = layer.self_attn
        q, k, v = block.attn.qkv.weight.chunk(3)
        attn.q_proj.weight.copy_(q)
        attn.k_proj.weight.copy_(k)
        attn.v_proj.weight.copy_(v)
        attn.o_proj.weight.copy_(block.attn.proj.weight)
        layer.input_layernorm.weight.copy_(block.attn_norm.weight)
        layer.post_attention_layernorm.weight.copy_(block.ffn_norm.weight)
        if block.use_moe:
            layer.mlp = to_hf_block(block.ffn, like=layer.mlp).eval()
        else:
            dense_to_hf(block.ffn, layer.mlp)
    return hf


def _import_problems(config, kind: str) -> list[str]:
    """What of a transformers config ``moe.model.GPT`` cannot express."""
    problems = []
    heads = config.num_attention_heads
    if (config.num_key_value_heads or heads) != heads:
        problems.append(f"grouped-query attention (num_key_value_heads={config.num_key_value_heads} < {heads} heads)")
    head_dim = getattr(config, "head_dim", None)
    if head_dim is not None and head_dim * heads != config.hidden_size:
        problems.append(f"head_dim={head_dim} != hidden_size / num_attention_heads")
    if config.rms_norm_eps != NORM_EPS:
        problems.append(f"rms_norm_eps={config.rms_norm_eps} (moe.model uses {NORM_EPS})")
    rope = config.rope_parameters or {}
    if rope.get("rope_type", "default") != "default":
        problems.append(f"rope_type={rope.get('rope_type')!r} (moe.model has plain rotary positions)")
    if config.hidden_act != "silu":
        problems.append(f"hidden_act={config.hidden_act!r} (moe.model's gated experts are swiglu)")
    if kind == "MixtralForCausalLM":
        window = config.sliding_window
        if window is not None and window < config.max_position_embeddings:
            problems.append(f"sliding_window={window}")
    elif "sliding_attention" in (config.layer_types or []):
        problems.append("sliding-window attention layers")
    return problems


def _moe_every(config, kind: str) -> tuple[int, str | None]:
    """moe.model's ``moe_every`` for the MoE layers of a transformers config, and the problem when none fits."""
    layers = config.num_hidden_layers
    if kind == "MixtralForCausalLM":
        return 1, None
    sparse = [
        i
        for i in range(layers)
        if i not in config.mlp_only_layers and config.num_experts > 0 and (i + 1) % config.decoder_sparse_step == 0
    ]
    every = sparse[0] + 1 if sparse else 0
    if sparse != [i for i in range(layers) if every and (i + 1) % every == 0]:
        return every, f"MoE layers {sparse} are not every n-th layer (moe_every)"
    return every, None


@torch.no_grad()
def from_hf_model(hf_model_or_folder) -> tuple[nn.Module, ModelConfig]:
    """A ``moe.model.GPT`` (float32, eval) and its ``ModelConfig`` computing what a transformers Mixtral or Qwen2-MoE
    causal LM computes (a model, or a folder ``AutoModelForCausalLM.from_pretrained`` loads from local disk).

    Raises ValueError naming every setting ``GPT`` cannot express (grouped-query attention, another norm epsilon,
    rope scaling, sliding windows, non-zero attention biases or shared-expert gates, ...).
    """
    from moe.model import GPT

    hf = hf_model_or_folder
    if not isinstance(hf, nn.Module):
        from transformers import AutoModelForCausalLM

        hf = AutoModelForCausalLM.from_pretrained(str(hf_model_or_folder), dtype=torch.float32)
    kind = type(hf).__name__
    if kind not in _BLOCK_OF:
        raise ValueError(f"{kind} is not supported; supported: {sorted(_BLOCK_OF)}")
    config, base = hf.config, hf.model
    problems = _import_problems(config, kind)
    moe_every, layout_problem = _moe_every(config, kind)
    problems += [layout_problem] if layout_problem else []
    if kind == "MixtralForCausalLM":
        num_experts, ffn, shared, normalize = config.num_local_experts, config.intermediate_size, 0, True
        router_kwargs = {"jitter_eps": float(config.router_jitter_noise)} if config.router_jitter_noise else {}
    else:
        num_experts, normalize = config.num_experts, bool(config.norm_topk_prob)
        ffn = config.moe_intermediate_size if moe_every else config.intermediate_size  # dense only: the MLP width
        shared, rest = divmod(config.shared_expert_intermediate_size, ffn) if moe_every else (0, 0)
        router_kwargs = {}
        if rest:
            problems.append(
                f"shared_expert_intermediate_size={config.shared_expert_intermediate_size} is not a "
                f"multiple of moe_intermediate_size={ffn}"
            )
        if moe_every != 1 and config.intermediate_size != ffn:
            problems.append(
                f"dense layers of intermediate_size={config.intermediate_size} != moe_intermediate_size={ffn}"
            )
        for i, layer in enumerate(base.layers):
            for proj in ("q_proj", "k_proj", "v_proj"):
                bias = getattr(layer.self_attn, proj).bias
                if bias is not None and bool(bias.any()):
                    problems.append(f"a non-zero {proj} bias (layer {i}; moe.model's attention has none)")
            mlp = layer.mlp
            if is_hf_moe_block(mlp) and shared and bool(mlp.shared_expert_gate.weight.any()):
                problems.append(f"a learned shared_expert_gate (layer {i}; moe.model's shared experts are ungated)")
    top_k = config.num_experts_per_tok
    if normalize != (top_k > 1):  # TopKRouter's default is to renormalise exactly when top_k > 1
        router_kwargs["normalize_weights"] = normalize
    if problems:
        raise ValueError(f"moe.model.GPT cannot express this {kind}: {'; '.join(dict.fromkeys(problems))}")
    cfg = ModelConfig(
        vocab_size=config.vocab_size,
        seq_len=config.max_position_embeddings,
        num_layers=config.num_hidden_layers,
        hidden_size=config.hidden_size,
        num_heads=config.num_attention_heads,
        ffn_hidden_size=ffn,
        num_experts=max(num_experts, 1),
        top_k=top_k,
        moe_every=moe_every,
        shared_experts=shared,
        router="topk",
        router_kwargs=router_kwargs,
        activation="swiglu",
        tie_embeddings=bool(config.tie_word_embeddings),
        rope_base=float((config.rope_parameters or {}).get("rope_theta", 10000.0)),
    )
    model = GPT(cfg).eval()
    model.embed.weight.copy_(base.embed_tokens.weight)
    model.norm.weight.copy_(base.norm.weight)
    if not cfg.tie_embeddings:
        model.lm_head.weight.copy_(hf.lm_head.weight)
    for block, layer in zip(model.blocks, base.layers):
        attn = layer.self_attn
        block.attn.qkv.weight.copy_(torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]))
        block.attn.proj.weight.copy_(attn.o_proj.weight)
        block.attn_norm.weight.copy_(layer.input_layernorm.weight)
        block.ffn_norm.weight.copy_(layer.post_attention_layernorm.weight)
        if block.use_moe:
            converted = from_hf_block(layer.mlp).float()
            state = converted.state_dict()
            if "shared_expert_gate.weight" in state:  # a zero gate: sigmoid(0) = 1/2 of the ungated expert
                del state["shared_expert_gate.weight"]
                state["shared_experts.w_out.weight"] = state["shared_experts.w_out.weight"] * 0.5
            block.ffn.load_state_dict(state)
        else:
            dense_from_hf(layer.mlp, block.ffn)
    return model, cfg
