"""Expert parallelism on CPU/gloo: EP outputs and gradients equal the single-process layer for every router."""

from __future__ import annotations

import copy
import os
import sys
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import moe
from moe.dispatch.expert_parallel import ExpertParallelDispatcher
from moe.layer import MoELayer
from moe.parallel import (
    all_reduce_gradients,
    check_layout,
    ep_group_ranks,
    expert_data_group_ranks,
    expert_parallel_layer,
    expert_parameter_names,
    full_state_dict,
    init_expert_parallel,
    load_full_state_dict,
    to_expert_parallel,
)

HIDDEN, FFN, EXPERTS, BATCH, SEQ = 16, 24, 8, 2, 8
VOCAB = 50
# Arguments a router cannot do without; every other router is built with its defaults.
REQUIRED_ROUTER_KWARGS = {
    "relu": {"top_k": 2},
    "hash": {"vocab_size": VOCAB},
    "merged": {"source_experts": 2 * EXPERTS},  # two original experts merged into each of the EXPERTS groups
}
EXTRA_CASES = [
    ("topk", {"top_k": 2, "capacity_factor": 1.0}, {}),
    ("topk", {"top_k": 1}, {"shared_experts": 1, "shared_expert_gate": True}),
    # The Triton permute/combine (and top-k selection) around the all-to-all, under the Triton interpreter here.
    ("topk", {"top_k": 2}, {"dispatcher": "triton"}),
    ("expert_choice", {}, {"dispatcher": "triton"}),
]


def router_cases() -> list[tuple[str, dict, dict]]:
    """(router name, router kwargs, layer kwargs) for every registered router plus a few variants."""
    cases = [(name, REQUIRED_ROUTER_KWARGS.get(name, {}), {}) for name in sorted(moe.routers.ROUTERS)]
    return cases + EXTRA_CASES


def _init(rank: int, world_size: int, rendezvous: str, timeout_s: float = 60.0) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{rendezvous}",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=timeout_s),
    )


def _rank_data(rank: int):
    generator = torch.Generator().manual_seed(1000 + rank)
    x = torch.randn(BATCH, SEQ, HIDDEN, generator=generator)
    token_ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=generator)
    cotangent = torch.randn(BATCH, SEQ, HIDDEN, generator=generator)
    return x, token_ids, cotangent


def _loss(layer: MoELayer, rank: int):
    x, token_ids, cotangent = _rank_data(rank)
    x.requires_grad_(True)
    y = layer(x, token_ids=token_ids)
    return (y * cotangent).sum() + layer.aux_loss, x, y


def _check_router(name: str, router_kwargs: dict, layer_kwargs: dict, groups, world_size: int, rank: int) -> None:
    torch.manual_seed(0)
    full = MoELayer(HIDDEN, FFN, EXPERTS, name, **layer_kwargs, **router_kwargs).train()
    ep_layer = to_expert_parallel(copy.deepcopy(full), groups.ep_group)

    # Reference: the single-process layer on every rank's tokens; global loss = mean of rank losses.
    for source in range(world_size):
        loss, x, y = _loss(full, source)
        (loss / world_size).backward()
        if source == rank:
            ref_y, ref_x_grad = y.detach(), x.grad

    loss, x, y = _loss(ep_layer, rank)
    loss.backward()
    all_reduce_gradients(ep_layer, groups)

    label = f"router={name} {router_kwargs} {layer_kwargs} ep_size={groups.ep_size} rank={rank}"
    torch.testing.assert_close(y.detach(), ref_y, rtol=1e-5, atol=1e-5, msg=lambda m: f"{label} output: {m}")
    # x.grad is this rank's share of the global loss gradient: the reference's times world_size.
    torch.testing.assert_close(
        x.grad, ref_x_grad * world_size, rtol=1e-5, atol=1e-5, msg=lambda m: f"{label} input grad: {m}"
    )
    expert_names = set(expert_parameter_names(ep_layer))
    local = ep_layer.placement.local_experts
    full_params = dict(full.named_parameters())
    for pname, param in ep_layer.named_parameters():
        ref_grad = full_params[pname].grad
        if pname in expert_names:
            ref_grad = ref_grad[local.start : local.stop]
        assert param.grad is not None, f"{label}: {pname} got no gradient"
        torch.testing.assert_close(
            param.grad, ref_grad, rtol=1e-5, atol=1e-5, msg=lambda m, p=pname: f"{label} {p}: {m}"
        )


def _check_checkpoint_layouts(group_by_ep: dict, rank: int) -> None:
    """A full state dict saved at one ep_size loads into the others and gives the same outputs."""
    torch.manual_seed(0)
    full = MoELayer(HIDDEN, FFN, EXPERTS, "topk", top_k=2).eval()
    x, _, _ = _rank_data(rank)
    sizes = sorted(group_by_ep)
    source = to_expert_parallel(copy.deepcopy(full), group_by_ep[sizes[-1]].ep_group)
    expected = full(x)
    saved = full_state_dict(source)
    assert saved.keys() == full.state_dict().keys()
    for key, tensor in full.state_dict().items():
        torch.testing.assert_close(saved[key], tensor, rtol=0, atol=0, msg=lambda m, k=key: f"{k}: {m}")
    for ep_size in sizes:
        torch.manual_seed(123)  # different weights: the load must replace all of them
        target = expert_parallel_layer(HIDDEN, FFN, EXPERTS, "topk", ep_group=group_by_ep[ep_size].ep_group, top_k=2)
        assert target.experts.num_experts == EXPERTS // ep_size
        load_full_state_dict(target.eval(), saved)
        torch.testing.assert_close(
            target(x), expected, rtol=1e-5, atol=1e-5, msg=lambda m, e=ep_size: f"ep_size={e}: {m}"
        )


def _equivalence_worker(rank: int, world_size: int, ep_sizes: list[int], rendezvous: str) -> None:
    _init(rank, world_size, rendezvous)
    group_by_ep = {ep_size: init_expert_parallel(ep_size, num_experts=EXPERTS) for ep_size in ep_sizes}
    for ep_size, groups in group_by_ep.items():
        assert groups.ep_rank == rank % ep_size
        assert dist.get_process_group_ranks(groups.ep_group) == ep_group_ranks(world_size, ep_size)[rank // ep_size]
        assert (
            dist.get_process_group_ranks(groups.expert_data_group)
            == expert_data_group_ranks(world_size, ep_size)[rank % ep_size]
        )
        for name, router_kwargs, layer_kwargs in router_cases():
            _check_router(name, router_kwargs, layer_kwargs, groups, world_size, rank)
    _check_checkpoint_layouts(group_by_ep, rank)
    dist.destroy_process_group()


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("world_size, ep_sizes", [(2, [1, 2]), (4, [2, 4])])
def test_expert_parallel_matches_single_process(tmp_path, world_size, ep_sizes):
    mp.spawn(_equivalence_worker, args=(world_size, ep_sizes, str(tmp_path / "rdv")), nprocs=world_size, join=True)


def test_layout_validation_names_the_values():
    with pytest.raises(ValueError, match="world size 6 must be a multiple of ep_size=4"):
        check_layout(6, 4)
    with pytest.raises(ValueError, match="num_experts=6 must be divisible by ep_size=4"):
        check_layout(8, 4, [8, 6])
    assert ep_group_ranks(8, 4) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert expert_data_group_ranks(8, 4) == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert expert_data_group_ranks(4, 1) == [[0, 1, 2, 3]]


def _failing_worker(rank: int, rendezvous: str, errors) -> None:
    _init(rank, 2, rendezvous, timeout_s=600.0)
    groups = init_expert_parallel(2, num_experts=EXPERTS)
    torch.manual_seed(0)
    layer = to_expert_parallel(MoELayer(HIDDEN, FFN, EXPERTS, "topk", top_k=2), groups.ep_group)
    x, _, _ = _rank_data(rank)
    if rank == 1:
        x[0, 0, 0] = float("nan")  # the router raises before the dispatcher's first collective
    try:
        layer(x)
    except Exception as error:
        errors.put((rank, type(error).__name__, str(error)))
        raise
    errors.put((rank, "no error", ""))


@pytest.mark.distributed
def test_rank_failure_stops_every_rank(tmp_path):
    """Rank 1 raises while rank 0 waits in the all-to-all: both exit within seconds, not at the 600 s timeout."""
    context = mp.get_context("spawn")
    errors = context.Queue()
    rendezvous = str(tmp_path / "rdv")
    processes = [context.Process(target=_failing_worker, args=(r, rendezvous, errors)) for r in range(2)]
    start = time.monotonic()
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=60)
    elapsed = time.monotonic() - start
    alive = [p.pid for p in processes if p.is_alive()]
    for process in processes:
        if process.is_alive():
            process.kill()
    assert not alive, f"processes {alive} still running after {elapsed:.0f} s"
    assert [p.exitcode for p in processes] == [1, 1]
    reported = {rank: (kind, text) for rank, kind, text in (errors.get(timeout=5) for _ in range(2))}
    assert "non-finite router logits" in reported[1][1], reported[1]
    assert "closed by peer" in reported[0][1].lower(), reported[0]


@pytest.mark.distributed
@pytest.mark.slow
def test_torchrun_stops_every_rank_on_failure(tmp_path):
    """Under torchrun the launcher sees the failing rank, stops the other and exits non-zero with the error."""
    import subprocess

    script = tmp_path / "fail.py"
    script.write_text(
        "import sys, torch, torch.distributed as dist, moe\n"
        "from moe.parallel import init_expert_parallel, to_expert_parallel\n"
        "dist.init_process_group('gloo')\n"
        f"groups = init_expert_parallel(2, num_experts={EXPERTS})\n"
        "torch.manual_seed(0)\n"
        f"layer = to_expert_parallel(moe.MoELayer({HIDDEN}, {FFN}, {EXPERTS}, top_k=2), groups.ep_group)\n"
        f"x = torch.randn(4, {HIDDEN})\n"
        "if dist.get_rank() == 1:\n"
        "    x[0, 0] = float('nan')\n"
        "layer(x)\n"
    )
    env = dict(os.environ, OMP_NUM_THREADS="1")
    start = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone", str(script)],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert result.returncode != 0
    assert "non-finite router logits" in result.stdout + result.stderr
    assert time.monotonic() - start < 100


def test_world_size_one_matches_local_and_rejects_a_wrong_routing(tmp_path):
    _init(0, 1, str(tmp_path / "rdv"))
    try:
        torch.manual_seed(0)
        full = MoELayer(HIDDEN, FFN, EXPERTS, "topk", top_k=2)
        ep_layer = to_expert_parallel(copy.deepcopy(full), dist.group.WORLD)
        x, _, _ = _rank_data(0)
        torch.testing.assert_close(ep_layer(x), full(x), rtol=1e-6, atol=1e-6)
        routing = moe.routers.TopKRouter(HIDDEN, 4)(x.reshape(-1, HIDDEN))
        with pytest.raises(ValueError, match="routing has 4 experts, dispatcher was built for num_experts=8"):
            ep_layer.dispatcher.permute(x.reshape(-1, HIDDEN), routing)
        with pytest.raises(TypeError, match="uses ExpertParallelDispatcher; to_expert_parallel replaces a"):
            to_expert_parallel(ep_layer, dist.group.WORLD)
        with pytest.raises(ValueError, match="local='expert_parallel' must name a single-process dispatcher"):
            ExpertParallelDispatcher(dist.group.WORLD, EXPERTS, local="expert_parallel")
    finally:
        dist.destroy_process_group()
