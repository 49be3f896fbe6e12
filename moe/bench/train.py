"""End-to-end training throughput on one CUDA GPU: an MoE GPT and its dense equivalent, side by side.

Usage::

    python -m moe.bench.train --out train.json [--model small|medium] [--variants kernels_compile,dense_compile]

``--model`` names a file of configs/model/ (the trainer's ``model=`` group, one source of truth). Variants:
``torch`` (pure-torch MoE path), ``kernels`` (``dispatcher="triton"``) and ``dense``
(``moe.model.dense_baseline_config``: the same model with each MoE feed-forward replaced by one MLP as wide as
its k active experts), each eager, with ``_compile`` (``torch.compile`` of the whole model) or with
``_compile_blocks`` (each decoder block compiled in place, ``moe.train.speed.compile_blocks``, as
``moe-train`` does). bf16 autocast,
fused AdamW, ``--batch-size`` sequences of random tokens (``--vocab-size``: 256 for small, 32768 for medium by
default). Each step (forward, backward, optimizer, router update) is timed between CUDA events; the table
reports the median over ``--steps`` steps after ``--warmup`` steps, MFU (``GPT.flops_per_token`` x tokens/s
over the device's bf16 peak from ``moe.hardware``, or ``--peak-tflops``) and, for every MoE variant, its
tokens/s over the dense variant with the same compile setting.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import statistics
import sys
import tempfile

import torch
import yaml

from moe.hardware import bf16_peak_tflops, mfu
from moe.layer import aux_loss, update_routers
from moe.model import GPT, ModelConfig, dense_baseline_config
from moe.train.speed import compile_blocks

MODEL_DIR = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "model")
MODELS = ("small", "medium")
DEFAULT_VOCAB = {"small": 256, "medium": 32768}
PATHS = ("torch", "kernels", "dense")
COMPILE_SUFFIXES = ("", "_compile", "_compile_blocks")
VARIANTS = tuple(path + suffix for path in PATHS for suffix in COMPILE_SUFFIXES)


def compile_suffix(variant: str) -> str:
    """The compile setting of a variant name: "", "_compile" or "_compile_blocks"."""
    return max((s for s in COMPILE_SUFFIXES if variant.endswith(s)), key=len)


def model_config(name: str, vocab_size: int, variant: str) -> ModelConfig:
    """The ``configs/model/<name>.yaml`` shape for ``variant`` (its dense equivalent for the dense ones)."""
    with open(os.path.join(MODEL_DIR, f"{name}.yaml"), encoding="utf-8") as f:
        shape = yaml.safe_load(f)
    cfg = ModelConfig(**shape, vocab_size=vocab_size, dispatcher="triton" if variant.startswith("kernels") else "local")
    return dense_baseline_config(dataclasses.replace(cfg, dispatcher="local")) if variant.startswith("dense") else cfg


def run_variant(name: str, args, peak: float | None) -> dict:
    """Train ``args.warmup + args.steps`` steps of one variant; return its median step time and rates."""
    torch.manual_seed(0)
    cfg = model_config(args.model, args.vocab_size, name)
    model = GPT(cfg).cuda()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, fused=True)
    suffix = compile_suffix(name)
    forward = torch.compile(model) if suffix == "_compile" else model
    if suffix == "_compile_blocks":
        compile_blocks(model)
    generator = torch.Generator(device="cuda").manual_seed(0)
    times = []
    for _ in range(args.warmup + args.steps):
        tokens = torch.randint(
            0, cfg.vocab_size, (args.batch_size, cfg.seq_len + 1), device="cuda", generator=generator
        )
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            _, loss = forward(tokens[:, :-1], tokens[:, 1:])
            loss = loss + aux_loss(model)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        update_routers(model)
        end.record()
        times.append((start, end))
    torch.cuda.synchronize()
    step_ms = statistics.median(s.elapsed_time(e) for s, e in times[args.warmup :])
    tokens_per_s = args.batch_size * cfg.seq_len / (step_ms / 1e3)
    flops = model.flops_per_token()
    result = {
        "variant": name,
        "step_ms": step_ms,
        "tokens_per_s": tokens_per_s,
        "model_tflops": flops * tokens_per_s / 1e12,
        "mfu": mfu(flops, tokens_per_s, peak),
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30,
        "final_loss": float(loss.detach()),
        "params": model.num_params(),
        "active_params": model.num_active_params(),
    }
    del model, optimizer, forward
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    return result


def add_dense_ratios(results: list[dict]) -> None:
    """``moe_over_dense``: each MoE variant's tokens/s over the dense variant with the same compile setting."""
    by_name = {r["variant"]: r for r in results}
    for r in results:
        if r["variant"].startswith("dense"):
            continue
        dense = by_name.get("dense" + compile_suffix(r["variant"]))
        r["moe_over_dense"] = r["tokens_per_s"] / dense["tokens_per_s"] if dense else None


def _format(r: dict) -> str:
    mfu_text = f"{r['mfu']:6.1%}" if r["mfu"] is not None else "     -"
    ratio = r.get("moe_over_dense")
    return (
        f"{r['variant']:<22} {r['step_ms']:8.1f} {r['tokens_per_s']:10.0f} {r['model_tflops']:8.1f} {mfu_text} "
        f"{r['peak_memory_gib']:9.1f} {f'{ratio:.2f}' if ratio else '-':>10}"
    )


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="JSON results path")
    parser.add_argument("--model", default="small", choices=MODELS)
    parser.add_argument("--variants", default="torch,kernels,kernels_compile,dense_compile")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--vocab-size", type=int, default=None, help="default: 256 for small, 32768 for medium")
    parser.add_argument("--warmup", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--peak-tflops", type=float, default=None, help="bf16 peak for MFU (default: moe.hardware)")
    args = parser.parse_args(argv)
    variants = args.variants.split(",")
    for v in variants:
        if v not in VARIANTS:
            parser.error(f"unknown variant {v!r}; valid: {list(VARIANTS)}")
    if not torch.cuda.is_available():
        raise SystemExit("moe.bench.train needs a CUDA GPU")
    args.vocab_size = args.vocab_size or DEFAULT_VOCAB[args.model]
    device = torch.cuda.get_device_name()
    peak = args.peak_tflops or bf16_peak_tflops(device)
    report = {
        "device": device,
        "torch": torch.__version__,
        "date": datetime.date.today().isoformat(),
        "command": " ".join([sys.executable, "-m", "moe.bench.train", *(argv or sys.argv[1:])]),
        "model": args.model,
        "vocab_size": args.vocab_size,
        "batch_size": args.batch_size,
        "peak_tflops": peak,
        "results": [],
    }
    print(
        f"{'variant':<22} {'step ms':>8} {'tokens/s':>10} {'TFLOP/s':>8} {'MFU':>6} {'peak GiB':>9} {'MoE/dense':>10}"
    )
    for name in variants:
        report["results"].append(run_variant(name, args, peak))
        add_dense_ratios(report["results"])
        print(_format(report["results"][-1]), flush=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(args.out)) or ".")
        with os.fdopen(fd, "w") as f:
            json.dump(report, f, indent=2)
        os.replace(tmp, args.out)
    ratios = [f"{r['variant']} {r['moe_over_dense']:.2f}" for r in report["results"] if r.get("moe_over_dense")]
    if ratios:
        print("MoE / dense tokens/s: " + ", ".join(ratios))


if __name__ == "__main__":
    main()
