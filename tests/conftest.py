"""Shared pytest set-up: markers, GPU skipping, deterministic seeds, one CPU thread."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    # Triton reads this at each @triton.jit, i.e. when moe.kernels is first imported, which any test
    # module may trigger: set it before collection so the kernels run under the interpreter on CPU.
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped without one)")
    config.addinivalue_line("markers", "slow: takes more than a few seconds on a CPU; still runs in CI")
    config.addinivalue_line("markers", "distributed: spawns several processes (gloo)")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed_and_one_thread():
    """Seed 0 and one intra-op thread: the tensors are small, and on a shared 2-core machine a second
    thread spins more than it helps (measured up to 10x slower)."""
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
