"""Peer MoE layers for the benchmark, each built when its package imports (they are never dependencies).

Every builder returns ``(module, step)`` where ``step(x)`` runs one forward and backward, or raises
``PeerUnavailable`` with the reason (not installed, failed to import or build).
"""

from __future__ import annotations

import os

import torch
from torch import nn


class PeerUnavailable(RuntimeError):
    """A peer layer could not be imported or built; the message says why."""


def _init_(params, std: float) -> None:
    with torch.no_grad():
        for p in params:
            p.normal_(0.0, std)


def torchtitan_moe(hidden: int, ffn: int, num_experts: int, top_k: int, dtype: torch.dtype):
    """torchtitan's ``MoE`` (SwiGLU grouped experts, softmax top-k with renormalised weights, no aux loss)."""
    try:
        from torchtitan.models.common.linear import Linear
        from torchtitan.models.common.moe import GroupedExperts, MoE, RoutedExperts, TokenChoiceTopKRouter
        from torchtitan.models.common.token_dispatcher import LocalTokenDispatcher
    except Exception as error:  # any import failure is a reason to record, not a crash
        raise PeerUnavailable(f"torchtitan import failed: {type(error).__name__}: {error}") from error
    config = MoE.Config(
        num_experts=num_experts,
        routed_experts=RoutedExperts.Config(
            inner_experts=GroupedExperts.Config(dim=hidden, hidden_dim=ffn, num_experts=num_experts),
            token_dispatcher=LocalTokenDispatcher.Config(num_experts=num_experts, top_k=top_k),
        ),
        router=TokenChoiceTopKRouter.Config(
            num_experts=num_experts,
            gate=Linear.Config(in_features=hidden, out_features=num_experts),
            top_k=top_k,
            score_func="softmax",
            route_norm=True,
        ),
        load_balance_coeff=None,
    )
    module = config.build().cuda()
    _init_(module.parameters(), 0.02)
    module = module.to(dtype).train()

    def step(x: torch.Tensor, grad: torch.Tensor) -> None:
        out = module(x.unsqueeze(0))
        out.backward(grad.unsqueeze(0))

    return module, step


def _ensure_single_process_group() -> None:
    import torch.distributed as dist

    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29517")
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("LOCAL_RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        dist.init_process_group("nccl", rank=0, world_size=1)


class _GeluMLP(nn.Module):
    def __init__(self, hidden: int, ffn: int):
        super().__init__()
        self.up = nn.Linear(hidden, ffn, bias=False)
        self.down = nn.Linear(ffn, hidden, bias=False)

    def forward(self, x):
        return self.down(nn.functional.gelu(self.up(x)))


def deepspeed_moe(hidden: int, ffn: int, num_experts: int, top_k: int, dtype: torch.dtype):
    """DeepSpeed's ``deepspeed.moe.layer.MoE``, dropless (``drop_tokens=False``), GELU MLP experts, one rank."""
    try:
        from deepspeed.moe.layer import MoE
    except Exception as error:
        raise PeerUnavailable(f"deepspeed import failed: {type(error).__name__}: {error}") from error
    _ensure_single_process_group()
    module = MoE(
        hidden_size=hidden,
        expert=_GeluMLP(hidden, ffn),
        num_experts=num_experts,
        ep_size=1,
        k=top_k,
        capacity_factor=1.0,
        eval_capacity_factor=1.0,
        min_capacity=0,
        drop_tokens=False,
        use_rts=False,
    )
    module = module.cuda().to(dtype).train()

    def step(x: torch.Tensor, grad: torch.Tensor) -> None:
        out, aux, _ = module(x)
        torch.autograd.backward([out, aux.float()], [grad, torch.ones_like(aux.float())])

    return module, step


def megablocks_dmoe(hidden: int, ffn: int, num_experts: int, top_k: int, dtype: torch.dtype):
    """megablocks' dropless ``dMoE`` with GELU MLP experts."""
    try:
        from megablocks.layers.arguments import Arguments
        from megablocks.layers.dmoe import dMoE
    except Exception as error:
        raise PeerUnavailable(
            f"megablocks import failed ({type(error).__name__}: {error}); not built for this run: 0.10.0, the newest, "
            "pins torch 2.7.0 and its CUDA extension failed to compile against CUDA 13 (DESIGN.md)"
        ) from error
    args = Arguments(
        hidden_size=hidden,
        ffn_hidden_size=ffn,
        moe_num_experts=num_experts,
        moe_top_k=top_k,
        mlp_impl="grouped",
        bf16=dtype == torch.bfloat16,
        fp16=False,
        device=torch.device("cuda"),
    )
    module = dMoE(args).train()

    def step(x: torch.Tensor, grad: torch.Tensor) -> None:
        out = module(x.unsqueeze(1))
        out = out[0] if isinstance(out, tuple) else out
        out.backward(grad.unsqueeze(1))

    return module, step


PEERS = {"torchtitan": torchtitan_moe, "deepspeed": deepspeed_moe, "megablocks": megablocks_dmoe}
