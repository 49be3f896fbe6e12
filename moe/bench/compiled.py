"""The layer under ``torch.compile``: graph breaks (with reasons) and eager vs compiled fwd+bwd time.

Usage::

    python -m moe.bench.compiled --shape e64 --activation gelu
"""

from __future__ import annotations

import argparse

import torch

from moe.bench.layer import SHAPES, _layer
from moe.bench.timing import expert_flops, time_cuda


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="e64")
    parser.add_argument("--activation", choices=["gelu", "swiglu"], default="gelu")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args(argv)
    shape = SHAPES[args.shape]
    flops = expert_flops(shape["tokens"], shape["top_k"], shape["hidden"], shape["ffn"], args.activation)
    x = torch.randn(shape["tokens"], shape["hidden"], device="cuda", dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn_like(x)
    for variant in ("kernels", "torch"):
        layer = _layer(shape, args.activation, variant)
        explanation = torch._dynamo.explain(layer)(x)
        print(f"{variant}: {explanation.graph_count} graph(s), {explanation.graph_break_count} break(s)")
        for reason in explanation.break_reasons:
            print(f"  break: {reason.reason.splitlines()[0][:160]}")
        torch._dynamo.reset()
        compiled = torch.compile(layer)
        for name, fn in (("eager", layer), ("compiled", compiled)):
            ms = time_cuda(lambda fn=fn: fn(x).backward(grad), repeats=args.repeats)
            print(f"  {args.shape} {args.activation} {variant} {name}: {ms:.3f} ms, {flops / ms / 1e9:.1f} TFLOP/s")
        del layer, compiled
        torch._dynamo.reset()
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
