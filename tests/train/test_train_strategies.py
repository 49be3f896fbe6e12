"""moe.train.strategies: the registry, and ``Strategy.step`` on one process (clip, non-finite check, update)."""

import copy

import pytest
import torch
from torch import nn

from moe.train.strategies import STRATEGIES, NonFiniteGradientError, Strategy, strategy_class


def _model_with_grads(scale: float) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    for param in model.parameters():
        param.grad = torch.randn_like(param) * scale
    return model


def test_registry_lists_every_strategy_by_its_name():
    assert list(STRATEGIES) == ["ddp", "fsdp", "deepspeed"]
    for name, cls in STRATEGIES.items():
        assert issubclass(cls, Strategy) and cls.name == name and strategy_class(name) is cls


@pytest.mark.parametrize("name", ["ddp", "fsdp"])
def test_one_process_step_clips_by_the_global_norm_then_updates(name):
    model = _model_with_grads(10.0)
    reference = copy.deepcopy(model)
    for ref, param in zip(reference.parameters(), model.parameters()):
        ref.grad = param.grad.clone()
    strategy = strategy_class(name)(1, 1, torch.device("cpu"))
    strategy.prepare(model)
    grad_norm = strategy.step(torch.optim.SGD(model.parameters(), lr=0.1), max_norm=1.0)

    grads = [p.grad for p in reference.parameters()]
    expected_norm = torch.cat([g.flatten() for g in grads]).norm()
    assert float(grad_norm) == pytest.approx(float(expected_norm), rel=1e-6)
    with torch.no_grad():
        for param in reference.parameters():
            param -= 0.1 * param.grad * (1.0 / (float(expected_norm) + 1e-6))
    for got, want in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(got, want)


def test_a_non_finite_gradient_never_reaches_the_weights():
    model = _model_with_grads(1.0)
    next(model.parameters()).grad[0, 0] = float("nan")
    before = copy.deepcopy(model.state_dict())
    strategy = strategy_class("ddp")(1, 1, torch.device("cpu"))
    strategy.prepare(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    with pytest.raises(NonFiniteGradientError, match="the update was not applied"):
        strategy.step(optimizer, max_norm=float("inf"))
    assert not optimizer.state
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
