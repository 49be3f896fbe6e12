"""GPU benchmarks: ``python -m moe.bench.layer`` (layer throughput vs peers, per-stage times)."""
