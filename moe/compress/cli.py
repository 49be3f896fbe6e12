"""``moe-compress``: prune or merge the experts of a ``moe-train`` checkpoint and measure what it cost.

It reads a checkpoint (never modifying it), calibrates on training batches, compresses, evaluates the
validation loss before and after exactly as ``moe-train`` does, and writes into its run directory:

- ``checkpoints/ckpt-<step>.pt`` (+ ``.sha256``): a ``moe-train`` checkpoint of the compressed model
  (model, fresh AdamW moments with the source's hyper-parameters, sampler and RNG state);
- ``config.yaml``: the compressed model's full ``moe-train`` config, resuming from that checkpoint;
- ``summary.json``: validation loss and parameter counts before and after, active parameters per
  token, the kept experts or groups per layer, and timings.

Resume or evaluate with ``moe-train --config-path <run dir> --config-name config`` (add
``trainer.max_steps=N`` to fine-tune further).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import OmegaConf

from moe.compress.calibration import calibrate
from moe.compress.merge import LINKAGES, MERGE_METHODS, merge
from moe.compress.prune import BUDGETS, PRUNE_METHODS, prune, target_count
from moe.layer import moe_layers

ACTIONS = ("prune", "merge")


@dataclass
class CompressConfig:
    """``moe-compress`` settings.

    ``source``: a checkpoint file, or a run directory (its newest ``checkpoints/ckpt-*.pt``).
    ``action``/``method``: ``prune`` with frequency|score|reconstruction|reap|random, or ``merge`` with
    msmoe|hc_smoe|average. Exactly one of ``num_experts`` (experts kept per layer) and ``fraction``.
    ``calibration_batches`` training batches of ``calibration_batch_size`` sequences (default: the
    source's data.batch_size) feed calibration; ``budget``: ``layer`` (every layer keeps the same
    count; the default, since a ``moe-train`` config holds one expert count) or ``global`` (prune:
    frequency|score|random; merge: msmoe), which succeeds only when every layer ends with the same count;
    ``memory_budget_mb`` caps the cached layer inputs and
    outputs. ``output``: where to write (default: the Hydra run directory); it must not hold checkpoints.
    """

    source: str = "???"
    action: str = "prune"
    method: str = "frequency"
    num_experts: int | None = None
    fraction: float | None = None
    budget: str = "layer"
    progressive: bool = False
    max_subsets: int = 1000
    linkage: str = "average"
    align: bool | None = None
    seed: int = 0
    calibration_batches: int = 8
    calibration_batch_size: int | None = None
    memory_budget_mb: int = 256
    device: str = "auto"
    output: str | None = None

    def __post_init__(self):
        if self.action not in ACTIONS:
            raise ValueError(f"action={self.action!r} is not valid; valid: {list(ACTIONS)}")
        methods = PRUNE_METHODS if self.action == "prune" else MERGE_METHODS
        if self.method not in methods:
            raise ValueError(f"method={self.method!r} is not valid for action={self.action!r}; valid: {list(methods)}")
        if (self.num_experts is None) == (self.fraction is None):
            raise ValueError(
                f"give exactly one of num_experts and fraction, got num_experts={self.num_experts}, "
                f"fraction={self.fraction}"
            )
        if self.num_experts is not None and self.num_experts < 1:
            raise ValueError(f"num_experts={self.num_experts} is not valid; it must be >= 1")
        if self.fraction is not None and not 0.0 < self.fraction <= 1.0:
            raise ValueError(f"fraction={self.fraction} is not valid; it must be in (0, 1]")
        if self.budget not in BUDGETS:
            raise ValueError(f"budget={self.budget!r} is not valid; valid: {list(BUDGETS)}")
        if self.linkage not in LINKAGES:
            raise ValueError(f"linkage={self.linkage!r} is not valid; valid: {list(LINKAGES)}")
        for key in ("max_subsets", "calibration_batches", "memory_budget_mb"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key}={getattr(self, key)} is not valid; it must be >= 1")
        if self.calibration_batch_size is not None and self.calibration_batch_size < 1:
            raise ValueError(f"calibration_batch_size={self.calibration_batch_size} is not valid; it must be >= 1")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device={self.device!r} is not valid; valid: ['auto', 'cpu', 'cuda']")


def _compressed_config(cfg, layers) -> dict:
    """The source's moe-train config with the new expert count (and the merged router for merges)."""
    from moe.train.config import to_dict

    counts = {layer.num_experts for _, layer in layers}
    if len(counts) != 1:
        raise ValueError(
            f"layers ended with different expert counts {sorted(counts)}; moe-train configs hold one (use budget=layer)"
        )
    config = to_dict(cfg)
    config["model"]["num_experts"] = counts.pop()
    groupings = [(layer.router, *layer.router.expert_grouping()) for _, layer in layers]
    merged = [source is not router for router, source, _ in groupings]
    if all(merged):
        sources = {to_group.numel() for _, _, to_group in groupings}
        if len(sources) != 1:
            raise ValueError(f"merged layers kept different numbers of original experts {sorted(sources)}")
        if config["router"]["name"] != "merged":
            config["router"]["kwargs"] = {**config["router"]["kwargs"], "source_router": config["router"]["name"]}
            config["router"]["name"] = "merged"
        config["router"]["kwargs"]["source_experts"] = sources.pop()
    elif any(merged):
        raise ValueError("some layers are merged and some are not; moe-train configs hold one router")
    return config


def _counts(model) -> dict:
    experts = sum(layer.experts.w_in.numel() + layer.experts.w_out.numel() for _, layer in moe_layers(model))
    return {
        "params": model.num_params(),
        "active_params_per_token": model.num_active_params(),
        "expert_params": experts,
    }


def compress_checkpoint(ccfg: CompressConfig, run_dir: str | Path) -> dict:
    """Compress ``ccfg.source`` into ``run_dir`` (see the module docstring); returns the summary."""
    from moe.data import BatchSampler
    from moe.train.checkpoint import atomic_write_bytes, checkpoint_path, save_checkpoint
    from moe.train.config import architecture, validate
    from moe.train.loading import load_run
    from moe.train.trainer import DistContext, build_model, build_optimizer, evaluate, prepare_data

    started = time.perf_counter()
    loaded = load_run(ccfg.source)
    source, state, cfg, vocab_size, model = loaded.path, loaded.state, loaded.cfg, loaded.vocab_size, loaded.model
    if state is None:
        raise ValueError(f"source={ccfg.source!r} resolves to {source}; moe-compress needs a ckpt-*.pt checkpoint")
    run_dir = Path(ccfg.output or run_dir).expanduser().resolve()
    ckpt_dir = run_dir / "checkpoints"
    if source.parent == ckpt_dir or source.parent == run_dir:
        raise ValueError(f"output {run_dir} is the source's own directory; choose another (the source stays intact)")
    if ckpt_dir.is_dir() and any(ckpt_dir.iterdir()):
        raise FileExistsError(f"{ckpt_dir} already holds files; moe-compress never overwrites a checkpoint")
    target = ccfg.num_experts if ccfg.num_experts is not None else float(ccfg.fraction)
    top_k, experts = cfg.model.top_k, cfg.model.num_experts
    valid = f"choose num_experts in [{top_k}, {experts}] (from model.top_k to the experts it has)"
    if ccfg.num_experts is not None and not top_k <= ccfg.num_experts <= experts:
        reason = f"below model.top_k={top_k}" if ccfg.num_experts < top_k else f"above the {experts} experts it has"
        raise ValueError(f"num_experts={ccfg.num_experts} is not valid for {source}: {reason}; {valid}")
    count = target_count(target, experts, "every layer")
    if count < top_k:
        raise ValueError(f"fraction={ccfg.fraction} keeps {count} experts, below model.top_k={top_k}; {valid}")
    use_cuda = ccfg.device == "cuda" or (ccfg.device == "auto" and torch.cuda.is_available())
    if ccfg.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' but no CUDA device is available; valid here: auto, cpu")
    device = torch.device("cuda" if use_cuda else "cpu")
    ctx = DistContext(rank=0, world_size=1, device=device)
    splits = prepare_data(cfg, ctx)
    model.to(device)
    timings = {"load_s": time.perf_counter() - started}

    before = {"val_loss": evaluate(model, cfg, splits.val, ctx), **_counts(model)}
    timings["eval_before_s"] = time.perf_counter() - started - sum(timings.values())

    sampler = BatchSampler(
        splits.train, ccfg.calibration_batch_size or cfg.data.batch_size, cfg.model.seq_len, seed=ccfg.seed
    )
    batches = [sampler.batch(i) for i in range(ccfg.calibration_batches)]
    calibration = calibrate(
        model, batches, forward=lambda m, batch: m(batch[0].to(device)), memory_budget=ccfg.memory_budget_mb * 2**20
    )
    timings["calibration_s"] = time.perf_counter() - started - sum(timings.values())
    if ccfg.action == "prune":
        result = prune(
            model,
            calibration,
            method=ccfg.method,
            num_experts=target,
            budget=ccfg.budget,
            progressive=ccfg.progressive,
            max_subsets=ccfg.max_subsets,
            seed=ccfg.seed,
        )
    else:
        result = merge(
            model,
            calibration,
            method=ccfg.method,
            num_experts=target,
            linkage=ccfg.linkage,
            align=ccfg.align,
            budget=ccfg.budget,
        )
    timings["compress_s"] = time.perf_counter() - started - sum(timings.values())

    new_config = _compressed_config(cfg, moe_layers(model))
    new_cfg = validate(OmegaConf.create(new_config))
    rebuilt = build_model(new_cfg, vocab_size)
    rebuilt.load_state_dict(model.state_dict())
    rebuilt.to(device)
    after = {"val_loss": evaluate(rebuilt, new_cfg, splits.val, ctx), **_counts(rebuilt)}
    timings["eval_after_s"] = time.perf_counter() - started - sum(timings.values())

    step = state["step"]
    new_path = checkpoint_path(ckpt_dir, step)
    new_config["trainer"]["resume"] = str(new_path)
    new_cfg = validate(OmegaConf.create(new_config))
    optimizer_state = {"state": {}, "param_groups": state["optimizer"]["param_groups"]}
    build_optimizer(rebuilt, new_cfg).load_state_dict(optimizer_state)
    compression = {"source": str(source), "action": ccfg.action, "method": ccfg.method, "layers": dict(result)}
    new_state = {
        "step": step,
        "tokens_seen": state["tokens_seen"],
        "model": rebuilt.state_dict(),
        "optimizer": optimizer_state,
        "sampler": state["sampler"],
        "rng": state["rng"],
        "config": new_config,
        "architecture": architecture(new_cfg, vocab_size),
        "world_size": state["world_size"],
        "compression": compression,
    }
    save_checkpoint(ckpt_dir, step, new_state, keep=1)
    yaml = "# moe-compress output: moe-train --config-path <this dir> --config-name config\n"
    yaml += OmegaConf.to_yaml({"defaults": ["train_schema", "_self_"], **new_config})
    atomic_write_bytes(run_dir / "config.yaml", yaml.encode())
    timings["total_s"] = time.perf_counter() - started
    summary = {
        **compression,
        "checkpoint": str(new_path),
        "num_experts_before": cfg.model.num_experts,
        "num_experts_after": new_cfg.model.num_experts,
        "top_k": cfg.model.top_k,
        "calibration_tokens": next(iter(calibration.layers.values())).num_tokens,
        "before": before,
        "after": after,
        "val_loss_increase": after["val_loss"] - before["val_loss"],
        "timings_s": {k: round(v, 3) for k, v in timings.items()},
        "device": str(device),
        "resume": f"moe-train --config-path {run_dir} --config-name config",
    }
    atomic_write_bytes(run_dir / "summary.json", (json.dumps(summary, indent=2) + "\n").encode())
    return summary


def _run(cfg) -> None:
    """Compress; expected failures (bad settings, unusable source, occupied output) exit with status 1 and one
    line; a refused start leaves no directory behind."""
    from hydra.core.hydra_config import HydraConfig

    from moe.train import STARTED
    from moe.train.run_dir import remove_if_empty

    output = HydraConfig.get().runtime.output_dir
    try:
        summary = _checked_compress(cfg, output)
    except BaseException:
        remove_if_empty(Path(output), STARTED)
        raise
    _print_summary(summary)


def _checked_compress(cfg, output: str) -> dict:
    from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

    from moe.train.checkpoint import CheckpointMismatchError, CorruptCheckpointError
    from moe.train.config import register_configs

    register_configs()
    try:
        ccfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(CompressConfig), cfg))
    except MissingMandatoryValue:
        raise SystemExit(
            "moe-compress: invalid config: source is required: source=<a moe-train run directory or checkpoint file>"
        ) from None
    except (ValueError, OmegaConfBaseException) as error:
        raise SystemExit(f"moe-compress: invalid config: {error}") from None
    try:
        return compress_checkpoint(ccfg, output)
    except (ValueError, FileNotFoundError, FileExistsError, CorruptCheckpointError, CheckpointMismatchError) as error:
        raise SystemExit(f"moe-compress: {error}") from None


def _print_summary(summary: dict) -> None:
    before, after = summary["before"], summary["after"]
    print(
        f"moe-compress {summary['action']}/{summary['method']}: experts {summary['num_experts_before']} -> "
        f"{summary['num_experts_after']}; val loss {before['val_loss']:.4f} -> {after['val_loss']:.4f}; "
        f"params {before['params']:,} -> {after['params']:,}; "
        f"active/token {before['active_params_per_token']:,} -> {after['active_params_per_token']:,}\n"
        f"checkpoint {summary['checkpoint']}\nresume     {summary['resume']}"
    )


def main() -> None:
    """Console entry point: compose ``configs/compress.yaml`` with command-line overrides and compress."""
    import hydra
    from hydra.core.config_store import ConfigStore

    from moe.train import CONFIG_DIR

    if not (CONFIG_DIR / "compress.yaml").is_file():
        raise SystemExit(f"moe-compress: config not found at {CONFIG_DIR / 'compress.yaml'}; install editable")
    ConfigStore.instance().store(name="compress_schema", node=CompressConfig)
    hydra.main(config_path=str(CONFIG_DIR), config_name="compress", version_base="1.3")(_run)()
