"""``moe-eval``: the validation loss of a ``moe-train`` run or checkpoint, on its own data or another source.

    moe-eval source=<run dir or checkpoint> [data=<text|bin|stdlib> data.KEY=VALUE ...] [eval_batches=N]
             [device=auto|cpu|cuda]

It loads the checkpoint as ``moe-compress`` does (a run directory means its newest checkpoint), evaluates with
``moe-train``'s own ``evaluate`` over the fixed validation batches of the data (the run's ``data`` section,
changed by ``data=`` and ``data.*``; ``eval_batches`` default: the run's ``data.eval_batches``) and prints one
line: the loss in nats per token, and in bits per byte for byte-level data. It writes nothing into the source
run (a new data source's token cache goes to ``data.cache_dir``, as in ``moe-train``).
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from moe.validation import check_at_least, check_choice


@dataclass
class EvalConfig:
    """``moe-eval`` settings: ``source`` (required), ``eval_batches`` (None: the run's), ``device``, and
    ``data``: a data group name (``data=text``) or overrides of the run's data keys (``data.path=...``)."""

    source: str = "???"
    eval_batches: int | None = None
    device: str = "auto"
    data: Any = field(default_factory=dict)

    def __post_init__(self):
        if self.eval_batches is not None:
            check_at_least("eval_batches", self.eval_batches, 1)
        check_choice("device", self.device, ("auto", "cpu", "cuda"))


def parse_args(argv: list[str]) -> EvalConfig:
    """``key=value`` arguments as an ``EvalConfig``; ``data=NAME`` and ``data.KEY=VALUE`` go to ``data``."""
    bad = [a for a in argv if "=" not in a]
    if bad:
        raise ValueError(f"arguments must be key=value, got {bad}; keys: source, eval_batches, device, data, data.*")
    group = [a.split("=", 1)[1] for a in argv if a.startswith("data=")]
    data_keys = [a for a in argv if a.startswith("data.")]
    rest = [a for a in argv if not a.startswith("data=") and not a.startswith("data.")]
    data = {"group": group[-1] if group else None, "keys": OmegaConf.to_container(OmegaConf.from_dotlist(data_keys))}
    merged = OmegaConf.merge(OmegaConf.structured(EvalConfig), OmegaConf.from_dotlist(rest))
    config = OmegaConf.to_object(merged)
    config.data = data
    return config


def eval_data(run_data: dict, group: str | None, keys: dict) -> dict:
    """The run's data section, replaced by the group ``configs/data/<group>.yaml`` if given, then ``keys``."""
    from moe.train import CONFIG_DIR

    data = dict(run_data)
    if group is not None:
        path = CONFIG_DIR / "data" / f"{group}.yaml"
        if not path.is_file():
            choices = sorted(p.stem for p in (CONFIG_DIR / "data").glob("*.yaml"))
            raise ValueError(f"data={group!r} is not valid; valid choices: {choices}")
        data = {"cache_dir": run_data.get("cache_dir"), **OmegaConf.to_container(OmegaConf.load(path))}
    return {**data, **keys.get("data", {})}


def evaluate_source(ecfg: EvalConfig) -> dict:
    """Evaluate ``ecfg.source``; returns the figures the printed line shows."""
    import torch

    from moe.train.config import to_dict, validate
    from moe.train.loading import load_run
    from moe.train.trainer import DistContext, evaluate, prepare_data

    loaded = load_run(ecfg.source)
    path, cfg, model = loaded.path, loaded.cfg, loaded.model
    config = to_dict(cfg)
    config["data"] = eval_data(config["data"], ecfg.data["group"], ecfg.data["keys"])
    if ecfg.eval_batches is not None:
        config["data"]["eval_batches"] = ecfg.eval_batches
    cfg = validate(OmegaConf.create(config))
    if ecfg.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' but no CUDA device is available; valid here: auto, cpu")
    device = torch.device("cuda" if ecfg.device != "cpu" and torch.cuda.is_available() else "cpu")
    ctx = DistContext(rank=0, world_size=1, device=device)
    splits = prepare_data(cfg, ctx)
    model_vocab = loaded.vocab_size
    if (cfg.data.vocab_size or splits.vocab_size) > model_vocab:
        raise ValueError(
            f"the data's vocabulary ({cfg.data.vocab_size or splits.vocab_size} tokens) is larger than the model's "
            f"({model_vocab}); evaluate on data of the run's tokenisation"
        )
    loss = evaluate(model.to(device), cfg, splits.val, ctx)
    return {
        "checkpoint": str(path),
        "step": loaded.state["step"] if loaded.state is not None else None,
        "data": cfg.data.path or cfg.data.source,
        "eval_batches": cfg.data.eval_batches,
        "batch_size": cfg.data.batch_size,
        "seq_len": cfg.model.seq_len,
        "val_loss": loss,
        "val_bits_per_byte": loss / math.log(2) if splits.is_bytes else None,
    }


def format_result(result: dict) -> str:
    """The one line ``moe-eval`` prints."""
    bits = f", {result['val_bits_per_byte']:.3f} bits/byte" if result["val_bits_per_byte"] is not None else ""
    return (
        f"moe-eval {result['checkpoint']} (step {result['step']}) on {result['data']}: val loss "
        f"{result['val_loss']:.4f} nats/token{bits} ({result['eval_batches']} batches of "
        f"{result['batch_size']} x {result['seq_len']} tokens)"
    )


def main(argv: list[str] | None = None) -> None:
    """Console entry point; every expected failure exits with status 1 and one line."""
    from moe.train.checkpoint import CorruptCheckpointError

    argv = sys.argv[1:] if argv is None else argv
    try:
        ecfg = parse_args(argv)
    except MissingMandatoryValue:
        raise SystemExit(
            "moe-eval: invalid config: source is required: source=<a moe-train run directory or checkpoint file>"
        ) from None
    except (ValueError, OmegaConfBaseException) as error:
        raise SystemExit(f"moe-eval: invalid config: {str(error).splitlines()[0]}") from None
    try:
        result = evaluate_source(ecfg)
    except (ValueError, OmegaConfBaseException) as error:
        raise SystemExit(f"moe-eval: invalid config: {str(error).splitlines()[0]}") from None
    except (FileNotFoundError, CorruptCheckpointError) as error:
        raise SystemExit(f"moe-eval: {error}") from None
    print(format_result(result))
