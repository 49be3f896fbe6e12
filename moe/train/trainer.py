"""The ``moe-train`` loop: one process (CPU or GPU) or DDP under torchrun, with exact resume.

``train(cfg, run_dir)`` is the whole job: prepare data, build and wrap the model, run the optimizer
steps with gradient accumulation, evaluate, checkpoint, and finish with ``summary.json``, a safetensors
export, the expert-load heat-map and a printed summary. Model wrapping for data parallelism lives in
``wrap_model`` only, so other strategies can be added in one place.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

import moe
from moe.train.checkpoint import (
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
from moe.train.config import TrainConfig, architecture, to_dict
from moe.train.logging import RunLogger, plot_expert_load, read_metrics
from moe.train.parallel import ParallelPlan, export_submitit_env, make_plan
from moe.upcycle import init_model_from


class NonFiniteLossError(FloatingPointError):
    """Training produced a non-finite loss or gradient; the run stopped before applying it."""


@dataclass
class DistContext:
    """Where this process sits: rank, world size, device, and the data-parallel process group."""

    rank: int
    world_size: int
    device: torch.device
    process_group: dist.ProcessGroup | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def setup_distributed(device_choice: str) -> DistContext:
    """Pick the device and, under torchrun (WORLD_SIZE > 1), join the process group (NCCL on GPU, gloo on CPU)."""
    export_submitit_env()
    use_cuda = device_choice == "cuda" or (device_choice == "auto" and torch.cuda.is_available())
    if device_choice == "cuda" and not torch.cuda.is_available():
        raise ValueError("trainer.device='cuda' but no CUDA device is available; valid here: auto, cpu")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return DistContext(rank=rank, world_size=world_size, device=device, process_group=None)


def build_model(cfg: TrainConfig, vocab_size: int) -> nn.Module:
    """The GPT decoder of ``moe.model`` for this config and vocabulary."""
    from moe.model import GPT, ModelConfig

    m = cfg.model
    return GPT(
        ModelConfig(
            vocab_size=vocab_size,
            seq_len=m.seq_len,
            num_layers=m.num_layers,
            hidden_size=m.hidden_size,
            num_heads=m.num_heads,
            ffn_hidden_size=m.ffn_hidden_size,
            num_experts=m.num_experts,
            top_k=m.top_k,
            moe_every=m.moe_every,
            shared_experts=m.shared_experts,
            router=cfg.router.name,
            router_kwargs=dict(cfg.router.kwargs),
            experts=cfg.experts.impl,
            kernels=cfg.experts.kernels,
            activation=m.activation,
            tie_embeddings=m.tie_embeddings,
            dropout=m.dropout,
        )
    )


def wrap_model(model: nn.Module, cfg: TrainConfig, ctx: DistContext) -> tuple[nn.Module, nn.Module, ParallelPlan]:
    """Apply ``parallel.ep_size`` and ``trainer.strategy`` (moe.train.parallel); the one place the model is wrapped.

    Returns (model as trained, the unwrapped model, the plan); call it before building the optimizer.
    """
    plan = make_plan(cfg, ctx.world_size, ctx.device)
    model = plan.prepare(model)
    return plan.wrap(model), model, plan


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices (embeddings and stacked expert weights included), none on vectors."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.dim() >= 2 else no_decay).append(param)
    o = cfg.optim
    groups = [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps)


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


class _StopSignal:
    """Remembers a SIGTERM so the loop can checkpoint and exit between optimizer steps."""

    def __init__(self):
        self.received = False
        self.previous = None

    def __enter__(self):
        self.previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame):
        self.received = True

    def __exit__(self, *exc):
        signal.signal(signal.SIGTERM, self.previous)


def prepare_data(cfg: TrainConfig, ctx: DistContext):
    """Build (rank 0 first, the others then read the cache) and return ``moe.data.TokenSplits``."""
    from moe.data import prepare_tokens

    d = cfg.data
    source = d.source if d.source == "stdlib" else d.path
    kwargs = {"val_fraction": d.val_fraction}
    if d.source == "bin":
        kwargs.update(dtype=d.dtype, val_source=d.val_path, vocab_size=d.vocab_size)
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


def train(cfg: TrainConfig, run_dir: str | Path) -> dict:
    """Run the job described by ``cfg`` in ``run_dir``; returns the summary (also written to summary.json).

    Raises ``NonFiniteLossError`` (naming the step) on a non-finite loss or gradient, keeping the last
    good checkpoint; on SIGTERM saves a checkpoint and returns with ``summary["stopped_by"] = "SIGTERM"``.
    """
    ctx = setup_distributed(cfg.trainer.device)
    try:
        return _train(cfg, Path(run_dir), ctx)
    finally:
        if ctx.distributed and dist.is_initialized():
            dist.destroy_process_group()


def _train(cfg: TrainConfig, run_dir: Path, ctx: DistContext) -> dict:
    t_cfg = cfg.trainer
    if t_cfg.threads is not None:
        torch.set_num_threads(t_cfg.threads)
    if ctx.distributed:
        shared = [str(run_dir)]
        dist.broadcast_object_list(shared, src=0)
        run_dir = Path(shared[0])
    ckpt_dir = run_dir / "checkpoints"
    torch.manual_seed(t_cfg.seed)

    from moe.data import BatchSampler, unigram_entropy_bits

    splits = prepare_data(cfg, ctx)
    vocab_size = cfg.data.vocab_size or splits.vocab_size
    model = build_model(cfg, vocab_size)
    if t_cfg.init_from is not None and resolve_resume(t_cfg.resume, ckpt_dir) is None:
        init_model_from(model, t_cfg.init_from, drop_fraction=t_cfg.init_drop_fraction, seed=t_cfg.seed)
    model, raw_model, plan = wrap_model(model.to(ctx.device), cfg, ctx)
    optimizer = build_optimizer(raw_model, cfg)
    model = plan.attach_optimizer(model, optimizer)
    decay_steps = cfg.optim.decay_steps or t_cfg.max_steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, WarmupCosine(cfg.optim.warmup_steps, decay_steps, cfg.optim.min_lr_ratio)
    )
    sampler = BatchSampler(
        splits.train, cfg.data.batch_size, cfg.model.seq_len, rank=ctx.rank, world_size=ctx.world_size, seed=t_cfg.seed
    )
    arch = architecture(cfg, vocab_size)

    step, tokens_seen, last_ckpt = 0, 0, None
    resume_from = resolve_resume(t_cfg.resume, ckpt_dir)
    if resume_from is not None:
        state = load_checkpoint(resume_from)
        check_architecture(state["architecture"], arch, resume_from)
        plan.load_model_state(raw_model, state["model"])
        plan.load_optimizer_state(raw_model, optimizer, state["optimizer"])
        check_same_optimizer(state["config"]["optim"], to_dict(cfg)["optim"], resume_from)
        scheduler.load_state_dict(state["scheduler"])
        # The schedule's length follows this run's trainer.max_steps (a longer run extends the cosine).
        scheduler.lr_lambdas[0].__dict__.update(
            WarmupCosine(cfg.optim.warmup_steps, decay_steps, cfg.optim.min_lr_ratio).__dict__
        )
        for group, base_lr in zip(optimizer.param_groups, scheduler.base_lrs):
            group["lr"] = base_lr * scheduler.lr_lambdas[0](scheduler.last_epoch)
        sampler.load_state_dict(state["sampler"])
        set_rng_state(state["rng"])
        step, tokens_seen, last_ckpt = state["step"], state["tokens_seen"], resume_from
    check_no_later_checkpoints(ckpt_dir, step)
    layers = moe.moe_layers(raw_model)
    layer_names = [name for name, _ in layers]

    logger = RunLogger(
        run_dir,
        max_steps=t_cfg.max_steps,
        start_step=step,
        progress=cfg.logger.progress,
        wandb_config=to_dict(cfg) if cfg.logger.name == "wandb" else None,
        project=cfg.logger.project,
        run_name=cfg.logger.run_name,
        enabled=ctx.is_main,
    )
    if resume_from is not None:
        logger.message(f"resumed from {resume_from} at step {step}")
    logger.message(
        f"model: {raw_model.num_params():,} parameters, {raw_model.num_active_params():,} active per token; "
        f"router={cfg.router.name}, world_size={ctx.world_size}, device={ctx.device}"
    )

    def save(at_step: int) -> Path:
        path = checkpoint_path(ckpt_dir, at_step)
        model_state, optimizer_state = plan.model_state(raw_model), plan.optimizer_state(raw_model, optimizer)
        if ctx.is_main:
            state = {
                "step": at_step,
                "tokens_seen": tokens_seen,
                "model": model_state,
                "optimizer": optimizer_state,
                "scheduler": scheduler.state_dict(),
                "sampler": sampler.state_dict(),
                "rng": rng_state(),
                "config": to_dict(cfg),
                "architecture": arch,
                "world_size": ctx.world_size,
            }
            save_checkpoint(ckpt_dir, at_step, state, keep=t_cfg.keep_checkpoints)
        if ctx.distributed:
            dist.barrier()
        return path

    tokens_per_step = cfg.data.batch_size * cfg.model.seq_len * ctx.world_size * t_cfg.grad_accum
    batches = iter(sampler)
    interval_load = None
    interval_time, interval_tokens, train_time = 0.0, 0, 0.0
    stopped_by = None
    val_loss = None
    model.train()
    with _StopSignal() as stop:
        while step < t_cfg.max_steps:
            started = time.perf_counter()
            step_stats = torch.zeros(4, dtype=torch.float64, device=ctx.device)
            try:
                for micro in range(t_cfg.grad_accum):
                    x, y = next(batches)
                    x, y = x.to(ctx.device, non_blocking=True), y.to(ctx.device, non_blocking=True)
                    last_micro = micro == t_cfg.grad_accum - 1
                    with plan.accumulate(model, last_micro):
                        with _autocast(cfg, ctx.device):
                            _, task_loss = model(x, y)
                            aux = moe.aux_loss(raw_model)
                        plan.backward((task_loss + aux) / t_cfg.grad_accum)
                    step_stats[0] += task_loss.detach().double() / t_cfg.grad_accum
                    step_stats[1] += aux.detach().double() / t_cfg.grad_accum
                    load = _expert_load(layers)
                    if load is not None:
                        interval_load = load if interval_load is None else interval_load + load
            except FloatingPointError as error:
                raise NonFiniteLossError(
                    f"non-finite values at step {step + 1}: {error}; last good checkpoint: {last_ckpt or 'none'}"
                ) from error
            clip = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")
            plan.finish_gradients(raw_model)
            grad_norm = plan.clip_grad_norm(raw_model, clip)
            step_stats[2] = (~torch.isfinite(step_stats[0] + step_stats[1] + grad_norm.double())).double()
            step_stats[3] = float(stop.received)
            if ctx.distributed:
                dist.all_reduce(step_stats, group=ctx.process_group)
                step_stats[:2] /= ctx.world_size
            # One host sync per optimizer step: a non-finite step must be caught before it reaches the weights.
            loss_value, aux_value, nonfinite, stop_requested = step_stats.tolist()
            if nonfinite:
                raise NonFiniteLossError(
                    f"non-finite loss or gradient at step {step + 1} (loss={loss_value}, aux_loss={aux_value}, "
                    f"grad_norm={float(grad_norm)}); the update was not applied; "
                    f"last good checkpoint: {last_ckpt or 'none'}"
                )
            lr = optimizer.param_groups[0]["lr"]
            plan.optimizer_step(optimizer)
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            moe.update_routers(raw_model, ctx.process_group)
            step += 1
            tokens_seen += tokens_per_step
            elapsed = time.perf_counter() - started
            interval_time += elapsed
            train_time += elapsed
            interval_tokens += tokens_per_step
            logger.advance()

            if step % t_cfg.log_interval == 0 or step == t_cfg.max_steps:
                if interval_load is not None and ctx.distributed:
                    dist.all_reduce(interval_load, group=ctx.process_group)
                logger.write(
                    {
                        "kind": "train",
                        "step": step,
                        "loss": loss_value,
                        "lr": lr,
                        "aux_loss": aux_value,
                        "grad_norm": float(grad_norm),
                        "tokens_per_s": interval_tokens / max(interval_time, 1e-9),
                        "tokens_seen": tokens_seen,
                        **_load_fields(layer_names, interval_load, interval_tokens),
                    }
                )
                interval_load, interval_time, interval_tokens = None, 0.0, 0
            if t_cfg.eval_interval and step % t_cfg.eval_interval == 0 and step < t_cfg.max_steps:
                val_loss = evaluate(raw_model, cfg, splits.val, ctx)
                logger.write(_eval_record(step, val_loss, splits.is_bytes))
            if stop_requested:
                last_ckpt = save(step)
                stopped_by = "SIGTERM"
                logger.message(f"SIGTERM: saved {last_ckpt} at step {step}; exiting")
                break
            if (t_cfg.ckpt_interval and step % t_cfg.ckpt_interval == 0) or step == t_cfg.max_steps:
                last_ckpt = save(step)

    if stopped_by is None:
        val_loss = evaluate(raw_model, cfg, splits.val, ctx)
        logger.write(_eval_record(step, val_loss, splits.is_bytes))
    summary = {
        "steps": step,
        "tokens_seen": tokens_seen,
        "train_time_s": round(train_time, 2),
        "tokens_per_s": round(tokens_seen / train_time, 1) if train_time > 0 else None,
        "final_val_loss": val_loss,
        "val_bits_per_byte": val_loss / math.log(2) if splits.is_bytes and val_loss is not None else None,
        "val_unigram_entropy_bits": unigram_entropy_bits(splits.val) if splits.is_bytes else None,
        "num_params": raw_model.num_params(),
        "num_active_params": raw_model.num_active_params(),
        "world_size": ctx.world_size,
        "last_checkpoint": str(last_ckpt) if last_ckpt else None,
        "stopped_by": stopped_by,
    }
    export_model = plan.export_model(raw_model, lambda: build_model(cfg, vocab_size), ctx.is_main)
    if ctx.is_main:
        _finish(cfg, export_model, run_dir, summary, arch, logger)
    logger.close()
    return summary


def _eval_record(step: int, val_loss: float, is_bytes: bool) -> dict:
    return {
        "kind": "eval",
        "step": step,
        "val_loss": val_loss,
        "val_bits_per_byte": val_loss / math.log(2) if is_bytes else None,
    }


def _finish(cfg: TrainConfig, model: nn.Module, run_dir: Path, summary: dict, arch: dict, logger: RunLogger):
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
    logger.message(format_summary(summary, run_dir))


def format_summary(summary: dict, run_dir: Path) -> str:
    """The end-of-run summary a person reads: quality against the unigram baseline, speed, load, files."""
    lines = ["", "==== moe-train summary ====", f"run dir        {run_dir}"]
    if summary["stopped_by"]:
        lines.append(
            f"stopped by     {summary['stopped_by']} at step {summary['steps']} (resume with trainer.resume=auto)"
        )
    lines.append(
        f"steps          {summary['steps']:,}  ({summary['tokens_seen']:,} tokens, "
        f"{summary['train_time_s']:.1f} s training, {summary['tokens_per_s'] or 0:,.0f} tokens/s)"
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
