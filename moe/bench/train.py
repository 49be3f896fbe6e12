"""End-to-end training throughput on one CUDA GPU: tokens/s and model FLOPs utilisation of a GPT config,
with the pure-torch MoE path, with the Triton kernels, and with the kernels under ``torch.compile``.

Usage::

    python -m moe.bench.train --out train.json [--variants torch,kernels,kernels_compile] [--steps 20]

Uses ``model=small`` of configs/ by default (12 layers, hidden 768, 8 experts top-2, seq 1024), bf16
autocast, AdamW, batch ``--batch-size`` sequences of the default stdlib byte data. Each step's time is taken
between CUDA events; the table reports the median over ``--steps`` steps after ``--warmup`` steps.
MFU = flops_per_token x tokens/s over the bf16 dense peak (``--peak-tflops``, H100 SXM datasheet 989).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import tempfile

import torch
import yaml

from moe.data import BatchSampler, prepare_tokens
from moe.layer import aux_loss, update_routers
from moe.model import GPT, ModelConfig

SMALL_YAML = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "model", "small.yaml")
with open(SMALL_YAML, encoding="utf-8") as _f:
    SMALL = yaml.safe_load(_f)  # the trainer's model=small, one source of truth


def run_variant(name: str, args, sampler: BatchSampler) -> dict:
    """Train ``args.warmup + args.steps`` steps of one variant; return its median step time and rates."""
    torch.manual_seed(0)
    kernels = name.startswith("kernels")
    model = GPT(ModelConfig(**SMALL, dispatcher="triton" if kernels else "local")).cuda()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, fused=True)
    forward = torch.compile(model) if name.endswith("compile") else model
    times = []
    for step in range(args.warmup + args.steps):
        x, y = (t.cuda(non_blocking=True) for t in sampler.batch(step))
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            _, loss = forward(x, y)
            loss = loss + aux_loss(model)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        update_routers(model)
        end.record()
        times.append((start, end))
    torch.cuda.synchronize()
    step_ms = statistics.median(s.elapsed_time(e) for s, e in times[args.warmup :])
    tokens_per_s = args.batch_size * SMALL["seq_len"] / (step_ms / 1e3)
    flops = model.flops_per_token()
    result = {
        "variant": name,
        "step_ms": step_ms,
        "tokens_per_s": tokens_per_s,
        "model_tflops": flops * tokens_per_s / 1e12,
        "mfu": flops * tokens_per_s / (args.peak_tflops * 1e12),
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30,
        "final_loss": float(loss.detach()),
        "params": model.num_params(),
        "active_params": model.num_active_params(),
    }
    del model, optimizer, forward
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    return result


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--variants", default="torch,kernels,kernels_compile")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--peak-tflops", type=float, default=989.0)
    args = parser.parse_args(argv)
    valid = ("torch", "kernels", "torch_compile", "kernels_compile")
    variants = args.variants.split(",")
    for v in variants:
        if v not in valid:
            parser.error(f"unknown variant {v!r}; valid: {valid}")
    splits = prepare_tokens("stdlib")
    sampler = BatchSampler(splits.train, args.batch_size, SMALL["seq_len"], seed=0)
    report = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "date": datetime.date.today().isoformat(),
        "command": " ".join([sys.executable, "-m", "moe.bench.train", *(argv or sys.argv[1:])]),
        "model": SMALL,
        "batch_size": args.batch_size,
        "results": [],
    }
    print(f"{'variant':<16} {'step ms':>8} {'tokens/s':>10} {'TFLOP/s':>8} {'MFU':>6} {'peak GiB':>9}")
    for name in variants:
        r = run_variant(name, args, sampler)
        report["results"].append(r)
        print(
            f"{name:<16} {r['step_ms']:8.1f} {r['tokens_per_s']:10.0f} {r['model_tflops']:8.1f} "
            f"{r['mfu']:6.1%} {r['peak_memory_gib']:9.1f}",
            flush=True,
        )
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(args.out)) or ".")
        with os.fdopen(fd, "w") as f:
            json.dump(report, f, indent=2)
        os.replace(tmp, args.out)


if __name__ == "__main__":
    main()
