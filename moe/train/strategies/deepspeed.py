"""``trainer.strategy=deepspeed``: DeepSpeed ZeRO stage 1 or 2, combined with expert parallelism.

The DeepSpeed engine owns the backward pass, gradient reduction, accumulation, clipping and the optimizer
step; the loop calls it through the ``Strategy`` interface. With ``parallel.ep_size = P > 1``:

- each expert parameter is marked as DeepSpeed marks its own MoE parameters (``allreduce = False``,
  ``group_name = "ep_size_P"``), the optimizer's parameter groups are split with DeepSpeed's
  ``split_params_into_different_moe_groups_for_optimizer`` (expert groups carry ``moe=True``), and
  DeepSpeed's expert-data-parallel groups are created (and checked to equal ``moe.parallel``'s);
- ZeRO shards the dense optimizer state (and, at stage 2, the gradients) over the world and the expert
  optimizer state over the expert-data-parallel group. It divides every gradient by the world size and
  sums expert gradients over the expert-data-parallel group only: the rule of
  ``moe.parallel.all_reduce_gradients`` (tests compare the loss curve with DDP to 1e-4);
- the global gradient norm sums dense partitions over the world and expert partitions over the world
  (each expert once), the norm ``moe.parallel.clip_grad_norm_`` uses. ZeRO checks that norm before it
  updates anything and skips a step whose norm is not finite; ``step`` then raises ``NonFiniteGradientError``.

DeepSpeed only recognises its own MoE layers, so the engine here is a ``DeepSpeedEngine`` subclass that
declares the model's MoE layers. Precision stays the trainer's: fp32 master weights in ZeRO's fp32 mode,
bf16 through ``torch.autocast`` when ``trainer.precision`` asks for it (DeepSpeed's fp16/bf16 modes are not
used). Checkpoints keep the layout-independent format: the single-process model and ``torch.optim``'s AdamW
state at full parameter shapes, so they resume under ``ddp``, ``fsdp`` or ``deepspeed`` with any ``ep_size``.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from torch import nn

from moe.parallel import (
    expert_data_group_ranks,
    expert_parallel_layers,
    expert_parameters,
    gather_expert_tensor,
)
from moe.train.strategies.base import NonFiniteGradientError, Strategy

ZERO_STAGES = (1, 2)
ADAM_STATE_KEYS = ("exp_avg", "exp_avg_sq")
HYPERPARAMETERS = ("lr", "betas", "eps", "weight_decay")


def import_deepspeed():
    """Import DeepSpeed, or raise ImportError saying how to install it."""
    try:
        import deepspeed
    except ImportError as error:
        raise ImportError(
            "trainer.strategy=deepspeed needs DeepSpeed: pip install 'moe[deepspeed]' "
            "(on a machine without CUDA: DS_BUILD_OPS=0 pip install deepspeed)"
        ) from error
    return deepspeed


def _engine_class(num_experts: list[int]):
    """A ``DeepSpeedEngine`` that treats the model as an MoE model when ``num_experts`` is not empty.

    DeepSpeed decides whether to use its expert-data-parallel machinery from ``isinstance(module, MoE)``
    checks on its own layer class; this subclass declares ours instead, right after the model is attached
    (before DeepSpeed broadcasts parameters and builds the ZeRO optimizer).
    """
    from deepspeed.runtime.engine import DeepSpeedEngine

    class ExpertParallelEngine(DeepSpeedEngine):
        def _set_client_model(self, model):
            super()._set_client_model(model)
            if num_experts:
                self.has_moe_layers = True
                self.num_experts = list(num_experts)

    return ExpertParallelEngine


class DeepSpeedStrategy(Strategy):
    """ZeRO stage 1 or 2 over all ranks, with experts sharded over EP groups when ``ep_size > 1``.

    Needs at least two processes (under torchrun). ``micro_batch_size`` (sequences per rank and
    micro-batch), ``grad_accum`` and ``grad_clip`` (0 = no clipping) go into the DeepSpeed config.
    """

    name = "deepspeed"

    def __init__(
        self,
        ep_size: int,
        world_size: int,
        device: torch.device,
        *,
        zero_stage: int,
        micro_batch_size: int,
        grad_accum: int,
        grad_clip: float,
    ):
        if isinstance(zero_stage, bool) or zero_stage not in ZERO_STAGES:
            raise ValueError(f"trainer.zero_stage={zero_stage!r} is not valid; valid: {list(ZERO_STAGES)}")
        if world_size < 2:
            raise ValueError(
                f"trainer.strategy=deepspeed needs at least 2 processes (torchrun), got world size "
                f"{world_size}; with one process use trainer.strategy=ddp"
            )
        import_deepspeed()
        super().__init__(ep_size, world_size, device)
        self.zero_stage = zero_stage
        self.micro_batch_size = micro_batch_size
        self.grad_accum = grad_accum
        self.grad_clip = grad_clip
        self.engine = None
        self._group_sources: list[int] = []

    @classmethod
    def from_config(cls, cfg, world_size: int, device: torch.device) -> DeepSpeedStrategy:
        return cls(
            cfg.parallel.ep_size,
            world_size,
            device,
            zero_stage=cfg.trainer.zero_stage,
            micro_batch_size=cfg.data.batch_size,
            grad_accum=cfg.trainer.grad_accum,
            grad_clip=cfg.optim.grad_clip,
        )

    @property
    def group_name(self) -> str:
        """DeepSpeed's name for the expert-data-parallel group of this ``ep_size``."""
        return f"ep_size_{self.ep_size}"

    def prepare(self, model: nn.Module) -> nn.Module:
        """Shard the experts (``ep_size > 1``) and mark them as DeepSpeed MoE parameters of ``group_name``."""
        model = super().prepare(model)
        if self.groups is not None:
            for param in expert_parameters(model):
                param.allreduce = False
                param.group_name = self.group_name
        return model

    def wrap(self, model: nn.Module) -> nn.Module:
        """Nothing yet: the engine needs the optimizer (``attach_optimizer``)."""
        return model

    def _create_deepspeed_groups(self) -> None:
        """DeepSpeed's expert and expert-data-parallel groups; fails unless they equal ``moe.parallel``'s."""
        from deepspeed.utils import groups

        if self.group_name not in groups._get_expert_data_parallel_group_dict():
            groups._create_expert_and_data_parallel(self.ep_size)
        theirs = sorted(groups._get_expert_data_parallel_group_ranks(self.group_name))
        rank = dist.get_rank()
        ours = next(r for r in expert_data_group_ranks(self.world_size, self.ep_size) if rank in r)
        if theirs != sorted(ours):
            raise RuntimeError(
                f"DeepSpeed's expert-data-parallel group {theirs} differs from moe.parallel's {ours} "
                f"on rank {rank} (world size {self.world_size}, ep_size {self.ep_size})"
            )

    def deepspeed_config(self) -> dict:
        """The DeepSpeed config this strategy runs with (ZeRO stage, batch sizes, clipping; fp32 optimizer)."""
        return {
            "train_micro_batch_size_per_gpu": self.micro_batch_size,
            "gradient_accumulation_steps": self.grad_accum,
            "gradient_clipping": float(self.grad_clip),
            "zero_optimization": {"stage": self.zero_stage, "contiguous_gradients": True, "reduce_scatter": True},
            "steps_per_print": 2**31 - 1,
        }

    def attach_optimizer(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> nn.Module:
        """Build the DeepSpeed engine and return it (the module the loop calls).

        ``optimizer`` (the trainer's AdamW, never stepped here) keeps the parameter order and
        hyper-parameters of the checkpoint format and receives the LR schedule; the engine steps a copy
        of it whose groups are split into dense and expert groups (``step`` copies the hyper-parameters
        over). Collective.
        """
        import deepspeed
        from deepspeed.moe.utils import (
            split_params_into_different_moe_groups_for_optimizer,
        )
        from deepspeed.runtime.config import DeepSpeedConfig

        if not isinstance(optimizer, torch.optim.AdamW):
            raise TypeError(f"trainer.strategy=deepspeed supports torch.optim.AdamW, got {type(optimizer).__name__}")
        deepspeed.init_distributed(
            dist_backend="nccl" if self.device.type == "cuda" else "gloo", dist_init_required=False
        )
        if self.groups is not None:
            self._create_deepspeed_groups()
        groups = [{**g, "params": list(g["params"]), "name": f"group{i}"} for i, g in enumerate(optimizer.param_groups)]
        canonical_of = {id(p): i for i, g in enumerate(optimizer.param_groups) for p in g["params"]}
        if self.groups is not None:
            groups = split_params_into_different_moe_groups_for_optimizer(groups)
        # The dense groups keep their order; DeepSpeed appends the expert groups, each from one source group.
        self._group_sources = [
            i if i < len(optimizer.param_groups) else canonical_of[id(g["params"][0])] for i, g in enumerate(groups)
        ]
        defaults = optimizer.defaults
        inner = torch.optim.AdamW(
            groups,
            lr=defaults["lr"],
            betas=defaults["betas"],
            eps=defaults["eps"],
            weight_decay=defaults["weight_decay"],
            amsgrad=defaults["amsgrad"],
        )
        config = self.deepspeed_config()
        num_experts = [layer.num_experts for _, layer in expert_parallel_layers(model)]
        engine_class = _engine_class(num_experts)
        self.engine = engine_class(
            args=None,
            model=model,
            optimizer=inner,
            config=config,
            config_class=DeepSpeedConfig(config, None),
            dist_init_required=False,
        )
        return self.engine

    def accumulate(self, model: nn.Module, last_micro: bool):
        """Tell the engine whether this micro-batch ends the optimizer step (it reduces accordingly)."""
        self.engine.set_gradient_accumulation_boundary(last_micro)
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        """``engine.backward`` on a loss the loop has already divided by the number of micro-batches."""
        self.engine.backward(loss, scale_wrt_gas=False)

    def step(self, optimizer: torch.optim.Optimizer, max_norm: float) -> torch.Tensor:
        """``engine.step()`` with ``optimizer``'s hyper-parameters (the schedule writes them there): ZeRO
        reduced the gradients in backward; the engine computes the global norm, skips the update when it is
        not finite (checked before any weight changes) and otherwise clips and applies it. Raises
        ``NonFiniteGradientError`` after a skipped step. ``max_norm`` must be the configured clip."""
        configured = self.grad_clip if self.grad_clip > 0 else float("inf")
        if max_norm != configured:
            raise ValueError(f"max_norm={max_norm} differs from the engine's gradient_clipping={self.grad_clip}")
        for group, source in zip(self.engine.optimizer.param_groups, self._group_sources):
            for key in HYPERPARAMETERS:
                group[key] = optimizer.param_groups[source][key]
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        if norm is None or not torch.isfinite(torch.as_tensor(norm)):
            raise NonFiniteGradientError(float("inf") if norm is None else float(norm))
        return torch.as_tensor(norm, dtype=torch.float32).reshape(())

    def load_model_state(self, model: nn.Module, state: dict) -> None:
        """Load a state dict saved by any layout, then refresh ZeRO's fp32 master partitions from it."""
        super().load_model_state(model, state)
        self.engine.optimizer.refresh_fp32_params()

    def _experts_by_param(self, model: nn.Module) -> dict[int, object]:
        return {
            id(p): layer.placement for _, layer in expert_parallel_layers(model) for p in layer.experts.parameters()
        }

    def _inner_state(self) -> dict:
        return self.engine.optimizer.optimizer.state

    def _link_optimizer_state(self) -> None:
        """Point every parameter's ZeRO fragment at its group's AdamW state.

        DeepSpeed 0.19.8 links the fragments once, right after the first group's first step, when the
        later groups (here the no-decay and expert groups) have no state yet, and never again; their
        ``safe_get/set_full_optimizer_state`` would then fail. Linking again once every group has state fixes it.
        """
        zero = self.engine.optimizer
        zero._hp_optimizer_states_linked = False
        zero._lazy_init_hp_params_optimizer_state()

    def optimizer_state(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
        """AdamW's state in ``torch.optim`` format at full parameter shapes, in ``optimizer``'s parameter order.

        Collective: one all-reduce per parameter and moment over its ZeRO partition group, plus an
        all-gather over the EP group for expert tensors.
        """
        from deepspeed.utils import safe_get_full_optimizer_state

        param_groups = optimizer.state_dict()["param_groups"]
        inner = self._inner_state()
        if not inner:
            return {"state": {}, "param_groups": param_groups}
        step = next(iter(inner.values()))["step"]
        self._link_optimizer_state()
        experts = self._experts_by_param(model)
        state = {}
        for index, param in enumerate(p for g in optimizer.param_groups for p in g["params"]):
            entry = {"step": step.detach().clone()}
            for key in ADAM_STATE_KEYS:
                value = safe_get_full_optimizer_state(param, key)
                placement = experts.get(id(param))
                entry[key] = value if placement is None else gather_expert_tensor(value, placement.ep_group)
            state[index] = entry
        return {"state": state, "param_groups": param_groups}

    def load_optimizer_state(self, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
        """Load an optimizer state saved by any layout into ZeRO's partitions (and hyper-parameters into
        ``optimizer``, which the schedule drives)."""
        from deepspeed.utils import safe_set_full_optimizer_state

        params = [p for g in optimizer.param_groups for p in g["params"]]
        optimizer.load_state_dict({"state": {}, "param_groups": state["param_groups"]})
        if not state["state"]:
            return
        if sorted(state["state"]) != list(range(len(params))):
            raise ValueError(
                f"optimizer state covers parameters {sorted(state['state'])[:8]}...; this model has "
                f"{len(params)} parameters, all of which need a state"
            )
        zero = self.engine.optimizer
        step = next(iter(state["state"].values()))["step"]
        inner = self._inner_state()
        for flat in zero.single_partition_of_fp32_groups:
            inner[flat] = {
                "step": torch.as_tensor(step, dtype=torch.float32).clone(),
                **{key: torch.zeros_like(flat) for key in ADAM_STATE_KEYS},
            }
        self._link_optimizer_state()
        experts = self._experts_by_param(model)
        for index, param in enumerate(params):
            placement = experts.get(id(param))
            for key in ADAM_STATE_KEYS:
                value = state["state"][index][key].to(param.device)
                if placement is not None:
                    if value.shape[0] != placement.num_experts:
                        raise ValueError(
                            f"optimizer state {key} of parameter {index} has {value.shape[0]} experts, "
                            f"the layer has {placement.num_experts}"
                        )
                    value = value[placement.local_experts.start : placement.local_experts.stop]
                if value.shape != param.shape:
                    raise ValueError(
                        f"optimizer state {key} of parameter {index} has shape {tuple(value.shape)}, "
                        f"the parameter {tuple(param.shape)}"
                    )
                safe_set_full_optimizer_state(param, value, key)
