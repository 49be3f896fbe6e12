"""A GPT-style decoder whose feed-forward blocks are ``moe.MoELayer`` (every n-th layer) or dense MLPs.

Pre-norm blocks: ``x + attn(rmsnorm(x))`` then ``x + ffn(rmsnorm(x))``; rotary positions on queries and
keys; causal ``F.scaled_dot_product_attention``; optional weight tying of the token embedding and the
output head. Token ids reach the MoE layers, so token-keyed routers (hash routing) work.
"""

import dataclasses
import inspect
import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from moe.experts import ACTIVATIONS, EXPERT_IMPLEMENTATIONS, DenseMLP, ExpertMLP
from moe.layer import MoELayer, moe_layers, name_moe_layers
from moe.routers import ROUTERS

INIT_STD = 0.02


def _check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


@dataclass
class ModelConfig:
    """Shape and parts of a ``GPT``.

    ``moe_every``: 1 = an MoE feed-forward in every layer, n = in layers n, 2n, ... (1-based), 0 = dense
    model (no MoE layer). ``shared_experts``: always-on experts of width ``ffn_hidden_size`` each.
    ``router`` names an entry of ``moe.routers.ROUTERS``, built with ``router_kwargs`` plus ``top_k`` and
    ``vocab_size`` when the router's constructor takes them. ``experts`` names an entry of
    ``moe.experts.EXPERT_IMPLEMENTATIONS``; ``kernels`` selects the Triton permute/combine
    (and fused top-k router) of ``moe.kernels`` on CUDA.
    """

    vocab_size: int = 256
    seq_len: int = 128
    num_layers: int = 4
    hidden_size: int = 128
    num_heads: int = 4
    ffn_hidden_size: int = 256
    num_experts: int = 8
    top_k: int = 2
    moe_every: int = 1
    shared_experts: int = 0
    router: str = "topk"
    router_kwargs: dict[str, Any] = field(default_factory=dict)
    experts: str = "grouped"
    kernels: bool = False
    activation: str = "swiglu"
    tie_embeddings: bool = True
    dropout: float = 0.0
    rope_base: float = 10000.0

    def __post_init__(self):
        for name in ("vocab_size", "seq_len", "num_layers", "hidden_size", "num_heads", "ffn_hidden_size"):
            _check_int(name, getattr(self, name), 1)
        for name in ("num_experts", "top_k"):
            _check_int(name, getattr(self, name), 1)
        for name in ("moe_every", "shared_experts"):
            _check_int(name, getattr(self, name), 0)
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size={self.hidden_size} must be divisible by num_heads={self.num_heads}")
        if (self.hidden_size // self.num_heads) % 2:
            raise ValueError(
                f"head size hidden_size/num_heads={self.hidden_size // self.num_heads} must be even (rotary pairs)"
            )
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k must be in [1, num_experts={self.num_experts}], got {self.top_k}")
        if self.router not in ROUTERS:
            raise ValueError(f"unknown router {self.router!r}; valid: {sorted(ROUTERS)}")
        if self.experts not in EXPERT_IMPLEMENTATIONS:
            raise ValueError(f"unknown experts {self.experts!r}; valid: {sorted(EXPERT_IMPLEMENTATIONS)}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be a number in [0, 1), got {self.dropout!r}")
        if not self.rope_base > 1:
            raise ValueError(f"rope_base must be > 1, got {self.rope_base!r}")
        if "top_k" in self.router_kwargs:
            raise ValueError(f"give top_k as ModelConfig.top_k, not in router_kwargs={self.router_kwargs}")

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

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        batch, length, hidden = x.shape
        q, k, v = self.qkv(x).view(batch, length, 3, self.num_heads, self.head_size).unbind(2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        y = F.scaled_dot_product_attention(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            is_causal=True,
            dropout_p=self.dropout if self.training else 0.0,
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
                kernels=cfg.kernels,
                **_router_kwargs(cfg),
            )
        else:
            self.ffn = DenseMLP(cfg.hidden_size, cfg.ffn_hidden_size, cfg.activation)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, cos, sin, token_ids):
        x = x + self.drop(self.attn(self.attn_norm(x), cos, sin))
        h = self.ffn_norm(x)
        h = self.ffn(h, token_ids=token_ids) if self.use_moe else self.ffn(h)
        return x + self.drop(h)


def _router_kwargs(cfg: ModelConfig) -> dict:
    """``cfg.router_kwargs`` plus ``top_k`` and ``vocab_size`` (hash routing) for routers that take them."""
    kwargs = dict(cfg.router_kwargs)
    params = inspect.signature(ROUTERS[cfg.router].__init__).parameters
    if "top_k" in params:
        kwargs["top_k"] = cfg.top_k
    if "vocab_size" in params:
        kwargs.setdefault("vocab_size", cfg.vocab_size)
    return kwargs


class GPT(nn.Module):
    """Decoder-only language model; ``forward(idx, targets=None) -> (logits, loss)``.

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
        self, idx: torch.Tensor, targets: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if idx.dim() != 2 or idx.dtype != torch.long:
            raise ValueError(f"idx must be an int64 tensor (batch, seq), got {idx.dtype} of shape {tuple(idx.shape)}")
        length = idx.shape[1]
        if length > self.cfg.seq_len:
            raise ValueError(f"sequence length {length} exceeds the model's seq_len={self.cfg.seq_len}")
        if targets is not None and targets.shape != idx.shape:
            raise ValueError(f"targets shape {tuple(targets.shape)} differs from idx shape {tuple(idx.shape)}")
        x = self.embed(idx)
        cos, sin = self.rope_cos[:length], self.rope_sin[:length]
        for block in self.blocks:
            x = block(x, cos, sin, idx)
        logits = self.lm_head(self.norm(x))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.reshape(-1))
        return logits, loss

    def num_params(self) -> int:
        """Number of parameters (a tied embedding counted once)."""
        return sum(p.numel() for p in self.parameters())

    def num_active_params(self, experts_per_token: float | None = None) -> int:
        """Parameters used per token: everything except the experts a token skips.

        Each MoE layer counts ``experts_per_token`` of its ``num_experts`` experts: by default
        ``cfg.top_k``; routers with a variable number per token (expert choice, top-p, null experts,
        ReLU) should pass the measured average (``RoutingStats.experts_per_token``; rounded to the
        nearest parameter). Routers, shared experts, attention, norms and embeddings count in full.
        """
        used = self.cfg.top_k if experts_per_token is None else experts_per_token
        if experts_per_token is not None and not 0 <= experts_per_token <= self.cfg.num_experts:
            raise ValueError(
                f"experts_per_token must be in [0, num_experts={self.cfg.num_experts}], got {experts_per_token}"
            )
        inactive = 0.0
        for _, layer in moe_layers(self):
            experts = layer.experts
            per_expert = (experts.w_in.numel() + experts.w_out.numel()) // experts.num_experts
            inactive += (experts.num_experts - used) * per_expert
        return self.num_params() - round(inactive)

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
