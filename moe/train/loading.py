"""Rebuild a trained model from a ``moe-train`` run: its checkpoint or safetensors export, config and tokenizer.

A run directory holds ``.hydra/config.yaml``, ``checkpoints/ckpt-*.pt`` and, after a finished run,
``model.safetensors``. ``load_run`` takes the newest checkpoint (it carries its own config), else the
safetensors export with the run's ``.hydra/config.yaml``; a file path picks one of them directly.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from omegaconf import OmegaConf
from torch import nn

from moe.train.checkpoint import list_checkpoints, load_checkpoint
from moe.train.config import TrainConfig, saved_config

SAFETENSORS_NAME = "model.safetensors"
TOKENIZER_NAME = "tokenizer.json"
BYTE_SOURCES = ("stdlib", "text")


@dataclass
class LoadedRun:
    """A model rebuilt from a run: its config, vocabulary, the file read, and the checkpoint dict (None for
    safetensors)."""

    model: nn.Module
    cfg: TrainConfig
    vocab_size: int
    path: Path
    run_dir: Path
    state: dict | None


def resolve_source(source: str | Path) -> Path:
    """The file named by ``source``: itself, or for a run directory its newest ``ckpt-*.pt`` (in ``checkpoints/``
    or the directory itself), else its ``model.safetensors``."""
    path = Path(source).expanduser()
    if path.is_file():
        return path.resolve()
    if path.is_dir():
        found = list_checkpoints(path / "checkpoints") or list_checkpoints(path)
        if found:
            return found[-1].resolve()
        if (path / SAFETENSORS_NAME).is_file():
            return (path / SAFETENSORS_NAME).resolve()
        raise FileNotFoundError(
            f"source={str(source)!r}: no ckpt-*.pt in {path} or {path / 'checkpoints'}, and no {SAFETENSORS_NAME}"
        )
    raise FileNotFoundError(f"source={str(source)!r} is neither a checkpoint file nor a run directory")


def _run_dir(path: Path) -> Path:
    return path.parent.parent if path.parent.name == "checkpoints" else path.parent


def load_run(source: str | Path) -> LoadedRun:
    """Rebuild the model of ``source`` (see ``resolve_source``) on the CPU, with its trained weights."""
    from moe.train.trainer import build_model

    path = resolve_source(source)
    run_dir = _run_dir(path)
    if path.suffix == ".safetensors":
        from safetensors import safe_open
        from safetensors.torch import load_model

        config_file = run_dir / ".hydra" / "config.yaml"
        if not config_file.is_file():
            raise FileNotFoundError(f"{path} needs its run's config {config_file}, which does not exist")
        cfg = saved_config(OmegaConf.to_container(OmegaConf.load(config_file), resolve=True))
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        if "architecture" not in metadata:
            raise ValueError(f"{path} is not a moe-train export: its header has no 'architecture' metadata")
        vocab_size = json.loads(metadata["architecture"])["data.vocab_size"]
        model = build_model(cfg, vocab_size)
        load_model(model, str(path))
        return LoadedRun(model, cfg, vocab_size, path, run_dir, None)
    state = load_checkpoint(path)
    cfg = saved_config(state["config"])
    vocab_size = state["architecture"]["data.vocab_size"]
    model = build_model(cfg, vocab_size)
    model.load_state_dict(state["model"])
    return LoadedRun(model, cfg, vocab_size, path, run_dir, state)


class ByteCodec:
    """Text <-> token ids for byte-level runs: UTF-8 bytes; invalid sequences decode as U+FFFD."""

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(ids).decode("utf-8", errors="replace")


class TokenizerCodec:
    """Text <-> token ids through a ``tokenizers`` ``tokenizer.json``."""

    def __init__(self, path: Path):
        from tokenizers import Tokenizer

        self.path = Path(path)
        self.tokenizer = Tokenizer.from_file(str(path))

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text).ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)


def tokenizer_file(cfg: TrainConfig, run_dir: Path | None = None) -> Path | None:
    """The run's ``tokenizer.json``: in the run directory, else in ``data.path`` (a folder, or a file's folder)."""
    candidates = [Path(run_dir) / TOKENIZER_NAME] if run_dir is not None else []
    if cfg.data.path:
        data = Path(cfg.data.path).expanduser()
        candidates.append((data if data.is_dir() else data.parent) / TOKENIZER_NAME)
    return next((c for c in candidates if c.is_file()), None)


def run_codec(cfg: TrainConfig, run_dir: Path | None = None) -> ByteCodec | TokenizerCodec:
    """How this run's token ids map to text: bytes for ``data.source`` stdlib/text, else its ``tokenizer.json``."""
    if cfg.data.source in BYTE_SOURCES:
        return ByteCodec()
    found = tokenizer_file(cfg, run_dir)
    if found is None:
        raise FileNotFoundError(
            f"data.source={cfg.data.source!r} tokens need a {TOKENIZER_NAME}; none in the run directory {run_dir} "
            f"or next to data.path={cfg.data.path!r}"
        )
    return TokenizerCodec(found)
