"""Expert-parallel benchmark: all-to-all bandwidth per message size, MoE layer throughput per ep_size, and the
EP dispatcher's overhead against the local dispatcher at ep_size 1.

Usage::

    torchrun --nproc_per_node 8 -m moe.bench.ep --out ep.json      # one node, every ep_size dividing 8
    python -m moe.bench.ep --out ep.json                            # one GPU (world size 1): overhead at ep_size 1
    python -m moe.bench.ep --device cpu --shape tiny --out ep.json  # gloo smoke run on a CPU

Prints tables on rank 0 and writes every number (device, versions, date, command) to ``--out``.
Times are the median of ``--repeats`` timed calls after warm-up (CUDA events on GPU), taking the slowest
rank. All-to-all: even splits of a ``size`` MiB send buffer per rank; ``algbw`` = bytes sent per rank /
time, ``busbw`` = algbw * (W - 1) / W, the share that actually leaves the GPU (nccl-tests' convention; 0
at world size 1, where the exchange is a local copy). Layer: forward + backward of one MoE layer on
``tokens`` tokens per rank with random bf16 data; TFLOP/s counts the expert MLPs only (see moe.bench.timing).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import socket
import statistics
import sys
import time

import torch
import torch.distributed as dist

from moe.bench.timing import expert_flops
from moe.dispatch.expert_parallel import ExpertParallelDispatcher
from moe.layer import MoELayer
from moe.parallel import init_expert_parallel

SHAPES = {
    "e8": {"tokens": 16384, "hidden": 4096, "ffn": 14336, "experts": 8, "top_k": 2},
    "e64": {"tokens": 16384, "hidden": 2048, "ffn": 1408, "experts": 64, "top_k": 6},
    "e128": {"tokens": 32768, "hidden": 1024, "ffn": 512, "experts": 128, "top_k": 8},
    "tiny": {"tokens": 256, "hidden": 64, "ffn": 128, "experts": 8, "top_k": 2},
}
SIZES_MIB = "0.0625,0.25,1,4,16,64,256"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init(device_type: str) -> torch.device:
    """Join torchrun's process group, or start a one-process group when run without torchrun."""
    if "WORLD_SIZE" not in os.environ:
        os.environ.update(
            RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port())
        )
    if device_type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    return device


def timed(fn, device: torch.device, warmup: int, repeats: int) -> float:
    """Median milliseconds of ``fn()`` on this rank, then the maximum over ranks."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        dist.barrier()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            begin = time.perf_counter()
            fn()
            times.append((time.perf_counter() - begin) * 1e3)
    slowest = torch.tensor([statistics.median(times)], dtype=torch.float64, device=device)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
    return float(slowest)


def bench_all_to_all(sizes_mib: list[float], device, dtype, warmup: int, repeats: int) -> list[dict]:
    """All-to-all bandwidth over the whole world for each send-buffer size (MiB per rank)."""
    world = dist.get_world_size()
    rows = []
    for size in sizes_mib:
        numel = int(size * 2**20) // dtype.itemsize // world * world
        send = torch.randn(numel, device=device).to(dtype)
        recv = torch.empty_like(send)
        ms = timed(lambda send=send, recv=recv: dist.all_to_all_single(recv, send), device, warmup, repeats)
        nbytes = numel * dtype.itemsize
        algbw = nbytes / (ms * 1e-3) / 1e9
        rows.append(
            {"size_mib": nbytes / 2**20, "ms": ms, "algbw_gbps": algbw, "busbw_gbps": algbw * (world - 1) / world}
        )
    return rows


def _layer_step(layer: MoELayer, x: torch.Tensor, grad: torch.Tensor):
    def step():
        x.grad = None  # x requires grad, as a layer input inside a model does
        for p in layer.parameters():
            p.grad = None
        layer(x).backward(grad)

    return step


def bench_layer(
    shape: dict, ep_size: int, dispatcher: str, device, dtype, activation: str, warmup: int, repeats: int
) -> dict:
    """Forward + backward of one MoE layer with experts split over ``ep_size`` ranks (or the local dispatcher)."""
    groups = init_expert_parallel(ep_size, shape["experts"]) if dispatcher == "expert_parallel" else None
    torch.manual_seed(0)
    kwargs = {"top_k": shape["top_k"], "activation": activation}
    if groups is not None:
        kwargs["dispatcher"] = ExpertParallelDispatcher(groups.ep_group, shape["experts"])
    layer = MoELayer(shape["hidden"], shape["ffn"], shape["experts"], **kwargs).to(device, dtype).train()
    generator = torch.Generator(device=device).manual_seed(1 + dist.get_rank())
    x = torch.randn(shape["tokens"], shape["hidden"], device=device, dtype=dtype, generator=generator).requires_grad_()
    grad = torch.randn(x.shape, device=device, dtype=dtype, generator=generator)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    ms = timed(_layer_step(layer, x, grad), device, warmup, repeats)
    flops = expert_flops(shape["tokens"], shape["top_k"], shape["hidden"], shape["ffn"], activation)
    return {
        "ep_size": ep_size,
        "dispatcher": dispatcher,
        "local_experts": shape["experts"] // ep_size if groups is not None else shape["experts"],
        "ms": ms,
        "tokens_per_s_per_gpu": shape["tokens"] / (ms * 1e-3),
        "tflops_per_gpu": flops / (ms * 1e-3) / 1e12,
        "peak_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
    }


def _table(title: str, rows: list[dict], columns: list[str]) -> str:
    def fmt(value):
        if isinstance(value, float):
            return f"{value:.4g}"
        return "-" if value is None else str(value)

    cells = [[fmt(row[c]) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    lines = [title, "  ".join(c.rjust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="JSON file to write (atomically)")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="e64")
    for key in ("tokens", "hidden", "ffn", "experts", "top_k"):
        parser.add_argument(f"--{key.replace('_', '-')}", type=int, help=f"override the shape's {key}")
    parser.add_argument("--activation", choices=("swiglu", "gelu", "relu"), default="swiglu")
    parser.add_argument(
        "--ep-sizes",
        default=None,
        help="comma list; default: every divisor of the world size that divides the expert count",
    )
    parser.add_argument("--sizes-mib", default=SIZES_MIB, help="all-to-all send sizes per rank, MiB, comma list")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    """Run the three measurements and write the JSON; returns the result on every rank."""
    args = parse_args(argv)
    if args.warmup < 0 or args.repeats < 1:
        raise ValueError(f"--warmup must be >= 0 and --repeats >= 1, got {args.warmup} and {args.repeats}")
    shape = dict(SHAPES[args.shape])
    shape.update({k: getattr(args, k) for k in shape if getattr(args, k) is not None})
    device = init(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    world, rank = dist.get_world_size(), dist.get_rank()
    if args.ep_sizes:
        ep_sizes = [int(v) for v in args.ep_sizes.split(",")]
    else:
        ep_sizes = [d for d in range(1, world + 1) if world % d == 0 and shape["experts"] % d == 0]
    sizes = [float(v) for v in args.sizes_mib.split(",")]
    try:
        a2a = bench_all_to_all(sizes, device, dtype, args.warmup, args.repeats)
        common = (device, dtype, args.activation, args.warmup, args.repeats)
        layers = [bench_layer(shape, 1, "local", *common)]
        layers += [bench_layer(shape, ep, "expert_parallel", *common) for ep in ep_sizes]
    finally:
        dist.barrier()
    local_ms = layers[0]["ms"]
    ep1 = next((row for row in layers if row["dispatcher"] == "expert_parallel" and row["ep_size"] == 1), None)
    result = {
        "benchmark": "moe.bench.ep",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "backend": dist.get_backend(),
        "world_size": world,
        "dtype": str(dtype).removeprefix("torch."),
        "shape": shape,
        "activation": args.activation,
        "all_to_all": a2a,
        "layer": layers,
        "ep1_overhead_vs_local": None if ep1 is None else ep1["ms"] / local_ms - 1.0,
    }
    if rank == 0:
        print(
            _table(
                f"all-to-all, world size {world} ({result['backend']}, {result['dtype']})",
                a2a,
                ["size_mib", "ms", "algbw_gbps", "busbw_gbps"],
            )
        )
        print()
        print(
            _table(
                f"MoE layer fwd+bwd per GPU, {shape}",
                layers,
                ["dispatcher", "ep_size", "local_experts", "ms", "tokens_per_s_per_gpu", "tflops_per_gpu", "peak_gib"],
            )
        )
        if ep1 is not None:
            print(
                f"\nEP dispatcher at ep_size 1 vs local dispatcher: {100 * result['ep1_overhead_vs_local']:+.1f}% time"
            )
        tmp = f"{args.out}.tmp{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(result, f, indent=2)
            f.write("\n")
        os.replace(tmp, args.out)
        print(f"wrote {args.out}")
    dist.destroy_process_group()
    return result


if __name__ == "__main__":
    main()
