"""The router base class: a linear gate in float32."""

from __future__ import annotations

import inspect
import itertools
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import nn

from moe.routing import Routing
from moe.validation import check_expert_indices, check_positive_int


class NonFiniteLogitsError(ValueError, FloatingPointError):
    """Router logits contain NaN or inf; the message names the MoE layer."""


class Router(nn.Module):
    """Base class: ``forward(x: (T, H)) -> Routing``; the gate is a bias-free linear map to E logits.

    Logits are computed in float32 whatever the input dtype. Subclasses implement ``route``.
    Routers with per-step state (balancing biases, adaptive coefficients) override
    ``step_update``, which ``moe.update_routers`` calls once per optimizer step.

    What compression asks of a router: ``experts_per_token`` and ``min_experts`` (how few experts it
    can keep), ``keep_experts`` (restrict it to a subset of experts) and ``expert_grouping`` (the
    router that selects among the original experts of a merged layer, and the expert -> group map).
    """

    @classmethod
    def layer_kwargs(cls, name: str, kwargs: dict, top_k: int | None, vocab_size: int | None) -> dict:
        """This router's constructor arguments for a layer's ``top_k`` and vocabulary (``build_router`` asks).

        By default ``top_k`` goes to a constructor that takes it and is refused by one that does not;
        ``vocab_size`` (context, not a choice) goes only to a constructor that takes it. Routers whose
        ``top_k`` means something else override this (expert choice, BASE, hash).
        """
        params = inspect.signature(cls.__init__).parameters
        takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        kwargs = dict(kwargs)
        if top_k is not None:
            if "top_k" not in params and not takes_any:
                raise TypeError(f"router {name!r} takes no top_k; its arguments: {sorted(set(params) - {'self'})}")
            kwargs["top_k"] = top_k
        if vocab_size is not None and "vocab_size" in params:
            kwargs.setdefault("vocab_size", vocab_size)
        return kwargs

    def __init__(self, hidden_size: int, num_experts: int):
        super().__init__()
        self.hidden_size = check_positive_int("hidden_size", hidden_size)
        self.num_experts = check_positive_int("num_experts", num_experts)
        self.gate = nn.Linear(hidden_size, num_experts, bias=False)
        nn.init.normal_(self.gate.weight, std=hidden_size**-0.5)
        self.layer_name = "moe"  # set by the owning MoELayer so errors can name the layer

    def compute_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (T, E) in float32 (float64 for float64 input, so gradcheck sees exact maths).

        Raises on non-finite values (device-side assert on CUDA, no host sync).
        """
        dtype = torch.promote_types(x.dtype, torch.float32)
        with torch.autocast(x.device.type, enabled=False):  # autocast would run this linear in bf16
            logits = torch.nn.functional.linear(x.to(dtype), self.gate.weight.to(dtype))
        return self.check_finite(logits)

    def check_finite(self, logits: torch.Tensor) -> torch.Tensor:
        """``logits``, after raising if any is NaN or inf (device-side assert on CUDA, no host sync)."""
        finite = torch.isfinite(logits).all()
        if torch.compiler.is_compiling():
            # No layer name: Dynamo specialises on the string, so each layer would compile its own block graph.
            torch._assert_async(finite, "non-finite router logits (check the layer input and learning rate)")
            return logits
        message = f"non-finite router logits in layer '{self.layer_name}' (check the layer input and learning rate)"
        if logits.is_cuda:  # no host sync there
            torch._assert_async(finite, message)
        elif not bool(finite):
            raise NonFiniteLogitsError(message)
        return logits

    def forward(self, x: torch.Tensor, *, seq_len: int | None = None, token_ids: torch.Tensor | None = None) -> Routing:
        """Route tokens ``x`` (T, H); ``seq_len`` splits them into sequences, ``token_ids`` feed hash routing."""
        if x.dim() != 2 or x.shape[-1] != self.hidden_size:
            raise ValueError(f"router input must have shape (T, hidden_size={self.hidden_size}), got {tuple(x.shape)}")
        return self.route(x, seq_len=seq_len, token_ids=token_ids)

    def route(self, x: torch.Tensor, *, seq_len: int | None, token_ids: torch.Tensor | None) -> Routing:
        """The router's method: (T, H) tokens with a checked shape -> Routing."""
        raise NotImplementedError  # abstractmethod: every concrete router defines it

    def decoding_refusal(self) -> str | None:
        """Why routing tokens one at a time (incremental decoding, eval mode) would differ from routing the
        whole sequence at once, or None when it would not. The default router routes each token alone."""
        return None

    @torch.no_grad()
    def step_update(self, process_group: dist.ProcessGroup | None = None) -> None:
        """Per-optimizer-step state update; the default router has none."""

    @classmethod
    def update_group(cls, routers: list[Router], process_group: dist.ProcessGroup | None = None) -> None:
        """Update every router of this class once per optimizer step (classes may couple them)."""
        for router in routers:
            router.step_update(process_group)

    @property
    def experts_per_token(self) -> int | None:
        """Experts each token is routed to (k), or None when it varies by token."""
        return None

    @property
    def min_experts(self) -> int:
        """The fewest experts ``keep_experts`` accepts: ``experts_per_token``, or 1 when it varies."""
        return self.experts_per_token or 1

    def expert_grouping(self) -> tuple[Router, torch.Tensor]:
        """The router that selects among the original experts and the (E_original,) expert of each.

        A router selects its own experts: itself and the identity map (merged routers differ).
        """
        device = next(itertools.chain(self.parameters(), self.buffers())).device
        return self, torch.arange(self.num_experts, device=device)

    @torch.no_grad()
    def keep_experts(self, keep: Sequence[int]) -> None:
        """Restrict the router to the distinct expert ids ``keep``, in place; kept experts stay in id order.

        Slices every per-expert parameter and buffer (leading dimension E: the gate rows, balancing
        biases); 0-dim state (a per-layer coefficient) is kept. Any other state, or a nested router,
        raises: subclasses whose structure depends on E override this.
        """
        keep = check_expert_indices(keep, self.num_experts, f"layer '{self.layer_name}'")
        if len(keep) < self.min_experts:
            raise ValueError(
                f"layer '{self.layer_name}' routes top_k={self.min_experts} experts per token; it cannot keep only "
                f"{len(keep)} experts (keep at least {self.min_experts})"
            )
        states = []
        for module in self.modules():
            if isinstance(module, Router) and module is not self:
                raise ValueError(f"cannot slice nested router {type(module).__name__} inside {type(self).__name__}")
            own = list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False))
            for name, tensor in own:
                if tensor.dim() == 0:
                    continue
                if tensor.shape[0] != self.num_experts:
                    raise ValueError(
                        f"router state {type(module).__name__}.{name} has shape {tuple(tensor.shape)}: "
                        f"not per-expert (leading dim {self.num_experts}) and not a scalar, so it cannot be sliced"
                    )
                states.append((module, name, tensor))
        index = torch.tensor(keep, dtype=torch.int64)
        for module, name, tensor in states:
            sliced = tensor.detach()[index.to(tensor.device)].clone()
            if isinstance(tensor, nn.Parameter):
                setattr(module, name, nn.Parameter(sliced, requires_grad=tensor.requires_grad))
            else:
                module.register_buffer(name, sliced, persistent=name not in module._non_persistent_buffers_set)
        if self.gate is not None:
            self.gate.out_features = len(keep)
        self.num_experts = len(keep)

    def extra_repr(self) -> str:
        return f"hidden_size={self.hidden_size}, num_experts={self.num_experts}"


def all_reduce_if_distributed(tensor: torch.Tensor, process_group: dist.ProcessGroup | None) -> torch.Tensor:
    """Sum ``tensor`` over ``process_group`` in place when torch.distributed is initialised."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor, group=process_group)
    return tensor
