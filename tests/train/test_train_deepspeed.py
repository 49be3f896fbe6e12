"""trainer.strategy=deepspeed (ZeRO stage 1 and 2, with and without expert parallelism) under torchrun on CPU/gloo:
the same loss and gradient-norm curve as DDP with the same global batch, and checkpoints that move between
DeepSpeed and DDP in both directions."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from moe.train.config import TrainerSchema
from moe.train.strategies import STRATEGIES, DeepSpeedStrategy

from train_runs import PARALLEL_RUN, run_moe_train

HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None
needs_deepspeed = pytest.mark.skipif(
    not HAS_DEEPSPEED, reason="deepspeed is not installed (pip install 'moe[deepspeed]'; without CUDA: DS_BUILD_OPS=0)"
)

SMALL = [
    *PARALLEL_RUN,
    "trainer.grad_accum=2",
    "optim.grad_clip=1.0",
]
GLOBAL_BATCH = 8  # sequences per optimizer step: batch_size x world size x 2 micro-batches


def _train(run_dir: Path, nproc: int, *overrides: str) -> list[tuple[int, float, float]]:
    """Run moe-train (torchrun when nproc > 1) and return its (step, loss, grad_norm) records."""
    records = run_moe_train(run_dir, nproc, [*SMALL, f"data.batch_size={GLOBAL_BATCH // nproc // 2}", *overrides])
    return [(r["step"], r["loss"], r["grad_norm"]) for r in records]


def _assert_same_curve(actual, expected, label):
    """Loss within 1e-4 (float32 on CPU) and the global gradient norm within 1e-5 relative at every step.

    The norm covers the expert gradients, so a wrong expert-gradient scale or reduction group shows there.
    """
    assert [r[0] for r in actual] == [r[0] for r in expected], label
    for (step, loss, norm), (_, ref_loss, ref_norm) in zip(actual, expected):
        assert abs(loss - ref_loss) <= 1e-4, f"{label}: step {step} loss {loss} vs {ref_loss}"
        assert abs(norm - ref_norm) <= 1e-5 * ref_norm, f"{label}: step {step} grad norm {norm} vs {ref_norm}"


@needs_deepspeed
@pytest.mark.distributed
@pytest.mark.slow
def test_deepspeed_zero_with_expert_parallel_matches_ddp_and_checkpoints_move(tmp_path):
    reference = _train(tmp_path / "ddp", 2, "parallel.ep_size=1")
    assert len(reference) == 6
    runs = {}
    for stage in (1, 2):
        for ep_size in (1, 2):
            label = f"zero{stage}_ep{ep_size}"
            runs[label] = _train(
                tmp_path / label,
                2,
                "trainer.strategy=deepspeed",
                f"trainer.zero_stage={stage}",
                f"parallel.ep_size={ep_size}",
            )
            _assert_same_curve(runs[label], reference, f"deepspeed {label} vs ddp")

    # A DeepSpeed ZeRO-2 + EP checkpoint continues under DDP, and a DDP checkpoint under ZeRO-1 + EP: model
    # and AdamW state travel in the layout-independent format. (Two ranks in both, so that the per-rank
    # balance losses, and with them the gradient norms, are the same computation.)
    from_deepspeed = _train(
        tmp_path / "resume_ddp",
        2,
        "parallel.ep_size=1",
        f"trainer.resume={tmp_path / 'zero2_ep2' / 'checkpoints' / 'ckpt-00000003.pt'}",
    )
    _assert_same_curve(from_deepspeed, runs["zero2_ep2"][3:], "zero2 ep2 checkpoint resumed by ddp")
    from_ddp = _train(
        tmp_path / "resume_ds",
        2,
        "trainer.strategy=deepspeed",
        "trainer.zero_stage=1",
        "parallel.ep_size=2",
        f"trainer.resume={tmp_path / 'ddp' / 'checkpoints' / 'ckpt-00000003.pt'}",
    )
    _assert_same_curve(from_ddp, reference[3:], "ddp checkpoint resumed by deepspeed zero1 ep2")


def test_zero_stage_is_validated():
    with pytest.raises(ValueError, match=r"trainer.zero_stage=3 is not valid; valid choices: \[1, 2\]"):
        TrainerSchema(zero_stage=3)
    with pytest.raises(TypeError, match="trainer.zero_stage=True is not valid"):
        TrainerSchema(zero_stage=True)
    assert STRATEGIES["deepspeed"] is DeepSpeedStrategy


@needs_deepspeed
def test_deepspeed_plan_rejects_bad_settings():
    kwargs = {"micro_batch_size": 2, "grad_accum": 1, "grad_clip": 1.0}
    with pytest.raises(ValueError, match=r"trainer.zero_stage=3 is not valid; valid: \[1, 2\]"):
        DeepSpeedStrategy(1, 2, torch.device("cpu"), zero_stage=3, **kwargs)
    with pytest.raises(ValueError, match="needs at least 2 processes"):
        DeepSpeedStrategy(1, 1, torch.device("cpu"), zero_stage=1, **kwargs)
    with pytest.raises(ValueError, match="world size 2 must be a multiple of ep_size=4"):
        DeepSpeedStrategy(4, 2, torch.device("cpu"), zero_stage=2, **kwargs)


def _non_finite_step_worker(rank: int, world_size: int, port: int) -> None:
    import os

    import torch.distributed as dist
    from torch import nn

    from moe.train.strategies import NonFiniteGradientError

    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    dist.init_process_group("gloo")
    torch.manual_seed(0)
    strategy = DeepSpeedStrategy(
        1, world_size, torch.device("cpu"), zero_stage=1, micro_batch_size=2, grad_accum=1, grad_clip=1.0
    )
    model = strategy.prepare(nn.Linear(8, 8))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    engine = strategy.attach_optimizer(strategy.wrap(model), optimizer)
    x = torch.randn(2, 8)

    def one_step() -> None:
        with strategy.accumulate(engine, True):
            strategy.backward(engine(x).square().mean())
        strategy.step(optimizer, 1.0)

    start = model.weight.detach().clone()
    one_step()
    updated = model.weight.detach().clone()
    assert not torch.equal(updated, start), "a finite step updates the weights"
    if rank == 0:  # one rank's NaN reaches every rank through the gradient reduction
        model.weight.register_hook(lambda grad: grad * float("nan"))
    try:
        one_step()
    except NonFiniteGradientError:
        pass
    else:
        raise AssertionError("a non-finite gradient did not raise")
    assert torch.equal(model.weight.detach(), updated), "the non-finite gradient reached the weights"
    dist.destroy_process_group()


@needs_deepspeed
@pytest.mark.distributed
def test_deepspeed_step_refuses_a_non_finite_gradient_before_the_update():
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_non_finite_step_worker, args=(2, port), nprocs=2, join=True)
