"""Typed config schemas for ``moe-train``, registered in Hydra's ConfigStore.

The YAML files under ``configs/`` only select groups and override values; every key and its type is
declared here. ``validate(cfg)`` turns a composed DictConfig into these dataclasses, which runs each
``__post_init__`` check, so an unknown key or a bad value fails before any work starts.
"""

from __future__ import annotations

import inspect
import math
import os
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from moe.model import ModelShape, model_dispatchers
from moe.train.speed import ACTIVATION_CHECKPOINTING, COMPILE_MODES
from moe.train.strategies import STRATEGIES
from moe.train.strategies.deepspeed import ZERO_STAGES
from moe.validation import ConfigValueError, check_at_least, check_choice, check_in_range, check_readable_path

DATA_SOURCES = ("stdlib", "text", "bin", "prepared")
BIN_DTYPES = ("uint16", "uint32")
DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "fp32", "bf16")
LOGGERS = ("console", "wandb")
PROGRESS = ("auto", "bar", "lines")


@dataclass
class RouterSchema:
    """Which router (``moe.routers.ROUTERS``) and its keyword arguments, checked against its signature."""

    name: str = "topk"
    kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        from moe.routers import ROUTERS, router_names

        if self.name not in ROUTERS:  # internal names (a merged checkpoint's "merged") load but are not offered
            check_choice("router.name", self.name, router_names())
        params = inspect.signature(ROUTERS[self.name].__init__).parameters
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
            return
        valid = sorted(set(params) - {"self", "hidden_size", "num_experts", "top_k"})
        for key in self.kwargs:
            if key not in valid:
                raise ValueError(f"router.kwargs.{key} is not an argument of router {self.name!r}; valid: {valid}")


@dataclass
class ExpertsSchema:
    """Expert implementation (``moe.experts.EXPERT_IMPLEMENTATIONS``); all share one weight layout.

    ``kernels`` is the former switch of the Triton path, now ``dispatch.name``: giving it fails, naming that key.
    """

    impl: str = "grouped"
    kernels: Any = None

    def __post_init__(self):
        from moe.experts import EXPERT_IMPLEMENTATIONS

        check_choice("experts.impl", self.impl, sorted(EXPERT_IMPLEMENTATIONS))
        if self.kernels is not None:
            raise ValueError(
                "experts.kernels was renamed: use dispatch.name=triton "
                "(it selects the Triton router top-k and permute/combine, not the experts)"
            )


@dataclass
class DispatchSchema:
    """How tokens reach the experts (``moe.model.model_dispatchers()``): "local" (pure torch), "triton"
    (the Triton fused router top-k and permute/combine of ``moe.kernels``; CUDA, on a CPU they fall back to
    torch) or "auto" (the default: "triton" on CUDA with triton installed, else "local";
    ``moe.train.speed.resolve_dispatch``). With ``parallel.ep_size > 1`` the expert-parallel dispatcher keeps
    it for each rank's own permute and combine.
    """

    name: str = "auto"

    def __post_init__(self):
        check_choice("dispatch.name", self.name, ["auto", *model_dispatchers()])


@dataclass
class DataSchema:
    """Token source, cache and batch shape.

    ``source``: "stdlib" (this Python's standard library, bytes), "text" (``path`` = a file or folder,
    bytes), "bin" (``path`` = pre-tokenised memmap of ``dtype``; ``val_path`` or ``val_fraction``) or
    "prepared" (``path`` = a ``moe-prepare`` folder; vocabulary and dtype come from its meta.json, and
    ``vocab_size``, if set, may only pad the vocabulary).
    ``cache_dir``: where byte caches live (None: ``$MOE_CACHE`` or ``~/.cache/moe``).
    ``batch_size`` is the micro-batch per rank; one optimizer step sees
    ``batch_size * world_size * trainer.grad_accum`` sequences.
    """

    source: str = "stdlib"
    path: str | None = None
    val_path: str | None = None
    dtype: str = "uint16"
    vocab_size: int | None = None
    val_fraction: float = 0.05
    cache_dir: str | None = None
    batch_size: int = 16
    eval_batches: int = 16

    def __post_init__(self):
        check_choice("data.source", self.source, DATA_SOURCES)
        check_choice("data.dtype", self.dtype, BIN_DTYPES)
        if self.source in ("text", "bin", "prepared") and not self.path:
            raise ValueError(f"data.path is required when data.source={self.source!r}")
        for key in ("path", "val_path"):
            if getattr(self, key) is not None:
                setattr(self, key, os.path.expanduser(getattr(self, key)))
        if self.source == "bin" and self.vocab_size is None:
            raise ValueError("data.vocab_size is required when data.source='bin'")
        if self.vocab_size is not None:
            check_at_least("data.vocab_size", self.vocab_size, 2)
        check_in_range("data.val_fraction", self.val_fraction, 1e-6, 0.5)
        check_at_least("data.batch_size", self.batch_size, 1)
        check_at_least("data.eval_batches", self.eval_batches, 1)


@dataclass
class OptimSchema:
    """AdamW with linear warm-up then cosine decay to ``min_lr_ratio * lr`` at ``decay_steps``.

    ``decay_steps`` defaults to ``trainer.max_steps``; set it to extend a run without changing its schedule.
    """

    name: str = "adamw"
    lr: float = 3e-3
    weight_decay: float = 0.1
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    warmup_steps: int = 50
    decay_steps: int | None = None
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0

    def __post_init__(self):
        check_choice("optim.name", self.name, ("adamw",))
        if not (isinstance(self.lr, (int, float)) and self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"optim.lr={self.lr!r} is not valid; it must be a finite number > 0")
        check_at_least("optim.weight_decay", self.weight_decay, 0.0)
        if len(self.betas) != 2:
            raise ValueError(f"optim.betas={self.betas!r} is not valid; it must be two numbers in [0, 1)")
        for i, beta in enumerate(self.betas):
            check_in_range(f"optim.betas[{i}]", beta, 0.0, 0.999999)
        check_at_least("optim.eps", self.eps, 0.0)
        check_at_least("optim.warmup_steps", self.warmup_steps, 0)
        if self.decay_steps is not None:
            check_at_least("optim.decay_steps", self.decay_steps, 1)
        check_in_range("optim.min_lr_ratio", self.min_lr_ratio, 0.0, 1.0)
        check_at_least("optim.grad_clip", self.grad_clip, 0.0)


@dataclass
class TrainerSchema:
    """Loop length, intervals, checkpointing, device, precision and strategy.

    ``strategy``: a name of ``moe.train.strategies.STRATEGIES``: "ddp", "fsdp" or "deepspeed" (ZeRO
    ``zero_stage`` 1 or 2; see docs/distributed.md).

    ``resume``: "auto" (newest checkpoint in the run directory, if any), "none", or a checkpoint path.
    ``eval_interval`` / ``ckpt_interval`` of 0 mean "only at the end".
    ``init_from``: start a fresh run from other weights: a Hugging Face Mixtral / Qwen2-MoE folder
    (docs/export.md), or a dense moe-train run (its directory or checkpoint), from which an MoE model is
    upcycled (``moe.upcycle.init_model_from``) with ``init_drop_fraction`` of each expert's hidden units
    re-initialised (Drop-Upcycling). Ignored when the run resumes.
    """

    max_steps: int = 600
    seed: int = 0
    log_interval: int = 25
    eval_interval: int = 200
    ckpt_interval: int = 200
    keep_checkpoints: int = 3
    resume: str = "auto"
    grad_accum: int = 1
    device: str = "auto"
    precision: str = "auto"
    strategy: str = "ddp"
    zero_stage: int = 1
    threads: int | None = None
    export_safetensors: bool = True
    init_from: str | None = None
    init_drop_fraction: float = 0.0
    compile: str = "auto"
    activation_checkpointing: str = "none"
    peak_tflops: float | None = None

    def __post_init__(self):
        check_at_least("trainer.max_steps", self.max_steps, 1)
        check_in_range("trainer.init_drop_fraction", self.init_drop_fraction, 0.0, 1.0)
        self.compile = str(self.compile).lower()  # Hydra reads trainer.compile=true as a bool
        check_choice("trainer.compile", self.compile, COMPILE_MODES)
        check_choice("trainer.activation_checkpointing", self.activation_checkpointing, ACTIVATION_CHECKPOINTING)
        if self.peak_tflops is not None:
            check_at_least("trainer.peak_tflops", self.peak_tflops, 1e-9)
        check_at_least("trainer.seed", self.seed, 0)
        check_at_least("trainer.log_interval", self.log_interval, 1)
        check_at_least("trainer.eval_interval", self.eval_interval, 0)
        check_at_least("trainer.ckpt_interval", self.ckpt_interval, 0)
        check_at_least("trainer.keep_checkpoints", self.keep_checkpoints, 1)
        check_at_least("trainer.grad_accum", self.grad_accum, 1)
        if not isinstance(self.resume, str) or not self.resume:
            raise ValueError(f"trainer.resume={self.resume!r} is not valid; valid: 'auto', 'none' or a checkpoint path")
        check_choice("trainer.device", self.device, DEVICES)
        check_choice("trainer.precision", self.precision, PRECISIONS)
        check_choice("trainer.strategy", self.strategy, STRATEGIES)
        if isinstance(self.zero_stage, bool):
            raise TypeError(f"trainer.zero_stage={self.zero_stage!r} is not valid; valid choices: {list(ZERO_STAGES)}")
        check_choice("trainer.zero_stage", self.zero_stage, ZERO_STAGES)
        if self.threads is not None:
            check_at_least("trainer.threads", self.threads, 1)
        if self.init_from is not None and (not isinstance(self.init_from, str) or not self.init_from):
            raise ValueError(f"trainer.init_from={self.init_from!r} is not valid; give a Hugging Face model folder")


@dataclass
class ParallelSchema:
    """Expert parallelism: each MoE layer's experts are split over ``ep_size`` consecutive ranks.

    The world size must be a multiple of ``ep_size`` and every layer's expert count divisible by it
    (checked at start-up, when the world size is known). See docs/distributed.md.
    """

    ep_size: int = 1

    def __post_init__(self):
        check_at_least("parallel.ep_size", self.ep_size, 1)


@dataclass
class LoggerSchema:
    """Console + metrics.jsonl always; ``name=wandb`` adds Weights & Biases (offline unless WANDB_MODE is set).

    ``progress``: "auto" (a tqdm bar on a terminal, plain lines otherwise), "bar" or "lines".
    """

    name: str = "console"
    progress: str = "auto"
    project: str = "moe"
    run_name: str | None = None

    def __post_init__(self):
        check_choice("logger.name", self.name, LOGGERS)
        check_choice("logger.progress", self.progress, PROGRESS)


@dataclass
class TrainConfig:
    """The whole ``moe-train`` config: one field per config group, and ``run``, the run directory's name
    (None: named after the command's overrides; see moe/train/run_dir.py)."""

    run: str | None = None
    model: ModelShape = field(default_factory=ModelShape)
    router: RouterSchema = field(default_factory=RouterSchema)
    experts: ExpertsSchema = field(default_factory=ExpertsSchema)
    dispatch: DispatchSchema = field(default_factory=DispatchSchema)
    data: DataSchema = field(default_factory=DataSchema)
    optim: OptimSchema = field(default_factory=OptimSchema)
    trainer: TrainerSchema = field(default_factory=TrainerSchema)
    parallel: ParallelSchema = field(default_factory=ParallelSchema)
    logger: LoggerSchema = field(default_factory=LoggerSchema)

    def __post_init__(self):
        if self.run is not None and (not self.run or "/" in self.run or self.run in (".", "..")):
            raise ValueError(f"run={self.run!r} is not valid; it names a directory: a non-empty name without '/'")
        self._check_router_values()

    def _check_router_values(self) -> None:
        """Build one router of this config (small: a hidden_size x num_experts gate) so that its own argument
        checks run now; their messages name the argument, reported as ``router.kwargs.<name>``."""
        import torch

        from moe.routers import build_router

        kwargs = {"vocab_size": self.data.vocab_size or 256, **self.router.kwargs}
        try:
            with torch.random.fork_rng(devices=[]):  # the gate's initialisation must not move the caller's RNG
                build_router(
                    self.router.name, self.model.hidden_size, self.model.num_experts, top_k=self.model.top_k, **kwargs
                )
        except (TypeError, ValueError) as error:
            text = str(error)
            named = any(text.startswith(key) for key in self.router.kwargs)
            raise ValueError(
                f"router.kwargs.{text}" if named else f"router.name={self.router.name!r}: {text}"
            ) from None


def register_configs() -> None:
    """Register the root schema as ``train_schema`` (configs/config.yaml lists it first in its defaults)."""
    ConfigStore.instance().store(name="train_schema", node=TrainConfig)


def validate(cfg: DictConfig | TrainConfig, *, check_paths: bool = True) -> TrainConfig:
    """Return ``cfg`` as a checked ``TrainConfig``; raises ValueError naming the first bad key.

    ``check_paths``: the data paths must exist and be readable (a saved config, loaded to rebuild its model,
    skips this: the run's data may have moved since).
    """
    if isinstance(cfg, TrainConfig):
        cfg = OmegaConf.structured(cfg)
    # Through plain containers: a key forced in with Hydra's "+key=value" must still meet the schema.
    plain = OmegaConf.to_container(cfg, resolve=True)
    merged = OmegaConf.merge(OmegaConf.structured(TrainConfig), plain)
    try:
        OmegaConf.to_object(merged.model)  # moe.model.ModelShape names its fields bare: report them as model.*
    except ConfigValueError as error:
        raise error.under("model") from None
    checked = OmegaConf.to_object(merged)
    if check_paths:
        for key in ("path", "val_path"):
            if getattr(checked.data, key) is not None:
                check_readable_path(f"data.{key}", getattr(checked.data, key))
    return checked


def saved_config(config: dict) -> TrainConfig:
    """The checked config of a checkpoint's saved ``config``, written by this or an earlier version: a saved
    ``experts.kernels`` (the switch that became ``dispatch.name``, from before the dispatch group existed) is
    mapped to the path that run took, false or null to ``dispatch.name='local'`` and true to ``'triton'``; only
    a user-given ``experts.kernels`` is refused."""
    config = OmegaConf.to_container(OmegaConf.create(config))
    experts = config.get("experts") or {}
    if "kernels" in experts:
        name = "triton" if experts.pop("kernels") else "local"
        config["dispatch"] = {**(config.get("dispatch") or {}), "name": name}
    return validate(OmegaConf.create(config), check_paths=False)


def to_dict(cfg: TrainConfig) -> dict:
    """Plain-container form of a config (for checkpoints, summaries and wandb)."""
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)


def saved_architecture(state: dict) -> dict:
    """A checkpoint's architecture keys, with the defaults of keys added since it was written
    (``model.rope_base`` became a trainer key later; older runs used its default)."""
    return {"model.rope_base": ModelShape.rope_base, **state["architecture"]}


def architecture(cfg: TrainConfig, vocab_size: int) -> dict:
    """The keys that decide the weights' shapes and meaning; a checkpoint must match them to load."""
    arch = {f"model.{k}": v for k, v in to_dict(cfg)["model"].items() if k != "dropout"}
    arch["router.name"] = cfg.router.name
    arch.update({f"router.kwargs.{k}": v for k, v in sorted(cfg.router.kwargs.items())})
    arch["data.vocab_size"] = vocab_size
    return arch
