"""Typed config schemas for ``moe-train``, registered in Hydra's ConfigStore.

The YAML files under ``configs/`` only select groups and override values; every key and its type is
declared here. ``validate(cfg)`` turns a composed DictConfig into these dataclasses, which runs each
``__post_init__`` check, so an unknown key or a bad value fails before any work starts.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

DATA_SOURCES = ("stdlib", "text", "bin")
BIN_DTYPES = ("uint16", "uint32")
DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "fp32", "bf16")
LOGGERS = ("console", "wandb")
PROGRESS = ("auto", "bar", "lines")
STRATEGIES = ("ddp", "fsdp", "deepspeed")
ZERO_STAGES = (1, 2)


def _choice(key: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{key}={value!r} is not valid; valid choices: {list(choices)}")


def _at_least(key: str, value, minimum) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= minimum:
        raise ValueError(f"{key}={value!r} is not valid; it must be a number >= {minimum}")


def _in_range(key: str, value, low, high) -> None:
    if not (isinstance(value, (int, float)) and low <= value <= high):
        raise ValueError(f"{key}={value!r} is not valid; it must be in [{low}, {high}]")


@dataclass
class ModelSchema:
    """The decoder's shape (``moe.model.ModelConfig`` less the router, experts and vocabulary)."""

    seq_len: int = 128
    num_layers: int = 4
    hidden_size: int = 128
    num_heads: int = 4
    ffn_hidden_size: int = 256
    num_experts: int = 4
    top_k: int = 2
    moe_every: int = 1
    shared_experts: int = 0
    activation: str = "swiglu"
    tie_embeddings: bool = True
    dropout: float = 0.0

    def __post_init__(self):
        for key in ("seq_len", "num_layers", "hidden_size", "num_heads", "ffn_hidden_size", "num_experts", "top_k"):
            _at_least(f"model.{key}", getattr(self, key), 1)
        for key in ("moe_every", "shared_experts"):
            _at_least(f"model.{key}", getattr(self, key), 0)
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"model.hidden_size={self.hidden_size} must be divisible by model.num_heads={self.num_heads}"
            )
        if (self.hidden_size // self.num_heads) % 2:
            raise ValueError(
                f"model.hidden_size / model.num_heads = {self.hidden_size // self.num_heads} "
                "must be even (rotary positions rotate pairs)"
            )
        if self.top_k > self.num_experts:
            raise ValueError(f"model.top_k={self.top_k} must be in [1, model.num_experts={self.num_experts}]")
        _choice("model.activation", self.activation, ("swiglu", "gelu", "relu"))
        _in_range("model.dropout", self.dropout, 0.0, 1.0)


@dataclass
class RouterSchema:
    """Which router (``moe.routers.ROUTERS``) and its keyword arguments, checked against its signature."""

    name: str = "topk"
    kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        from moe.routers import ROUTERS

        _choice("router.name", self.name, sorted(ROUTERS))
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

    ``kernels``: use the Triton permute/combine and fused top-k router of ``moe.kernels`` (CUDA; on a CPU
    they fall back to the torch path). Not combined with ``parallel.ep_size > 1``.
    """

    impl: str = "grouped"
    kernels: bool = False

    def __post_init__(self):
        from moe.experts import EXPERT_IMPLEMENTATIONS

        _choice("experts.impl", self.impl, sorted(EXPERT_IMPLEMENTATIONS))


@dataclass
class DataSchema:
    """Token source, cache and batch shape.

    ``source``: "stdlib" (this Python's standard library, bytes), "text" (``path`` = a file or folder,
    bytes) or "bin" (``path`` = pre-tokenised memmap of ``dtype``; ``val_path`` or ``val_fraction``).
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
        _choice("data.source", self.source, DATA_SOURCES)
        _choice("data.dtype", self.dtype, BIN_DTYPES)
        if self.source in ("text", "bin") and not self.path:
            raise ValueError(f"data.path is required when data.source={self.source!r}")
        if self.source == "bin" and self.vocab_size is None:
            raise ValueError("data.vocab_size is required when data.source='bin'")
        if self.vocab_size is not None:
            _at_least("data.vocab_size", self.vocab_size, 2)
        _in_range("data.val_fraction", self.val_fraction, 1e-6, 0.5)
        _at_least("data.batch_size", self.batch_size, 1)
        _at_least("data.eval_batches", self.eval_batches, 1)


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
        _choice("optim.name", self.name, ("adamw",))
        if not (isinstance(self.lr, (int, float)) and self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"optim.lr={self.lr!r} is not valid; it must be a finite number > 0")
        _at_least("optim.weight_decay", self.weight_decay, 0.0)
        if len(self.betas) != 2:
            raise ValueError(f"optim.betas={self.betas!r} is not valid; it must be two numbers in [0, 1)")
        for i, beta in enumerate(self.betas):
            _in_range(f"optim.betas[{i}]", beta, 0.0, 0.999999)
        _at_least("optim.eps", self.eps, 0.0)
        _at_least("optim.warmup_steps", self.warmup_steps, 0)
        if self.decay_steps is not None:
            _at_least("optim.decay_steps", self.decay_steps, 1)
        _in_range("optim.min_lr_ratio", self.min_lr_ratio, 0.0, 1.0)
        _at_least("optim.grad_clip", self.grad_clip, 0.0)


@dataclass
class TrainerSchema:
    """Loop length, intervals, checkpointing, device, precision and strategy.

    ``strategy``: "ddp", "fsdp" or "deepspeed" (ZeRO ``zero_stage`` 1 or 2; see docs/distributed.md).

    ``resume``: "auto" (newest checkpoint in the run directory, if any), "none", or a checkpoint path.
    ``eval_interval`` / ``ckpt_interval`` of 0 mean "only at the end".
    ``init_from``: start a fresh run from the weights of a dense run (its directory or checkpoint):
    an MoE model is upcycled from it (``moe.upcycle.init_model_from``), ``init_drop_fraction`` of each
    expert's hidden units re-initialised (Drop-Upcycling); ignored when the run resumes.
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

    def __post_init__(self):
        _at_least("trainer.max_steps", self.max_steps, 1)
        if not 0.0 <= self.init_drop_fraction <= 1.0:
            raise ValueError(f"trainer.init_drop_fraction={self.init_drop_fraction} is not valid; it must be in [0, 1]")
        _at_least("trainer.seed", self.seed, 0)
        _at_least("trainer.log_interval", self.log_interval, 1)
        _at_least("trainer.eval_interval", self.eval_interval, 0)
        _at_least("trainer.ckpt_interval", self.ckpt_interval, 0)
        _at_least("trainer.keep_checkpoints", self.keep_checkpoints, 1)
        _at_least("trainer.grad_accum", self.grad_accum, 1)
        if not isinstance(self.resume, str) or not self.resume:
            raise ValueError(f"trainer.resume={self.resume!r} is not valid; valid: 'auto', 'none' or a checkpoint path")
        _choice("trainer.device", self.device, DEVICES)
        _choice("trainer.precision", self.precision, PRECISIONS)
        _choice("trainer.strategy", self.strategy, STRATEGIES)
        if isinstance(self.zero_stage, bool):
            raise TypeError(f"trainer.zero_stage={self.zero_stage!r} is not valid; valid choices: {list(ZERO_STAGES)}")
        _choice("trainer.zero_stage", self.zero_stage, ZERO_STAGES)
        if self.threads is not None:
            _at_least("trainer.threads", self.threads, 1)


@dataclass
class ParallelSchema:
    """Expert parallelism: each MoE layer's experts are split over ``ep_size`` consecutive ranks.

    The world size must be a multiple of ``ep_size`` and every layer's expert count divisible by it
    (checked at start-up, when the world size is known). See docs/distributed.md.
    """

    ep_size: int = 1

    def __post_init__(self):
        _at_least("parallel.ep_size", self.ep_size, 1)


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
        _choice("logger.name", self.name, LOGGERS)
        _choice("logger.progress", self.progress, PROGRESS)


@dataclass
class TrainConfig:
    """The whole ``moe-train`` config: one field per config group."""

    model: ModelSchema = field(default_factory=ModelSchema)
    router: RouterSchema = field(default_factory=RouterSchema)
    experts: ExpertsSchema = field(default_factory=ExpertsSchema)
    data: DataSchema = field(default_factory=DataSchema)
    optim: OptimSchema = field(default_factory=OptimSchema)
    trainer: TrainerSchema = field(default_factory=TrainerSchema)
    parallel: ParallelSchema = field(default_factory=ParallelSchema)
    logger: LoggerSchema = field(default_factory=LoggerSchema)

    def __post_init__(self):
        if self.experts.kernels and self.parallel.ep_size > 1:
            raise ValueError(
                f"experts.kernels=true cannot be combined with parallel.ep_size={self.parallel.ep_size}: the "
                "expert-parallel dispatcher replaces the fused one; set experts.kernels=false or parallel.ep_size=1"
            )


def register_configs() -> None:
    """Register the root schema as ``train_schema`` (configs/config.yaml lists it first in its defaults)."""
    ConfigStore.instance().store(name="train_schema", node=TrainConfig)


def validate(cfg: DictConfig | TrainConfig) -> TrainConfig:
    """Return ``cfg`` as a checked ``TrainConfig``; raises ValueError naming the first bad key."""
    if isinstance(cfg, TrainConfig):
        cfg = OmegaConf.structured(cfg)
    # Through plain containers: a key forced in with Hydra's "+key=value" must still meet the schema.
    plain = OmegaConf.to_container(cfg, resolve=True)
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(TrainConfig), plain))


def to_dict(cfg: TrainConfig) -> dict:
    """Plain-container form of a config (for checkpoints, summaries and wandb)."""
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)


def architecture(cfg: TrainConfig, vocab_size: int) -> dict:
    """The keys that decide the weights' shapes and meaning; a checkpoint must match them to load."""
    arch = {f"model.{k}": v for k, v in to_dict(cfg)["model"].items() if k != "dropout"}
    arch["router.name"] = cfg.router.name
    arch.update({f"router.kwargs.{k}": v for k, v in sorted(cfg.router.kwargs.items())})
    arch["data.vocab_size"] = vocab_size
    return arch
