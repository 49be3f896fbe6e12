"""The dispatcher registry and ExpertPlacement: a dispatcher defined here plugs into MoELayer by name."""

import copy
import dataclasses
from dataclasses import dataclass

import pytest
import torch
import torch.distributed as dist

import moe
from moe.dispatch import (
    DISPATCHERS,
    Dispatched,
    Dispatcher,
    ExpertPlacement,
    LocalDispatcher,
    build_dispatcher,
    register_dispatcher,
)
from moe.dispatch.expert_parallel import ExpertParallelDispatcher
from moe.model import ModelConfig
from moe.parallel import expert_parallel_layers, to_expert_parallel


@dataclass(frozen=True)
class OneHotState:
    pair_of_token: torch.Tensor  # (T, N) 0/1 matrix: pair n belongs to token t


class OneHotDispatcher(Dispatcher):
    """Permute and combine as products with a dense token-by-pair matrix (no gather, no scatter)."""

    def __init__(self, num_experts: int):
        super().__init__(ExpertPlacement(num_experts))

    def permute(self, x, routing):
        tokens = torch.arange(routing.num_tokens, device=x.device)
        pair_of_token = (tokens[:, None] == routing.token_index[None, :]).to(x.dtype)
        return Dispatched(
            rows=pair_of_token.t() @ x,
            tokens_per_expert=routing.tokens_per_expert,
            state=OneHotState(pair_of_token),
        )

    def combine(self, expert_out, dispatched, routing):
        return dispatched.state.pair_of_token @ (routing.weight.unsqueeze(-1).to(expert_out.dtype) * expert_out)


@pytest.fixture
def onehot_registered():
    register_dispatcher("onehot")(OneHotDispatcher)
    yield "onehot"
    del DISPATCHERS["onehot"]


def _outputs_and_grads(layer, x):
    x = x.clone().requires_grad_(True)
    out = layer(x)
    cotangent = torch.linspace(-1, 1, out.numel()).view_as(out)
    params = [p for _, p in layer.named_parameters()]
    grads = torch.autograd.grad((out * cotangent).sum() + moe.aux_loss(layer), [x, *params])
    return out, grads


@pytest.mark.parametrize("router_kwargs", [{"top_k": 2}, {"top_k": 1, "capacity_factor": 0.5}])
def test_a_registered_dispatcher_matches_the_local_one(onehot_registered, router_kwargs):
    assert isinstance(build_dispatcher("onehot", 4), OneHotDispatcher)
    torch.manual_seed(3)
    custom = moe.MoELayer(8, 16, 4, dispatcher=onehot_registered, **router_kwargs)
    local = moe.MoELayer(8, 16, 4, **router_kwargs)
    local.load_state_dict(custom.state_dict())
    assert isinstance(custom.dispatcher, OneHotDispatcher) and isinstance(local.dispatcher, LocalDispatcher)
    x = torch.randn(2, 9, 8)
    (got, got_grads), (want, want_grads) = _outputs_and_grads(custom, x), _outputs_and_grads(local, x)
    torch.testing.assert_close(got, want)
    names = ["x"] + [name for name, _ in local.named_parameters()]
    for name, g, w in zip(names, got_grads, want_grads):
        torch.testing.assert_close(g, w, msg=name)


def test_an_instance_is_accepted_when_it_is_placed_for_the_layers_experts():
    layer = moe.MoELayer(8, 16, 4, top_k=2, dispatcher=OneHotDispatcher(4))
    assert layer.placement == ExpertPlacement(4) and layer.experts.num_experts == 4
    with pytest.raises(ValueError, match="dispatcher is placed for num_experts=6; layer has num_experts=4"):
        moe.MoELayer(8, 16, 4, top_k=2, dispatcher=OneHotDispatcher(6))
    with pytest.raises(TypeError, match="dispatcher must be a name or a moe.dispatch.Dispatcher, got int"):
        moe.MoELayer(8, 16, 4, top_k=2, dispatcher=3)


class CountingExchange(ExpertParallelDispatcher):
    """The EP dispatcher, counting its permutes: a sibling that to_expert_parallel must build by name."""

    def __init__(self, ep_group, num_experts, local="local"):
        super().__init__(ep_group, num_experts, local)
        self.permutes = 0

    def permute(self, x, routing):
        self.permutes += 1
        return super().permute(x, routing)


def test_to_expert_parallel_builds_the_named_dispatcher(tmp_path):
    register_dispatcher("counting_exchange")(CountingExchange)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rdv'}", rank=0, world_size=1)
    try:
        full = moe.MoELayer(8, 16, 4, top_k=2)
        ep_layer = to_expert_parallel(copy.deepcopy(full), dist.group.WORLD, dispatcher="counting_exchange")
        assert isinstance(ep_layer.dispatcher, CountingExchange)
        assert ep_layer.placement == ExpertPlacement(4, 1, 0, dist.group.WORLD)
        assert [name for name, _ in expert_parallel_layers(ep_layer)] == [""]
        x = torch.randn(12, 8)
        torch.testing.assert_close(ep_layer(x), full(x))
        assert ep_layer.dispatcher.permutes == 1
    finally:
        dist.destroy_process_group()
        del DISPATCHERS["counting_exchange"]


def test_unknown_dispatcher_names_the_valid_ones():
    valid = r"\['expert_parallel', 'local', 'triton'\]"
    with pytest.raises(ValueError, match=rf"unknown dispatcher 'nope'; valid: {valid}"):
        build_dispatcher("nope", 4)
    with pytest.raises(ValueError, match=rf"unknown dispatcher 'nope'; valid: {valid}"):
        moe.MoELayer(8, 16, 4, top_k=2, dispatcher="nope")
    with pytest.raises(ValueError, match=r"unknown dispatcher 'expert_parallel'; valid: \['local', 'triton'\]"):
        ModelConfig(dispatcher="expert_parallel")


def test_register_dispatcher_refuses_a_non_dispatcher_and_a_taken_name():
    with pytest.raises(TypeError, match="needs a moe.dispatch.Dispatcher subclass"):
        register_dispatcher("plain")(object)
    with pytest.raises(ValueError, match="dispatcher name 'local' is already taken by LocalDispatcher"):
        register_dispatcher("local")(OneHotDispatcher)
    assert DISPATCHERS["local"] is LocalDispatcher and "plain" not in DISPATCHERS


def test_the_renamed_kernels_switch_names_the_dispatcher():
    with pytest.raises(ValueError, match="kernels=...\\) was renamed: use dispatcher='triton'"):
        moe.MoELayer(8, 16, 4, top_k=2, kernels=True)


@pytest.mark.parametrize("num_experts, ep_size", [(8, 1), (8, 2), (8, 4), (6, 3)])
def test_placement_partitions_the_experts_in_rank_order(num_experts, ep_size):
    placements = [ExpertPlacement(num_experts, ep_size, rank) for rank in range(ep_size)]
    held = [e for p in placements for e in p.local_experts]
    assert held == list(range(num_experts))  # every expert exactly once, rank 0's first
    for rank, p in enumerate(placements):
        assert p.num_local_experts == len(p.local_experts) == num_experts // ep_size
        assert p.local_experts.start == rank * num_experts // ep_size
        assert p.is_sharded == (ep_size > 1)


def test_placement_rejects_bad_values_and_is_frozen():
    with pytest.raises(ValueError, match="num_experts=6 must be divisible by the EP group size ep_size=4"):
        ExpertPlacement(6, 4)
    with pytest.raises(ValueError, match=r"ep_rank must be an int in \[0, ep_size=2\), got 2"):
        ExpertPlacement(4, 2, 2)
    with pytest.raises(ValueError, match="ep_size must be >= 1, got 0"):
        ExpertPlacement(4, 0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        ExpertPlacement(4).ep_rank = 1
