"""MoE layer throughput on one CUDA GPU: ours with and without kernels, a loop, peers and the grouped GEMM alone.

For each shape (``SHAPES``) it also gives a per-stage breakdown (router, permute, experts, combine).

Usage::

    python -m moe.bench.layer --out bench.json [--plot bench.png] [--shapes e8,e64,e128] [--activations gelu,swiglu]

Prints one table (TFLOP/s counts expert-MLP FLOPs only; forward + backward = 3x forward) and writes every
number with the device, versions, date and command to ``--out``. Timings are the median of ``--repeats``
CUDA-event-timed calls after warm-up, on random bf16 data with a freshly initialised router. The input
requires grad in every variant, as inside a model: the backward then runs the input-gradient GEMM of each
expert matmul, which the 3x-forward FLOP count assumes.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import sys
import tempfile
import traceback

import torch

from moe.bench.peers import PEERS, PeerUnavailable
from moe.bench.timing import expert_flops, peak_memory_gib, time_cuda
from moe.layer import MoELayer

SHAPES = {
    "e8": {"tokens": 16384, "hidden": 4096, "ffn": 14336, "experts": 8, "top_k": 2},
    "e64": {"tokens": 16384, "hidden": 2048, "ffn": 1408, "experts": 64, "top_k": 6},
    "e128": {"tokens": 32768, "hidden": 1024, "ffn": 512, "experts": 128, "top_k": 8},
}
TARGETS = {"e8": 650, "e64": 450, "e128": 350}
DEVICE = "cuda"
VARIANTS = ("kernels", "torch", "loop", "grouped_mm", "torchtitan", "deepspeed", "megablocks")
# Which peers implement which expert activation (torchtitan's experts are SwiGLU only; the others GELU here).
PEER_ACTIVATION = {"torchtitan": "swiglu", "deepspeed": "gelu", "megablocks": "gelu"}


ROUTERS = ("topk", "expert_choice", "relu")


def _router_kwargs(shape: dict, router: str) -> dict:
    """Router arguments giving T * k assignments: expert choice with capacity factor k; ReLU see _calibrate_relu."""
    if router == "expert_choice":
        return {"router": "expert_choice", "capacity_factor": float(shape["top_k"])}
    return {"router": router, "top_k": shape["top_k"]}


def _calibrate_relu(layer: MoELayer, x: torch.Tensor, top_k: int) -> None:
    """Make a ReLU gate active on k/E of the pairs, as a trained ReMoE router is at its target sparsity.

    ``x[:, 0]`` is 1 in ReLU runs, so gate column 0 acts as a bias: it is set to minus the (1 - k/E)
    quantile of the other features' logits, so each logit is positive with probability k/E.
    """
    with torch.no_grad():
        weight = layer.router.gate.weight
        weight[:, 0] = 0
        logits = (x.float() @ weight.float().t()).flatten()
        quantile = 1.0 - top_k / weight.shape[0]
        sample = logits[torch.randint(logits.numel(), (1 << 20,), device=logits.device)]
        weight[:, 0] = -torch.quantile(sample, quantile).to(weight.dtype)


def _layer(shape: dict, activation: str, variant: str, router: str = "topk", x: torch.Tensor | None = None) -> MoELayer:
    kwargs = {**_router_kwargs(shape, router), "activation": activation}
    if variant == "kernels":
        kwargs["dispatcher"] = "triton"
    if variant == "loop":
        kwargs["experts"] = "loop"
    layer = MoELayer(shape["hidden"], shape["ffn"], shape["experts"], **kwargs).to(DEVICE, torch.bfloat16).train()
    if router == "relu":
        _calibrate_relu(layer, x, shape["top_k"])
    return layer


def _clear_grads(module: torch.nn.Module | None, x: torch.Tensor) -> None:
    x.grad = None
    for p in module.parameters() if module is not None else ():
        p.grad = None


def _measure(step, module, x: torch.Tensor, repeats: int) -> dict:
    def call():
        _clear_grads(module, x)
        step()

    ms = time_cuda(call, repeats=repeats)
    return {"ms": ms, "peak_gib": peak_memory_gib(call)}


def _grouped_mm_ceiling(shape: dict, activation: str, tokens_per_expert: torch.Tensor, repeats: int) -> dict:
    """The two (three for SwiGLU) expert matmuls alone, forward + backward, on the layer's group sizes."""
    n, h, f = int(tokens_per_expert.sum()), shape["hidden"], shape["ffn"]
    width = 2 * f if activation == "swiglu" else f
    offsets = torch.cumsum(tokens_per_expert, 0, dtype=torch.int32)
    bf16 = {"device": DEVICE, "dtype": torch.bfloat16}
    x = torch.randn(n, h, **bf16, requires_grad=True)
    hid = torch.randn(n, f, **bf16, requires_grad=True)
    w_in = torch.randn(shape["experts"], h, width, **bf16).mul_(h**-0.5).requires_grad_()
    w_out = torch.randn(shape["experts"], f, h, **bf16).mul_(f**-0.5).requires_grad_()
    g_in, g_out = torch.randn(n, width, **bf16), torch.randn(n, h, **bf16)

    def step():
        for t in (x, hid, w_in, w_out):
            t.grad = None
        a = torch._grouped_mm(x, w_in, offs=offsets)
        b = torch._grouped_mm(hid, w_out, offs=offsets)
        torch.autograd.backward([a, b], [g_in, g_out])

    return {"ms": time_cuda(step, repeats=repeats), "peak_gib": peak_memory_gib(step)}


def _stages(layer: MoELayer, x: torch.Tensor, repeats: int) -> dict:
    """Forward + backward milliseconds of each stage alone, on this layer's routing of ``x``."""
    flat = x.detach()
    with torch.no_grad():
        routing = layer.router(flat)
        dispatched = layer.dispatcher.permute(flat, routing)
        rows = dispatched.rows
        y = layer.experts(rows, dispatched.tokens_per_expert)
        out = layer.dispatcher.combine(y, dispatched, routing)
    g_rows, g_out = torch.randn_like(rows), torch.randn_like(out)
    x_leaf = flat.clone().requires_grad_()
    rows_leaf = rows.clone().requires_grad_()
    y_leaf = y.clone().requires_grad_()
    weighted = dataclasses.replace(routing, weight=routing.weight.detach().clone().requires_grad_())

    def router():
        _clear_grads(layer.router, x_leaf)
        r = layer.router(x_leaf)
        (r.weight.sum() + r.aux_loss).backward()

    def permute():
        x_leaf.grad = None
        layer.dispatcher.permute(x_leaf, routing).rows.backward(g_rows)

    def experts():
        _clear_grads(layer.experts, rows_leaf)
        layer.experts(rows_leaf, dispatched.tokens_per_expert).backward(g_rows)

    def combine():
        y_leaf.grad = None
        weighted.weight.grad = None
        layer.dispatcher.combine(y_leaf, dispatched, weighted).backward(g_out)

    return {
        name: time_cuda(fn, repeats=repeats)
        for name, fn in [("router", router), ("permute", permute), ("experts", experts), ("combine", combine)]
    }


def run_shape(name: str, activation: str, variants: list[str], repeats: int, log, router: str = "topk") -> list[dict]:
    """Every requested variant on one shape and activation; failures are recorded, not raised.

    TFLOP/s counts the assignments the router actually made (T * k for top-k and expert choice; the
    data-dependent count for ReLU routing).
    """
    shape = SHAPES[name]
    torch.manual_seed(0)
    x = torch.randn(shape["tokens"], shape["hidden"], device=DEVICE, dtype=torch.bfloat16)
    if router == "relu":
        x[:, 0] = 1.0
    x.requires_grad_()  # inside a model the layer's input always needs a gradient
    grad = torch.randn_like(x)
    results = []
    tokens_per_expert = None
    for variant in variants:
        row = dict(shape=name, activation=activation, variant=variant, router=router, **shape)
        flops = expert_flops(shape["tokens"], shape["top_k"], shape["hidden"], shape["ffn"], activation)
        try:
            if variant in PEERS:
                if PEER_ACTIVATION[variant] != activation:
                    continue
                module, peer_step = PEERS[variant](
                    shape["hidden"], shape["ffn"], shape["experts"], shape["top_k"], torch.bfloat16
                )
                row.update(_measure(lambda step=peer_step: step(x, grad), module, x, repeats))
            elif variant == "grouped_mm":
                if tokens_per_expert is None:
                    with torch.no_grad():
                        tokens_per_expert = _layer(shape, activation, "torch", router, x).router(x).tokens_per_expert
                row.update(_grouped_mm_ceiling(shape, activation, tokens_per_expert, repeats))
                module = None
            else:
                module = _layer(shape, activation, variant, router, x)
                with torch.no_grad():
                    tokens_per_expert = module.router(x).tokens_per_expert
                assignments = int(tokens_per_expert.sum())
                row["assignments"] = assignments
                flops = expert_flops(assignments, 1, shape["hidden"], shape["ffn"], activation)
                row.update(_measure(lambda layer=module: layer(x).backward(grad), module, x, repeats))
                if variant in ("kernels", "torch"):
                    row["stages_ms"] = _stages(module, x, repeats)
            row["tflops"] = flops / (row["ms"] * 1e-3) / 1e12
        except PeerUnavailable as error:
            row["error"] = str(error)
        except Exception as error:  # noqa: BLE001 - an OOM or a peer's own failure is a result to report
            row["error"] = f"{type(error).__name__}: {error}".splitlines()[0][:300]
            log.write(traceback.format_exc())
        module = None
        torch.cuda.empty_cache()
        results.append(row)
        print(_format_row(row), flush=True)
    return results


def _format_row(row: dict) -> str:
    head = f"{row['shape']:5} {row['activation']:6} {row['variant']:11}"
    if "error" in row:
        return f"{head} unavailable: {row['error'][:150]}"
    text = f"{head} {row['tflops']:7.1f} TFLOP/s {row['ms']:9.3f} ms {row['peak_gib']:7.2f} GiB"
    if "stages_ms" in row:
        text += "  stages " + " ".join(f"{k}={v:.3f}" for k, v in row["stages_ms"].items())
    return text


def environment() -> dict:
    """Device, versions, date and the exact command, for the results file."""
    versions = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda}
    for package in ("triton", "torchtitan", "deepspeed", "megablocks"):
        try:
            versions[package] = __import__(package).__version__
        except Exception as error:  # noqa: BLE001 - a broken peer install is recorded, not fatal
            versions[package] = f"unavailable ({type(error).__name__})"
    return {
        "device": torch.cuda.get_device_name(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "versions": versions,
        "command": " ".join(["python -m moe.bench.layer", *sys.argv[1:]]),
        "dtype": "bfloat16",
    }


def write_json_atomic(path: str, data: dict) -> None:
    """Write ``data`` as JSON to ``path`` through a temporary file and a rename (refuses to overwrite)."""
    if os.path.exists(path):
        raise FileExistsError(f"{path} exists; choose a new --out path")
    directory = os.path.dirname(os.path.abspath(path))
    with tempfile.NamedTemporaryFile("w", dir=directory, delete=False, suffix=".tmp") as handle:
        json.dump(data, handle, indent=1)
    os.replace(handle.name, path)


def plot(results: list[dict], path: str) -> None:
    """Bar chart of TFLOP/s per shape and variant (one panel per activation), with the targets."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    activations = sorted({r["activation"] for r in results})
    fig, axes = plt.subplots(1, len(activations), figsize=(7 * len(activations), 4), squeeze=False)
    for ax, activation in zip(axes[0], activations):
        rows = [r for r in results if r["activation"] == activation and "tflops" in r]
        shapes = [s for s in SHAPES if any(r["shape"] == s for r in rows)]
        variants = [v for v in VARIANTS if any(r["variant"] == v for r in rows)]
        width = 0.8 / max(1, len(variants))
        for i, variant in enumerate(variants):
            values = [
                next((r["tflops"] for r in rows if r["shape"] == s and r["variant"] == variant), 0) for s in shapes
            ]
            ax.bar([j + i * width for j in range(len(shapes))], values, width, label=variant)
        for j, s in enumerate(shapes):
            ax.hlines(TARGETS[s], j - width / 2, j + 0.8 - width / 2, colors="k", linestyles="dashed")
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(shapes))], shapes)
        ax.set_ylabel("TFLOP/s (expert MLP, fwd+bwd)")
        ax.set_title(f"{activation}; dashed: target")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="JSON results path (must not exist)")
    parser.add_argument("--plot", help="PNG bar chart path")
    parser.add_argument("--log", default=os.devnull, help="where tracebacks of failed variants go")
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--activations", default="gelu,swiglu")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument(
        "--router", default="topk", choices=ROUTERS, help="routing of our layers (peers and the loop are top-k only)"
    )
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("moe.bench.layer needs a CUDA GPU")
    shapes, activations, variants = (s.split(",") for s in (args.shapes, args.activations, args.variants))
    for value, valid, what in [
        (shapes, SHAPES, "shape"),
        (activations, ("gelu", "swiglu"), "activation"),
        (variants, VARIANTS, "variant"),
    ]:
        bad = [v for v in value if v not in valid]
        if bad:
            raise SystemExit(f"unknown {what} {bad}; choose from {list(valid)}")
    if args.router != "topk" and set(variants) - {"kernels", "torch", "grouped_mm"}:
        raise SystemExit(f"--router {args.router} supports the variants kernels, torch, grouped_mm; got {variants}")
    if args.repeats < 1:
        raise SystemExit(f"--repeats must be >= 1, got {args.repeats}")
    env = environment()
    print(json.dumps(env))
    results = []
    with open(args.log, "a") as log:
        for activation in activations:
            for name in shapes:
                results += run_shape(name, activation, variants, args.repeats, log, args.router)
    write_json_atomic(args.out, {"environment": env, "targets_tflops": TARGETS, "results": results})
    if args.plot:
        plot(results, args.plot)
    print("\nsummary (TFLOP/s, expert MLP fwd+bwd):")
    for row in results:
        print(_format_row(row))


if __name__ == "__main__":
    main()
