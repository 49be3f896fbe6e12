"""A trained ``moe-train`` run, reopened: its config, its model with the saved weights, its validation data,
and a way to spell its token ids."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import OmegaConf


class RunError(ValueError):
    """A run directory that cannot be inspected; the message names what is missing."""


@dataclass
class LoadedRun:
    """A run's validated config, its model (eval mode, on ``device``), where the weights came from, the
    step they are of (None if unknown), its token splits and a token-id speller."""

    run_dir: Path
    cfg: object
    model: torch.nn.Module
    weights: Path
    step: int | None
    splits: object
    spell: Callable[[int], str]


def _model_from_checkpoint(path: Path):
    from moe.train.checkpoint import load_checkpoint
    from moe.train.config import validate
    from moe.train.trainer import build_model

    state = load_checkpoint(path)
    cfg = validate(OmegaConf.create(state["config"]))
    model = build_model(cfg, state["architecture"]["data.vocab_size"])
    model.load_state_dict(state["model"])
    return cfg, model, state["step"]


def _model_from_safetensors(run_dir: Path, path: Path):
    from safetensors import safe_open
    from safetensors.torch import load_model

    from moe.train.config import validate
    from moe.train.trainer import build_model

    config_path = run_dir / ".hydra" / "config.yaml"
    if not config_path.is_file():
        raise RunError(f"run {str(run_dir)!r} has model.safetensors but no .hydra/config.yaml to rebuild it from")
    cfg = validate(OmegaConf.load(config_path))
    with safe_open(str(path), framework="pt") as f:
        architecture = json.loads(f.metadata()["architecture"])
    model = build_model(cfg, architecture["data.vocab_size"])
    load_model(model, str(path))
    summary = run_dir / "summary.json"
    step = json.loads(summary.read_text()).get("steps") if summary.is_file() else None
    return cfg, model, step


def byte_spelling(token_id: int) -> str:
    """A byte as readable text: printable ASCII itself, the rest escaped."""
    return visible(bytes([token_id]).decode("latin-1") if token_id < 0x80 else f"\\x{token_id:02x}")


def visible(text: str) -> str:
    """``text`` with whitespace and control characters made visible (space as a middle dot)."""
    out = []
    for ch in text:
        if ch == " ":
            out.append("·")
        elif ch in "\n\t\r":
            out.append({"\n": "\\n", "\t": "\\t", "\r": "\\r"}[ch])
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\x{ord(ch):02x}")
        else:
            out.append(ch)
    return "".join(out)


def token_speller(splits) -> Callable[[int], str]:
    """Spell ids as bytes (byte runs), through the run's tokenizer (prepared runs), or as ``#id``."""
    if splits.is_bytes:
        return byte_spelling
    if splits.tokenizer_path is not None:
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(str(splits.tokenizer_path))

        def spell(token_id: int) -> str:
            text = tokenizer.decode([token_id], skip_special_tokens=False)
            # A token that is part of a UTF-8 character decodes to U+FFFD; its vocabulary entry says more.
            return visible(text if "\ufffd" not in text else tokenizer.id_to_token(token_id))

        return spell
    return lambda token_id: f"#{token_id}"


def load_run(run_dir: Path, device: torch.device) -> LoadedRun:
    """Rebuild the model of ``run_dir`` from its newest checkpoint (or model.safetensors) and open its data."""
    from moe.train.checkpoint import list_checkpoints
    from moe.train.trainer import DistContext, prepare_data

    run_dir = Path(run_dir).expanduser()
    if not run_dir.is_dir():
        raise RunError(f"run={str(run_dir)!r} is not a directory (give a moe-train run directory)")
    checkpoints = list_checkpoints(run_dir / "checkpoints")
    safetensors = run_dir / "model.safetensors"
    if checkpoints:
        weights = checkpoints[-1]
        cfg, model, step = _model_from_checkpoint(weights)
    elif safetensors.is_file():
        weights = safetensors
        cfg, model, step = _model_from_safetensors(run_dir, safetensors)
    else:
        raise RunError(f"run={str(run_dir)!r} has neither checkpoints/ckpt-*.pt nor model.safetensors")
    splits = prepare_data(cfg, DistContext(rank=0, world_size=1, device=device))
    model.to(device).eval()
    return LoadedRun(run_dir, cfg, model, weights, step, splits, token_speller(splits))
