"""``trainer.init_from``: start training from other weights: a Hugging Face Mixtral / Qwen2-MoE folder, or a
dense moe-train run to upcycle (``moe.upcycle.init_model_from``)."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from moe.layer import moe_layers
from moe.train.checkpoint import CheckpointMismatchError
from moe.train.config import TrainConfig

# ModelConfig fields that decide the weights' shapes and meaning, and the moe-train key that sets each.
SHAPE_KEYS = {
    "vocab_size": "data.vocab_size",
    "num_layers": "model.num_layers",
    "hidden_size": "model.hidden_size",
    "num_heads": "model.num_heads",
    "ffn_hidden_size": "model.ffn_hidden_size",
    "num_experts": "model.num_experts",
    "top_k": "model.top_k",
    "moe_every": "model.moe_every",
    "shared_experts": "model.shared_experts",
    "activation": "model.activation",
    "tie_embeddings": "model.tie_embeddings",
}
ROUTING_KEYS = ("num_experts", "top_k")


def _router_mismatches(model: nn.Module, source: nn.Module) -> list[str]:
    """The router settings that change what the pretrained gate weights mean."""
    layers, source_layers = moe_layers(model), moe_layers(source)
    if not layers or not source_layers:
        return []
    router, wanted = layers[0][1].router, source_layers[0][1].router
    if not isinstance(router, type(wanted)):  # a TopKRouter; the fused kernel router is one too
        return [f"router.name=topk (config: {model.cfg.router})"]
    found = []
    if router.score_function != wanted.score_function:
        found.append(f"router.kwargs.score_function={wanted.score_function} (config: {router.score_function})")
    if router.normalize_weights != wanted.normalize_weights:
        found.append(f"router.kwargs.normalize_weights={wanted.normalize_weights} (config: {router.normalize_weights})")
    return found


def init_from_pretrained(model: nn.Module, cfg: TrainConfig) -> None:
    """Copy the weights of the folder ``cfg.trainer.init_from`` into ``model`` (a ``GPT`` built from ``cfg``).

    The folder's config must describe the same shape: every mismatched key is named in one
    ``CheckpointMismatchError`` (a ValueError, which moe-train prints as one line) with the
    value the folder needs. ``model.seq_len`` may differ (rotary positions have no weights); router settings that
    do not change what the gate weights mean (capacity, balancing biases, jitter, loss coefficients) are free.
    Buffers the folder lacks (a balancing bias) keep their initial values. Nothing happens without init_from.
    """
    folder = cfg.trainer.init_from
    if folder is None:
        return
    from moe.interop import from_hf_model

    path = Path(folder).expanduser()
    if not (path / "config.json").is_file():
        if not path.exists():
            raise CheckpointMismatchError(
                f"trainer.init_from={folder!r} does not exist; give a Hugging Face model folder or a dense run"
            )
        from moe.upcycle import init_model_from

        try:
            init_model_from(model, path, drop_fraction=cfg.trainer.init_drop_fraction, seed=cfg.trainer.seed)
        except FileNotFoundError as error:
            raise CheckpointMismatchError(
                f"trainer.init_from={folder!r} is not a Hugging Face model folder (no config.json) nor a moe-train "
                f"run ({error})"
            ) from None
        except ValueError as error:
            raise CheckpointMismatchError(str(error)) from None
        return
    try:
        source, source_cfg = from_hf_model(path)
    except ValueError as error:
        raise CheckpointMismatchError(f"trainer.init_from={folder!r}: {error}") from None
    mine = model.cfg
    keys = [k for k in SHAPE_KEYS if source_cfg.moe_every or k not in ROUTING_KEYS]
    found = [
        f"{SHAPE_KEYS[k]}={getattr(source_cfg, k)} (config: {getattr(mine, k)})"
        for k in keys
        if getattr(source_cfg, k) != getattr(mine, k)
    ]
    if source_cfg.rope_base != mine.rope_base:
        found.append(f"rope_theta={source_cfg.rope_base} (moe-train builds rope base {mine.rope_base})")
    found += _router_mismatches(model, source)
    if found:
        needs = ", ".join(found)
        raise CheckpointMismatchError(f"trainer.init_from={folder!r} holds a model of another shape; it needs: {needs}")
    missing, unexpected = model.load_state_dict(source.state_dict(), strict=False)
    parameters = dict(model.named_parameters())
    missing = [k for k in missing if k in parameters]
    if missing or unexpected:
        raise CheckpointMismatchError(
            f"trainer.init_from={folder!r}: weights missing {missing}, unexpected {unexpected}"
        )
