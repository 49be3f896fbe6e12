"""moe.hardware: the peak table picks the most specific name, and MFU is achieved over peak FLOP/s."""

import pytest

from moe.hardware import bf16_peak_tflops, mfu


@pytest.mark.parametrize(
    "name,peak",
    [
        ("NVIDIA H100 80GB HBM3", 989.0),
        ("NVIDIA H100 PCIe", 756.0),
        ("NVIDIA H200", 989.0),
        ("NVIDIA L4", 121.0),
        ("NVIDIA L40S", 362.0),
        ("NVIDIA A100-SXM4-80GB", 312.0),
        ("Quadro P1000", None),
    ],
)
def test_peak_of_known_devices(name, peak):
    assert bf16_peak_tflops(name) == peak


def test_mfu_is_model_flops_over_peak():
    assert mfu(6e9, 100_000, 1000.0) == pytest.approx(0.6)
    assert mfu(6e9, 100_000, None) is None
