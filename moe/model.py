"""A GPT-style decoder whose feed-forward blocks are ``moe.MoELayer`` (every n-th layer) or dense MLPs.

Pre-norm blocks: ``x + attn(rmsnorm(x))`` then ``x + ffn(rmsnorm(x))``; rotary positions on queries and
keys; causal ``F.scaled_dot_product_attention``; optional weight tying of the token embedding and the
output head. Token ids reach the MoE layers, so token-keyed routers (hash routing) work.
"""

import dataclasses
import functools
import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from moe.dispatch import DISPATCHERS
from moe.experts import ACTIVATIONS, EXPERT_IMPLEMENTATIONS, DenseMLP, ExpertMLP
from moe.kv_cache import KVCache
from moe.layer import MoELayer, moe_layers, name_moe_layers
from moe.routers import ROUTERS, router_names
from moe.validation import ConfigValueError, check_choice, check_in_range, check_int_at_least

INIT_STD = 0.02


def model_dispatchers() -> list[str]:
    """Dispatcher names a ``ModelConfig`` can give: the registered ones except "expert_parallel", which
    ``moe.parallel.to_expert_parallel`` applies to a built model."""
    return sorted(set(DISPATCHERS) - {"expert_parallel"})


@dataclass
class ModelShape:
    """The decoder's shape: every field of a ``GPT`` except its vocabulary and parts (see ``ModelConfig``).

    ``moe_every``: 1 = an MoE feed-forward in every layer, n = in layers n, 2n, ... (1-based), 0 = dense
    model (no MoE layer). ``shared_experts``: always-on experts of width ``ffn_hidden_size`` each.
    ``moe-train``'s ``model`` config group is this dataclass; its checks raise ``ConfigValueError``,
    so the trainer reports them under ``model.``.
    """

    seq_len: int = 128
    num_layers: int = 4
    hidden_size: int = 128
    num_heads: int = 4
    ffn_hidden_size: int = 256
    num_experts: int = 4
    top_k: int = 2
    moe_every: int = 1
    shared_experts: int = 0
    activation: str = "swiglu"
    tie_embeddings: bool = True
    dropout: float = 0.0
    rope_base: float = 10000.0

    def __post_init__(self):
        for name in ("seq_len", "num_layers", "hidden_size", "num_heads", "ffn_hidden_size", "num_experts", "top_k"):
            check_int_at_least(name, getattr(self, name), 1)
        for name in ("moe_every", "shared_experts"):
            check_int_at_least(name, getattr(self, name), 0)
        hidden, heads, experts, top_k = self.hidden_size, self.num_heads, self.num_experts, self.top_k
        if hidden % heads:
            raise ConfigValueError(lambda p: f"{p}hidden_size={hidden} must be divisible by {p}num_heads={heads}")
        if (hidden // heads) % 2:
            raise ConfigValueError(
                lambda p: f"head size {p}hidden_size/{p}num_heads={hidden // heads} must be even (rotary pairs)"
            )
        if top_k > experts:
            raise ConfigValueError(
                lambda p: (
                    f"{p}top_k={top_k} is not valid: {p}top_k must be in [1, {p}num_experts={experts}], got {top_k}"
                )
            )
        check_choice("activation", self.activation, ACTIVATIONS)
        check_in_range("dropout", self.dropout, 0.0, 1.0, include_high=False)
        if not (isinstance(self.rope_base, (int, float)) and self.rope_base > 1):
            rope_base = self.rope_base
            raise ConfigValueError(lambda p: f"{p}rope_base={rope_base!r} is not valid; it must be a number > 1")


@dataclass
class ModelConfig(ModelShape):
    """Shape and parts of a ``GPT``: a ``ModelShape`` plus the vocabulary, router, experts and dispatcher.

    ``router`` names an entry of ``moe.routers.ROUTERS``, built with ``router_kwargs`` plus ``top_k`` and
    ``vocab_size``, which each router maps to its own arguments (``moe.routers.Router.layer_kwargs``).
    ``experts`` names an entry of ``moe.experts.EXPERT_IMPLEMENTATIONS``; ``dispatcher`` names an entry of
    ``moe.dispatch.DISPATCHERS`` built for the layer's experts: "local" (pure torch) or "triton" (the Triton
    permute/combine and top-k selection of ``moe.kernels``, on CUDA); expert parallelism is applied
    afterwards by ``moe.parallel.to_expert_parallel``.
    """

    vocab_size: int = 256
    router: str = "topk"
    router_kwargs: dict[str, Any] = field(default_factory=dict)
    experts: str = "grouped"
    dispatcher: str = "local"

    def __post_init__(self):
        super().__post_init__()
        check_int_at_least("vocab_size", self.vocab_size, 1)
        if self.router not in ROUTERS:
            raise ValueError(f"unknown router {self.router!r}; valid: {router_names()}")
        if self.experts not in EXPERT_IMPLEMENTATIONS:
            raise ValueError(f"unknown experts {self.experts!r}; valid: {sorted(EXPERT_IMPLEMENTATIONS)}")
        if self.dispatcher not in model_dispatchers():
            raise ValueError(
                f"unknown dispatcher {self.dispatcher!r}; valid: {model_dispatchers()} "
                "(expert parallelism: build with 'local', then moe.parallel.to_expert_parallel)"
            )
        if "top_k" in self.router_kwargs:
            raise ValueError(f"give top_k as ModelConfig.top_k, not in router_kwargs={self.router_kwargs}")

    @classmethod
    def from_shape(cls, shape: ModelShape, **parts) -> "ModelConfig":
        """The config of ``shape`` with ``parts`` (vocab_size, router, router_kwargs, experts, dispatcher)."""
        return cls(**{f.name: getattr(shape, f.name) for f in dataclasses.fields(ModelShape)}, **parts)

    def is_moe_layer(self, index: int) -> bool:
        """Whether layer ``index`` (0-based) has an MoE feed-forward."""
        return self.moe_every > 0 and (index + 1) % self.moe_every == 0


def dense_baseline_config(cfg: ModelConfig) -> ModelConfig:
    """The dense model with the same active parameters per token as the MoE config ``cfg``.

    Every MoE feed-forward of ``top_k`` experts (plus ``shared_experts``) of width ``ffn_hidden_size``
    becomes one dense MLP of width ``(top_k + shared_experts) * ffn_hidden_size``; the count then matches
    ``GPT(cfg).num_active_params()`` except for the routers' gates (H x E per MoE layer). Needs every
    layer to be MoE (``moe_every=1``), since a ``ModelConfig`` has one feed-forward width; a dense
    ``cfg`` (``moe_every=0``) is returned unchanged.
    """
    if cfg.moe_every == 0:
        return dataclasses.replace(cfg)
    if cfg.moe_every != 1:
        raise ValueError(
            f"a dense baseline needs moe_every=1 (dense layers of an MoE model with moe_every={cfg.moe_every} "
            f"have a different width from its MoE layers, which one ffn_hidden_size cannot express)"
        )
    width = (cfg.top_k + cfg.shared_experts) * cfg.ffn_hidden_size
    return dataclasses.replace(cfg, moe_every=0, ffn_hidden_size=width, num_experts=1, top_k=1, shared_experts=0)


def rotary_tables(seq_len: int, head_size: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables (seq_len, head_size / 2) of the rotary angles ``pos * base^(-2i / head_size)``."""
    inv_freq = base ** (-torch.arange(0, head_size, 2, dtype=torch.float64) / head_size)
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float64), inv_freq)
    return angles.cos().float(), angles.sin().float()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the pairs (x[..., i], x[..., i + D/2]) of ``x`` (B, T, heads, D) by the position's angles."""
    first, second = x.float().chunk(2, dim=-1)
    cos, sin = cos[:, None, :], sin[:, None, :]
    rotated = torch.cat([first * cos - second * sin, first * sin + second * cos], dim=-1)
    return rotated.to(x.dtype)


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with rotary positions (``F.scaled_dot_product_attention``)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.head_size = cfg.hidden_size // cfg.num_heads
        self.dropout = cfg.dropout
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size, bias=False)
        self.proj = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv=None) -> torch.Tensor:
        """``cos``/``sin`` are the tables at x's positions; ``kv(k, v) -> (all keys, all values)`` adds a cache."""
        batch, length, hidden = x.shape
        q, k, v = self.qkv(x).view(batch, length, 3, self.num_heads, self.head_size).unbind(2)
        q, k = apply_rotary(q, cos, sin).transpose(1, 2), apply_rotary(k, cos, sin).transpose(1, 2)
        v = v.transpose(1, 2)
        mask, causal = None, True
        if kv is not None:
            k, v = kv(k, v)
            past = k.shape[2] - length
            if past > 0:  # is_causal aligns the mask top-left; after a cache it must end at the last key
                causal = False
                if length > 1:
                    keys = torch.arange(k.shape[2], device=x.device)
                    mask = keys <= past + torch.arange(length, device=x.device)[:, None]
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal, dropout_p=self.dropout if self.training else 0.0
        )
        return self.proj(y.transpose(1, 2).reshape(batch, length, hidden))


class Block(nn.Module):
    """One pre-norm decoder layer: attention, then an MoE or dense feed-forward, each residual."""

    def __init__(self, cfg: ModelConfig, use_moe: bool):
        super().__init__()
        self.attn_norm = nn.RMSNorm(cfg.hidden_size, eps=1e-6)
        self.attn = CausalSelfAttention(cfg)
        self.ffn_norm = nn.RMSNorm(cfg.hidden_size, eps=1e-6)
        self.use_moe = use_moe
        if use_moe:
            self.ffn = MoELayer(
                cfg.hidden_size,
                cfg.ffn_hidden_size,
                cfg.num_experts,
                router=cfg.router,
                activation=cfg.activation,
                experts=cfg.experts,
                shared_experts=cfg.shared_experts,
                dispatcher=cfg.dispatcher,
                top_k=cfg.top_k,
                **{"vocab_size": cfg.vocab_size, **cfg.router_kwargs},
            )
        else:
            self.ffn = DenseMLP(cfg.hidden_size, cfg.ffn_hidden_size, cfg.activation)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, cos, sin, token_ids, kv=None):
        x = x + self.drop(self.attn(self.attn_norm(x), cos, sin, kv))
        h = self.ffn_norm(x)
        h = self.ffn(h, token_ids=token_ids) if self.use_moe else self.ffn(h)
        return x + self.drop(h)


def _per_expert(layer: MoELayer) -> int:
    """Parameters of one routed expert of ``layer`` (all experts have the same shape)."""
    return sum(p.numel() for p in layer.experts.parameters()) // layer.experts.num_experts


class GPT(nn.Module):
    """Decoder-only language model; ``forward(idx, targets=None, cache=None) -> (logits, loss)``.

    ``idx`` (B, T) int64 with T <= ``cfg.seq_len``; logits (B, T, vocab_size); loss is the mean
    next-token cross-entropy in nats (task loss only: add ``moe.aux_loss(model)`` to train), or None
    without targets.

    Initialisation: weights ~ N(0, 0.02); the projections that write into the residual stream
    (attention output, MLP / expert ``w_out``) ~ N(0, 0.02 / sqrt(2 * num_layers)) so the residual
    variance does not grow with depth; router gates keep their router's own initialisation.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.blocks = nn.ModuleList(Block(cfg, cfg.is_moe_layer(i)) for i in range(cfg.num_layers))
        self.norm = nn.RMSNorm(cfg.hidden_size, eps=1e-6)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        cos, sin = rotary_tables(cfg.seq_len, cfg.hidden_size // cfg.num_heads, cfg.rope_base)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()
        name_moe_layers(self)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """(Re)initialise every weight as described in the class docstring."""
        residual_std = INIT_STD / math.sqrt(2 * self.cfg.num_layers)
        nn.init.normal_(self.embed.weight, std=INIT_STD)
        if not self.cfg.tie_embeddings:
            nn.init.normal_(self.lm_head.weight, std=INIT_STD)
        for module in self.modules():
            if isinstance(module, nn.RMSNorm):
                nn.init.ones_(module.weight)
            elif isinstance(module, CausalSelfAttention):
                nn.init.normal_(module.qkv.weight, std=INIT_STD)
                nn.init.normal_(module.proj.weight, std=residual_std)
            elif isinstance(module, DenseMLP):
                nn.init.normal_(module.w_in.weight, std=INIT_STD)
                nn.init.normal_(module.w_out.weight, std=residual_std)
            elif isinstance(module, ExpertMLP):
                nn.init.normal_(module.w_in, std=INIT_STD)
                nn.init.normal_(module.w_out, std=residual_std)

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None, cache: KVCache | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """With a ``moe.kv_cache.KVCache``, ``idx`` continues the cached tokens (see ``moe.generate``)."""
        if idx.dim() != 2 or idx.dtype != torch.long:
            raise ValueError(f"idx must be an int64 tensor (batch, seq), got {idx.dtype} of shape {tuple(idx.shape)}")
        length = idx.shape[1]
        if length > self.cfg.seq_len:
            raise ValueError(f"sequence length {length} exceeds the model's seq_len={self.cfg.seq_len}")
        if targets is not None and targets.shape != idx.shape:
            raise ValueError(f"targets shape {tuple(targets.shape)} differs from idx shape {tuple(idx.shape)}")
        start = 0
        if cache is not None:
            cache.check_room(length)
            start = cache.length
        x = self.embed(idx)
        cos, sin = self.rope_cos[start : start + length], self.rope_sin[start : start + length]
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, idx, None if cache is None else functools.partial(cache.update, i))
        if cache is not None:
            cache.advance(length)
        logits = self.lm_head(self.norm(x))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.reshape(-1))
        return logits, loss

    def num_params(self) -> int:
        """Number of parameters of the whole model (a tied embedding counted once), also under expert
        parallelism, where this process holds only its share of each MoE layer's experts."""
        held = sum(p.numel() for p in self.parameters())
        return held + sum((layer.num_experts - layer.experts.num_experts) * _per_expert(layer) for layer in self._moe())

    def num_active_params(self, experts_per_token: float | None = None) -> int:
        """Parameters used per token: everything except the experts a token skips.

        Each MoE layer counts ``experts_per_token`` of its ``num_experts`` experts: by default
        ``cfg.top_k``; routers with a variable number per token (expert choice, top-p, null experts,
        ReLU) should pass the measured average (``RoutingStats.experts_per_token``; rounded to the
        nearest parameter). Routers, shared experts, attention, norms and embeddings count in full.
        Independent of expert parallelism.
        """
        used = self.cfg.top_k if experts_per_token is None else experts_per_token
        if experts_per_token is not None and not 0 <= experts_per_token <= self.cfg.num_experts:
            raise ValueError(
                f"experts_per_token must be in [0, num_experts={self.cfg.num_experts}], got {experts_per_token}"
            )
        inactive = sum((layer.num_experts - used) * _per_expert(layer) for layer in self._moe())
        return self.num_params() - round(inactive)

    def _moe(self) -> list[MoELayer]:
        return [layer for _, layer in moe_layers(self)]

    def flops_per_token(self, experts_per_token: float | None = None) -> int:
        """Training FLOPs per token (forward + backward): ``6 * N + 12 * L * H * seq_len``.

        ``N`` = active parameters that take part in a matmul: ``num_active_params()`` less the input
        embedding table when it is not tied (a lookup, no FLOPs) and the norm weights; the output head's V x H
        matmul counts whether tied or not. ``12 * L * H * seq_len`` is attention's QK^T and AV matmuls (2 * 2 * H * T
        forward per layer, times 3 for forward + backward) over a full ``seq_len`` context, the usual
        convention (PaLM, nanoGPT); causal masking could halve it. Norms, softmax and rotary are ignored.
        ``experts_per_token``: as in ``num_active_params``.
        """
        matmul_params = self.num_active_params(experts_per_token)
        matmul_params -= sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.RMSNorm))
        if not self.cfg.tie_embeddings:
            matmul_params -= self.embed.weight.numel()
        cfg = self.cfg
        return 6 * matmul_params + 12 * cfg.num_layers * cfg.hidden_size * cfg.seq_len
