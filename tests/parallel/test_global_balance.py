"""Global-batch load balancing on CPU/gloo: two ranks equal one process on the concatenated batch."""

from __future__ import annotations

from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from moe.routers import TopKRouter

HIDDEN, EXPERTS, TOKENS, WORLD = 8, 6, 12, 2


def _router(scope: str) -> TopKRouter:
    torch.manual_seed(0)
    return TopKRouter(HIDDEN, EXPERTS, top_k=2, z_loss_coef=0.0, balance_scope=scope).train()


def _batch(rank: int) -> torch.Tensor:
    return torch.randn(TOKENS, HIDDEN, generator=torch.Generator().manual_seed(100 + rank))


def _worker(rank: int, rendezvous: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=WORLD, timeout=timedelta(seconds=60)
    )
    # Reference: one process, micro-batch scope, on both ranks' tokens (its counts are the global ones).
    reference = _router("micro_batch")
    x_all = torch.cat([_batch(r) for r in range(WORLD)]).requires_grad_()
    ref_loss = reference(x_all).aux_loss
    ref_loss.backward()

    router = _router("global_batch")
    x = _batch(rank).requires_grad_()
    loss = router(x).aux_loss
    loss.backward()
    # What DDP does: average the ranks' gradients; the global loss is the mean of the ranks' losses.
    mean_loss = loss.detach().clone()
    grad = router.gate.weight.grad.clone()
    for tensor in (mean_loss, grad):
        dist.all_reduce(tensor)
        tensor /= WORLD
    torch.testing.assert_close(mean_loss, ref_loss.detach(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grad, reference.gate.weight.grad, rtol=1e-5, atol=1e-7)
    rows = slice(rank * TOKENS, (rank + 1) * TOKENS)
    torch.testing.assert_close(x.grad / WORLD, x_all.grad[rows], rtol=1e-5, atol=1e-7)
    # Micro-batch scope is not the same loss: each rank balances only its own tokens.
    local = _router("micro_batch")
    local_loss = local(_batch(rank)).aux_loss.detach()
    dist.all_reduce(local_loss)
    assert not torch.allclose(local_loss / WORLD, ref_loss.detach(), rtol=1e-4, atol=0)
    dist.destroy_process_group()


@pytest.mark.distributed
def test_two_ranks_with_global_scope_match_one_process_on_the_whole_batch(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "rdv"),), nprocs=WORLD, join=True)
