"""The ``moe-train`` loop: one process (CPU or GPU) or several under torchrun, with exact resume.

``train(cfg, run_dir)`` is the whole job: prepare data, build the model and apply the strategy
(``moe.train.strategies``), run the optimizer steps with gradient accumulation, evaluate, checkpoint, and
finish with ``summary.json``, a safetensors export, the expert-load heat-map and a printed summary. Each
of those is one function below over a ``Run`` (the state a job carries between steps).
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

import moe
from moe.hardware import bf16_peak_tflops, mfu
from moe.train.checkpoint import (
    CheckpointMismatchError,
    atomic_write_bytes,
    check_architecture,
    check_no_later_checkpoints,
    check_same_optimizer,
    checkpoint_path,
    export_safetensors,
    load_checkpoint,
    resolve_resume,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from moe.train.config import OptimSchema, TrainConfig, architecture, saved_architecture, to_dict
from moe.train.distributed import DistContext, setup_distributed
from moe.train.init_from import init_from_pretrained
from moe.train.logging import RunLogger, plot_expert_load, read_metrics
from moe.train.sample import log_sample
from moe.train.speed import apply_activation_checkpointing, compile_blocks, resolve_dispatch, use_compile
from moe.train.strategies import NonFiniteGradientError, Strategy, make_strategy


class NonFiniteLossError(FloatingPointError):
    """Training produced a non-finite loss or gradient; the run stopped before applying it."""


class InvalidDataError(ValueError):
    """The data cannot feed this config (a split shorter than one sequence)."""


def build_model(cfg: TrainConfig, vocab_size: int, device: torch.device | str = "cpu") -> nn.Module:
    """The GPT decoder of ``moe.model`` for this config and vocabulary, with the dispatcher ``dispatch.name``
    picks for ``device`` (``resolve_dispatch``); built on the CPU."""
    from moe.model import GPT, ModelConfig

    return GPT(
        ModelConfig.from_shape(
            cfg.model,
            vocab_size=vocab_size,
            router=cfg.router.name,
            router_kwargs=dict(cfg.router.kwargs),
            experts=cfg.experts.impl,
            dispatcher=resolve_dispatch(cfg.dispatch.name, torch.device(device)),
        )
    )


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices (embeddings and stacked expert weights included), none on vectors.
    Fused (one kernel for all parameters) when every parameter is on CUDA."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.dim() >= 2 else no_decay).append(param)
    o = cfg.optim
    groups = [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = bool(decay or no_decay) and all(p.is_cuda for p in decay + no_decay)
    return torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps, fused=fused or None)


class WarmupCosine:
    """LR multiplier: linear warm-up over ``warmup`` steps, then cosine from 1 to ``floor`` at ``decay_steps``."""

    def __init__(self, warmup: int, decay_steps: int, floor: float):
        self.warmup, self.decay_steps, self.floor = warmup, decay_steps, floor

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        span = max(1, self.decay_steps - self.warmup)
        progress = min(1.0, (step - self.warmup) / span)
        return self.floor + (1.0 - self.floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def lr_at(step: int, optim: OptimSchema, max_steps: int) -> float:
    """The learning rate of optimizer step ``step`` (0-based): ``optim.lr`` times ``WarmupCosine`` over
    ``optim.decay_steps`` (default ``max_steps``), so a resumed run with a longer ``max_steps`` follows the
    longer schedule from where it stands."""
    schedule = WarmupCosine(optim.warmup_steps, optim.decay_steps or max_steps, optim.min_lr_ratio)
    return optim.lr * schedule(step)


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class _StopSignal:
    """Remembers a SIGTERM or SIGINT (Ctrl-C) so the loop can checkpoint and exit between optimizer steps.

    Further signals while the loop stops (the checkpoint save included) are only remembered, so a second
    Ctrl-C cannot cut a save short.
    """

    def __init__(self):
        self.name: str | None = None
        self.previous = {}

    @property
    def received(self) -> bool:
        return self.name is not None

    def __enter__(self):
        self.previous = {signum: signal.signal(signum, self._handle) for signum in STOP_SIGNALS}
        return self

    def _handle(self, signum, frame):
        self.name = self.name or signal.Signals(signum).name

    def __exit__(self, *exc):
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)


def prepare_data(cfg: TrainConfig, ctx: DistContext):
    """Build (rank 0 first, the others then read the cache) and return ``moe.data.TokenSplits``."""
    from moe.data import prepare_tokens

    d = cfg.data
    source = d.source if d.source == "stdlib" else d.path
    kwargs = {"val_fraction": d.val_fraction}
    if d.source == "bin":
        kwargs.update(dtype=d.dtype, val_source=d.val_path, vocab_size=d.vocab_size)
    if d.source == "prepared":
        kwargs.update(kind="prepared", vocab_size=d.vocab_size)
    cache_dir = Path(d.cache_dir).expanduser() if d.cache_dir else None
    if ctx.distributed and not ctx.is_main:
        dist.barrier()
    splits = prepare_tokens(source, cache_dir, **kwargs)
    if ctx.distributed and ctx.is_main:
        dist.barrier()
    return splits


def _autocast(cfg: TrainConfig, device: torch.device):
    use_bf16 = cfg.trainer.precision == "bf16" or (cfg.trainer.precision == "auto" and device.type == "cuda")
    if use_bf16:
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def evaluate(model: nn.Module, cfg: TrainConfig, val_tokens, ctx: DistContext) -> float:
    """Mean validation loss over ``data.eval_batches`` fixed batches, averaged over ranks."""
    from moe.data import eval_batches

    was_training = model.training
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=ctx.device)
    with torch.random.fork_rng(devices=[ctx.device] if ctx.device.type == "cuda" else []):
        for x, y in eval_batches(
            val_tokens,
            cfg.data.batch_size,
            cfg.model.seq_len,
            cfg.data.eval_batches,
            rank=ctx.rank,
            world_size=ctx.world_size,
        ):
            with _autocast(cfg, ctx.device):
                _, loss = model(x.to(ctx.device), y.to(ctx.device))
            total += torch.stack([loss.double(), torch.ones((), dtype=torch.float64, device=ctx.device)])
    if ctx.distributed:
        dist.all_reduce(total, group=ctx.process_group)
    model.train(was_training)
    return float(total[0] / total[1])


def _expert_load(layers) -> torch.Tensor | None:
    """(L, E) routed-token counts of every MoE layer's last forward, on device (no sync)."""
    if not layers:
        return None
    return torch.stack([layer.last_stats.tokens_per_expert.float() for _, layer in layers])


def _load_fields(names: list[str], load: torch.Tensor | None, tokens: int) -> dict:
    """Per-layer load shares, the worst max/mean load and the routed experts per token (mean over layers)."""
    if load is None:
        return {"expert_load": {}, "load_imbalance": None, "experts_per_token": None}
    shares = load / load.sum(dim=1, keepdim=True).clamp_min(1)
    imbalance = (load.max(dim=1).values / load.mean(dim=1).clamp_min(1e-9)).max()
    return {
        "expert_load": {name: [round(v, 5) for v in row] for name, row in zip(names, shares.tolist())},
        "load_imbalance": round(float(imbalance), 4),
        "experts_per_token": round(float(load.sum()) / (load.shape[0] * max(tokens, 1)), 4),
    }


def train(cfg: TrainConfig, run_dir: str | Path, on_accepted: Callable[[Path], None] | None = None) -> dict:
    """Run the job described by ``cfg`` in ``run_dir``; returns the summary (also written to summary.json).

    Raises ``NonFiniteLossError`` (naming the step) on a non-finite loss or gradient, keeping the last
    good checkpoint; on SIGTERM or SIGINT (Ctrl-C) saves a checkpoint and returns with
    ``summary["stopped_by"]`` = the signal's name. ``on_accepted(run_dir)`` is called on rank 0 once the
    start passed its checks (the checkpoint to resume loaded and matched), before anything is written.
    torch's CPU thread count (``trainer.threads``) is restored on return.
    """
    ctx = setup_distributed(cfg.trainer.device)
    threads = torch.get_num_threads()
    try:
        summary = _train(cfg, Path(run_dir), ctx, on_accepted)
        if ctx.distributed and dist.is_initialized():
            # Tear the groups down together: a gloo rank whose peers already left can abort at exit.
            dist.barrier()
        return summary
    finally:
        torch.set_num_threads(threads)
        if ctx.distributed and dist.is_initialized():
            dist.destroy_process_group()


@dataclass
class Run:
    """What a training job holds between optimizer steps.

    ``model`` is the module the loop calls (wrapped by the strategy), ``raw_model`` the single-process
    ``GPT`` it wraps. ``train_time`` is the optimizer steps' time over every invocation of the run and
    ``timed_tokens`` the tokens it covers (a checkpoint of an older version did not record its time).
    ``notes`` are messages of the start, printed once the logger is open. The ``interval_*`` fields
    accumulate between two train records.
    """

    cfg: TrainConfig
    ctx: DistContext
    run_dir: Path
    splits: object
    vocab_size: int
    strategy: Strategy
    model: nn.Module
    raw_model: nn.Module
    optimizer: torch.optim.Optimizer
    sampler: object
    arch: dict
    logger: RunLogger | None = None
    step: int = 0
    tokens_seen: int = 0
    last_ckpt: Path | None = None
    resumed_from: Path | None = None
    train_time: float = 0.0
    timed_tokens: int = 0
    notes: list[str] = field(default_factory=list)
    val_loss: float | None = None
    stopped_by: str | None = None
    interval_load: torch.Tensor | None = None
    interval_time: float = 0.0
    interval_tokens: int = 0
    layer_names: list[str] = field(default_factory=list)

    @property
    def ckpt_dir(self) -> Path:
        return self.run_dir / "checkpoints"

    @property
    def tokens_per_step(self) -> int:
        cfg = self.cfg
        return cfg.data.batch_size * cfg.model.seq_len * self.ctx.world_size * cfg.trainer.grad_accum


@dataclass
class StepResult:
    """One optimizer step's figures, averaged over ranks (loss and aux loss over the micro-batches too)."""

    loss: float
    aux_loss: float
    lr: float
    grad_norm: float
    stop_requested: bool


def _train(cfg: TrainConfig, run_dir: Path, ctx: DistContext, on_accepted: Callable[[Path], None] | None) -> dict:
    """Start or resume, then optimizer steps with their records, evaluations and checkpoints, then finish."""
    run = _start(cfg, run_dir, ctx)
    _resume(run)
    if on_accepted is not None and ctx.is_main:
        on_accepted(run.run_dir)
    _open_logger(run)
    t_cfg = cfg.trainer
    batches = iter(run.sampler)
    layers = moe.moe_layers(run.raw_model)
    run.model.train()
    with _StopSignal() as stop:
        while run.step < t_cfg.max_steps:
            result = _train_step(run, batches, layers, stop)
            if run.step % t_cfg.log_interval == 0 or run.step == t_cfg.max_steps:
                _log_train(run, result)
            if t_cfg.eval_interval and run.step % t_cfg.eval_interval == 0 and run.step < t_cfg.max_steps:
                _evaluate(run)
            if result.stop_requested:
                _save(run)
                run.stopped_by = _agreed_signal(run, stop)
                run.logger.message(f"{run.stopped_by}: saved {run.last_ckpt} at step {run.step}; exiting")
                break
            if (t_cfg.ckpt_interval and run.step % t_cfg.ckpt_interval == 0) or run.step == t_cfg.max_steps:
                _save(run)
    if run.stopped_by is None:
        _evaluate(run)
    return _finish(run)


def _agreed_signal(run: Run, stop: _StopSignal) -> str:
    """The stop signal's name as rank 0 received it (under torchrun a Ctrl-C reaches every rank, a SIGTERM
    perhaps only some)."""
    name = [stop.name or "SIGTERM"]
    if run.ctx.distributed:
        dist.broadcast_object_list(name, src=0)
    return name[0]


def _start(cfg: TrainConfig, run_dir: Path, ctx: DistContext) -> Run:
    """Seed, prepare the data, build the model, the strategy, the optimizer and the sampler (in that order:
    the initialisation draws from the seeded RNG)."""
    from moe.data import BatchSampler

    if cfg.trainer.threads is not None:
        torch.set_num_threads(cfg.trainer.threads)
    if ctx.distributed:
        shared = [str(run_dir)]
        dist.broadcast_object_list(shared, src=0)
        run_dir = Path(shared[0])
    torch.manual_seed(cfg.trainer.seed)
    splits = prepare_data(cfg, ctx)
    _check_split_sizes(cfg, splits)
    vocab_size = cfg.data.vocab_size or splits.vocab_size
    model = build_model(cfg, vocab_size, ctx.device)
    if resolve_resume(cfg.trainer.resume, run_dir / "checkpoints") is None:  # a resumed run has its own weights
        init_from_pretrained(model, cfg)  # trainer.init_from: a Hugging Face folder, or a dense run to upcycle
    model = model.to(ctx.device)
    strategy = make_strategy(cfg, ctx.world_size, ctx.device)
    raw_model = strategy.prepare(model)
    apply_activation_checkpointing(raw_model, cfg.trainer.activation_checkpointing)  # before compile and wrap
    if use_compile(cfg.trainer.compile, ctx.device):
        compile_blocks(raw_model)
    model = strategy.wrap(raw_model)
    optimizer = build_optimizer(raw_model, cfg)
    model = strategy.attach_optimizer(model, optimizer)
    sampler = BatchSampler(
        splits.train,
        cfg.data.batch_size,
        cfg.model.seq_len,
        rank=ctx.rank,
        world_size=ctx.world_size,
        seed=cfg.trainer.seed,
    )
    return Run(
        cfg=cfg,
        ctx=ctx,
        run_dir=run_dir,
        splits=splits,
        vocab_size=vocab_size,
        strategy=strategy,
        model=model,
        raw_model=raw_model,
        optimizer=optimizer,
        sampler=sampler,
        arch=architecture(cfg, vocab_size),
    )


def _check_split_sizes(cfg: TrainConfig, splits) -> None:
    """Refuse a split too short for one sequence of ``model.seq_len`` (+ 1 target), naming the data."""
    need = cfg.model.seq_len + 1
    if min(len(splits.train), len(splits.val)) < need:
        source = f"data.path={cfg.data.path!r}" if cfg.data.path else f"data.source={cfg.data.source!r}"
        raise InvalidDataError(
            f"{source} gives {len(splits.train)} training tokens and {len(splits.val)} validation tokens; "
            f"model.seq_len={cfg.model.seq_len} needs at least {need} tokens in each split (use more data, a larger "
            "data.val_fraction or a smaller model.seq_len)"
        )


def _resume(run: Run) -> None:
    """Restore model, optimizer, sampler, RNG and counters from ``trainer.resume`` (if it names a checkpoint).

    Checkpoints of earlier versions also hold a "scheduler" entry; it is not read: the learning rate is
    ``lr_at(step, ...)``, so the step alone restores it.
    """
    path = resolve_resume(run.cfg.trainer.resume, run.ckpt_dir)
    if path is not None:
        state = load_checkpoint(path)
        check_architecture(saved_architecture(state), run.arch, path)
        run.strategy.load_model_state(run.raw_model, state["model"])
        run.strategy.load_optimizer_state(run.raw_model, run.optimizer, state["optimizer"])
        check_same_optimizer(state["config"]["optim"], to_dict(run.cfg)["optim"], path)
        run.sampler.load_state_dict(state["sampler"])
        set_rng_state(state["rng"])
        run.step, run.tokens_seen, run.last_ckpt, run.resumed_from = state["step"], state["tokens_seen"], path, path
        run.train_time, run.timed_tokens = state.get("train_time_s", 0.0), state.get("timed_tokens", 0)
        if run.step > run.cfg.trainer.max_steps:
            raise CheckpointMismatchError(
                f"trainer.max_steps={run.cfg.trainer.max_steps} is below step {run.step} of the checkpoint {path}: "
                f"nothing to train; give trainer.max_steps > {run.step} to continue this run"
            )
    run.notes += check_no_later_checkpoints(run.ckpt_dir, run.step, set_aside_corrupt=run.ctx.is_main)


def _open_logger(run: Run) -> None:
    cfg = run.cfg
    run.layer_names = [name for name, _ in moe.moe_layers(run.raw_model)]
    run.logger = RunLogger(
        run.run_dir,
        max_steps=cfg.trainer.max_steps,
        start_step=run.step,
        progress=cfg.logger.progress,
        wandb_config=to_dict(cfg) if cfg.logger.name == "wandb" else None,
        project=cfg.logger.project,
        run_name=cfg.logger.run_name,
        enabled=run.ctx.is_main,
    )
    for note in run.notes:
        run.logger.message(note)
    if run.resumed_from is not None:
        run.logger.message(f"resumed from {run.resumed_from} at step {run.step}")
    run.logger.message(
        f"model: {run.raw_model.num_params():,} parameters, {run.raw_model.num_active_params():,} active per "
        f"token; router={cfg.router.name}, world_size={run.ctx.world_size}, device={run.ctx.device}"
    )
    run.logger.message(_speed_line(cfg, run.ctx.device))


def _speed_line(cfg: TrainConfig, device: torch.device) -> str:
    """Which path the step takes, and why where ``auto`` chose it (the CPU fallback of the fast path included)."""
    dispatch = resolve_dispatch(cfg.dispatch.name, device)
    compiled = use_compile(cfg.trainer.compile, device)
    why_dispatch = ""
    if cfg.dispatch.name == "auto":
        why_dispatch = (
            " (auto: CUDA and triton)" if dispatch == "triton" else " (auto: the Triton kernels need CUDA and triton)"
        )
    why_compile = f" (trainer.compile={cfg.trainer.compile})"
    return (
        f"path: dispatch={dispatch}{why_dispatch}, torch.compile {'per block' if compiled else 'off'}{why_compile}, "
        f"activation_checkpointing={cfg.trainer.activation_checkpointing}"
    )


def _train_step(run: Run, batches, layers, stop: _StopSignal) -> StepResult:
    """One optimizer step: set the learning rate, accumulate the micro-batches' gradients, stop on a non-finite
    loss before the update, the strategy's step (which refuses a non-finite gradient), the routers' update."""
    cfg, ctx = run.cfg, run.ctx
    started = time.perf_counter()
    lr = lr_at(run.step, cfg.optim, cfg.trainer.max_steps)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    stats = _accumulate_gradients(run, batches, layers)
    stats[2] = (~torch.isfinite(stats[0] + stats[1])).double()
    stats[3] = float(stop.received)
    if ctx.distributed:
        dist.all_reduce(stats, group=ctx.process_group)
        stats[:2] /= ctx.world_size
    loss, aux_loss, nonfinite, stop_requested = stats.tolist()  # the step's one host sync for the loss
    not_applied = f"the update was not applied; last good checkpoint: {run.last_ckpt or 'none'}"
    if nonfinite:
        raise NonFiniteLossError(
            f"non-finite loss at step {run.step + 1} (loss={loss}, aux_loss={aux_loss}); {not_applied}"
        )
    clip = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")
    try:
        grad_norm = run.strategy.step(run.optimizer, clip)
    except NonFiniteGradientError as error:
        raise NonFiniteLossError(
            f"non-finite gradient at step {run.step + 1} (loss={loss}, grad_norm={error.grad_norm}); {not_applied}"
        ) from error
    run.optimizer.zero_grad(set_to_none=True)
    moe.update_routers(run.raw_model, ctx.process_group)
    run.step += 1
    run.tokens_seen += run.tokens_per_step
    elapsed = time.perf_counter() - started
    run.interval_time += elapsed
    run.train_time += elapsed
    run.timed_tokens += run.tokens_per_step
    run.interval_tokens += run.tokens_per_step
    run.logger.advance()
    return StepResult(loss, aux_loss, lr, float(grad_norm), bool(stop_requested))


def _accumulate_gradients(run: Run, batches, layers) -> torch.Tensor:
    """Forward and backward of ``trainer.grad_accum`` micro-batches; returns (4,) float64 on the device: the
    mean task loss and aux loss, then two slots for the caller. Adds the routed-token counts to the interval."""
    cfg, ctx, grad_accum = run.cfg, run.ctx, run.cfg.trainer.grad_accum
    stats = torch.zeros(4, dtype=torch.float64, device=ctx.device)
    try:
        for micro in range(grad_accum):
            x, y = next(batches)
            x, y = x.to(ctx.device, non_blocking=True), y.to(ctx.device, non_blocking=True)
            with run.strategy.accumulate(run.model, micro == grad_accum - 1):
                with _autocast(cfg, ctx.device):
                    _, task_loss = run.model(x, y)
                    aux = moe.aux_loss(run.raw_model)
                run.strategy.backward((task_loss + aux) / grad_accum)
            stats[0] += task_loss.detach().double() / grad_accum
            stats[1] += aux.detach().double() / grad_accum
            load = _expert_load(layers)
            if load is not None:
                run.interval_load = load if run.interval_load is None else run.interval_load + load
    except FloatingPointError as error:
        raise NonFiniteLossError(
            f"non-finite values at step {run.step + 1}: {error}; last good checkpoint: {run.last_ckpt or 'none'}"
        ) from error
    return stats


def _log_train(run: Run, result: StepResult) -> None:
    """Write the train record of the steps since the last one (expert load summed over ranks) and reset them."""
    if run.interval_load is not None and run.ctx.distributed:
        dist.all_reduce(run.interval_load, group=run.ctx.process_group)
    tokens_per_s = run.interval_tokens / max(run.interval_time, 1e-9)
    run.logger.write(
        {
            "kind": "train",
            "step": run.step,
            "loss": result.loss,
            "lr": result.lr,
            "aux_loss": result.aux_loss,
            "grad_norm": result.grad_norm,
            "tokens_per_s": tokens_per_s,
            "mfu": _mfu(run, tokens_per_s),
            "tokens_seen": run.tokens_seen,
            **_load_fields(run.layer_names, run.interval_load, run.interval_tokens),
        }
    )
    run.interval_load, run.interval_time, run.interval_tokens = None, 0.0, 0


def _mfu(run: Run, tokens_per_s: float) -> float | None:
    """Model FLOPs utilisation per device: ``trainer.peak_tflops``, else the bf16 peak of a known GPU
    (``moe.hardware``); None on a CPU or an unknown GPU."""
    peak = run.cfg.trainer.peak_tflops
    if peak is None and run.ctx.device.type == "cuda":
        peak = bf16_peak_tflops(torch.cuda.get_device_name(run.ctx.device))
    value = mfu(run.raw_model.flops_per_token(), tokens_per_s / run.ctx.world_size, peak)
    return None if value is None else round(value, 4)


def _evaluate(run: Run) -> None:
    run.val_loss = evaluate(run.raw_model, run.cfg, run.splits.val, run.ctx)
    run.logger.write(_eval_record(run.step, run.val_loss, run.splits.bytes_per_token))


def _save(run: Run) -> None:
    """Checkpoint the current step (collective: every rank gathers its share; rank 0 writes)."""
    model_state = run.strategy.model_state(run.raw_model)
    optimizer_state = run.strategy.optimizer_state(run.raw_model, run.optimizer)
    if run.ctx.is_main:
        state = {
            "step": run.step,
            "tokens_seen": run.tokens_seen,
            "train_time_s": run.train_time,
            "timed_tokens": run.timed_tokens,
            "model": model_state,
            "optimizer": optimizer_state,
            "sampler": run.sampler.state_dict(),
            "rng": rng_state(),
            "config": to_dict(run.cfg),
            "architecture": run.arch,
            "world_size": run.ctx.world_size,
        }
        save_checkpoint(run.ckpt_dir, run.step, state, keep=run.cfg.trainer.keep_checkpoints)
    if run.ctx.distributed:
        dist.barrier()
    run.last_ckpt = checkpoint_path(run.ckpt_dir, run.step)


def _finish(run: Run) -> dict:
    """The summary; rank 0 also writes the exports and prints it."""
    from moe.data import unigram_entropy_bits

    splits, val_loss = run.splits, run.val_loss
    summary = {
        "steps": run.step,
        "tokens_seen": run.tokens_seen,
        "train_time_s": round(run.train_time, 2),
        "tokens_per_s": round(run.timed_tokens / run.train_time, 1) if run.train_time > 0 else None,
        "mfu": _mfu(run, run.timed_tokens / run.train_time) if run.train_time > 0 else None,
        "final_val_loss": val_loss,
        "val_bits_per_byte": bits_per_byte(val_loss, splits.bytes_per_token) if val_loss is not None else None,
        # A unigram model of the tokens, per byte: the baseline the bits per byte are compared with.
        "val_unigram_entropy_bits": (
            unigram_entropy_bits(splits.val) / splits.bytes_per_token if splits.bytes_per_token else None
        ),
        "tokenizer": str(splits.tokenizer_path) if splits.tokenizer_path else None,
        "num_params": run.raw_model.num_params(),
        "num_active_params": run.raw_model.num_active_params(),
        "world_size": run.ctx.world_size,
        "last_checkpoint": str(run.last_ckpt) if run.last_ckpt else None,
        "stopped_by": run.stopped_by,
    }
    export_model = run.strategy.export_model(
        run.raw_model, lambda: build_model(run.cfg, run.vocab_size), run.ctx.is_main
    )
    if run.ctx.is_main:
        _write_outputs(run.cfg, export_model, run.run_dir, summary, run.arch, run.logger)
    run.logger.close()
    return summary


def bits_per_byte(loss: float, bytes_per_token: float | None) -> float | None:
    """A loss in nats per token as bits per byte of text (None when the bytes per token are unknown)."""
    return loss / math.log(2) / bytes_per_token if bytes_per_token else None


def _eval_record(step: int, val_loss: float, bytes_per_token: float | None) -> dict:
    return {
        "kind": "eval",
        "step": step,
        "val_loss": val_loss,
        "val_bits_per_byte": bits_per_byte(val_loss, bytes_per_token),
    }


def _write_outputs(cfg: TrainConfig, model: nn.Module, run_dir: Path, summary: dict, arch: dict, logger: RunLogger):
    """Rank 0: safetensors export, heat-map, summary.json and the printed summary."""
    if cfg.trainer.export_safetensors and summary["stopped_by"] is None:
        summary["safetensors"] = str(export_safetensors(model, run_dir / "model.safetensors", {"architecture": arch}))
    heatmap = plot_expert_load(run_dir / "metrics.jsonl", run_dir / "expert_load.png")
    summary["expert_load_png"] = str(heatmap) if heatmap else None
    last_train = [r for r in read_metrics(run_dir / "metrics.jsonl") if r["kind"] == "train"]
    summary["final_expert_load"] = last_train[-1]["expert_load"] if last_train else {}
    summary["final_load_imbalance"] = last_train[-1]["load_imbalance"] if last_train else None
    per_token = last_train[-1].get("experts_per_token") if last_train else None
    if per_token is not None:
        # Cost at the measured experts per token (last log interval), not the nominal top_k.
        summary["experts_per_token"] = per_token
        summary["num_active_params"] = model.num_active_params(per_token)
        summary["flops_per_token"] = model.flops_per_token(per_token)
    atomic_write_bytes(run_dir / "summary.json", (json.dumps(summary, indent=2) + "\n").encode())
    logger.close()
    logger.message(format_summary(summary, run_dir, cfg.trainer.resume))
    log_sample(model, cfg, run_dir, logger.message)


def format_summary(summary: dict, run_dir: Path, resume: str = "auto") -> str:
    """The end-of-run summary a person reads: quality against the unigram baseline, speed, load, files.

    ``resume`` is the run's ``trainer.resume``: the hint to continue a stopped run depends on it.
    """
    lines = ["", "==== moe-train summary ====", f"run dir        {run_dir}"]
    if summary["stopped_by"]:
        how = "rerun the same command" + ("" if resume == "auto" else " with trainer.resume=auto")
        lines.append(f"stopped by     {summary['stopped_by']} at step {summary['steps']} ({how} to continue)")
    lines.append(
        f"steps          {summary['steps']:,}  ({summary['tokens_seen']:,} tokens, "
        f"{summary['train_time_s']:.1f} s training, {summary['tokens_per_s'] or 0:,.0f} tokens/s"
        + (f", MFU {summary['mfu']:.1%}" if summary.get("mfu") is not None else "")
        + ")"
    )
    if summary["val_bits_per_byte"] is not None:
        ratio = summary["val_bits_per_byte"] / summary["val_unigram_entropy_bits"]
        lines.append(
            f"val            {summary['val_bits_per_byte']:.3f} bits/byte vs unigram entropy "
            f"{summary['val_unigram_entropy_bits']:.3f} bits/byte (ratio {ratio:.2f}; "
            f"loss {summary['final_val_loss']:.4f} nats)"
        )
    elif summary["final_val_loss"] is not None:
        lines.append(f"val loss       {summary['final_val_loss']:.4f} nats/token")
    for name, shares in summary.get("final_expert_load", {}).items():
        lines.append(f"expert load    {name}: " + " ".join(f"{s:.2f}" for s in shares))
    if summary.get("experts_per_token") is not None:
        lines.append(
            f"experts/token  {summary['experts_per_token']:.2f} measured "
            f"(active params {summary['num_active_params']:,})"
        )
    if summary.get("final_load_imbalance") is not None:
        lines.append(f"load max/mean  {summary['final_load_imbalance']:.2f} (1.00 = perfectly balanced)")
    lines.append(f"checkpoint     {summary['last_checkpoint']}")
    if summary.get("safetensors"):
        lines.append(f"weights        {summary['safetensors']}")
    if summary.get("expert_load_png"):
        lines.append(f"heat-map       {summary['expert_load_png']}")
    return "\n".join(lines)
