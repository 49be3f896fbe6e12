"""Where a layer's forward + backward spends GPU time: the top CUDA kernels from torch.profiler.

Usage::

    python -m moe.bench.profile --shape e128 --activation gelu [--kernels] [--steps 3]
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from moe.bench.layer import SHAPES, _layer


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="e128")
    parser.add_argument("--activation", choices=["gelu", "swiglu"], default="gelu")
    parser.add_argument("--kernels", action="store_true", help="the layer with moe.kernels (default: pure torch)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rows", type=int, default=30)
    args = parser.parse_args(argv)
    shape = SHAPES[args.shape]
    layer = _layer(shape, args.activation, "kernels" if args.kernels else "torch")
    x = torch.randn(shape["tokens"], shape["hidden"], device="cuda", dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn_like(x)
    for _ in range(3):
        layer(x).backward(grad)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(args.steps):
            layer(x).backward(grad)
        torch.cuda.synchronize()
    print(f"{args.shape} {args.activation} kernels={args.kernels}: per-step CUDA time by kernel ({args.steps} steps)")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.rows, max_name_column_width=90))


if __name__ == "__main__":
    main()
