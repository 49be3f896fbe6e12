"""Datasheet bf16 dense peaks of known GPUs, for model FLOPs utilisation (MFU)."""

from __future__ import annotations

# TFLOP/s, dense bf16 tensor-core peak (no sparsity), from the vendors' datasheets. Checked in order: the
# first key found in the device name wins, so the more specific names come first.
BF16_PEAK_TFLOPS = {
    "H100 PCIe": 756.0,
    "H100 NVL": 835.0,
    "H100": 989.0,  # SXM
    "H200": 989.0,
    "H20": 148.0,
    "B200": 2250.0,
    "A100": 312.0,
    "A10G": 125.0,
    "L40S": 362.0,
    "L40": 181.0,
    "L4": 121.0,
}


def bf16_peak_tflops(device_name: str) -> float | None:
    """The bf16 dense peak of ``device_name`` (as ``torch.cuda.get_device_name`` gives it), or None if unknown."""
    for key, peak in BF16_PEAK_TFLOPS.items():
        if key in device_name:
            return peak
    return None


def mfu(flops_per_token: float, tokens_per_s: float, peak_tflops: float | None) -> float | None:
    """Model FLOPs utilisation: achieved model FLOP/s over the peak (None without a peak)."""
    if not peak_tflops:
        return None
    return flops_per_token * tokens_per_s / (peak_tflops * 1e12)
