"""One streamed calibration pass: per-MoE-layer routing statistics, expert features and cached inputs/outputs."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from moe.layer import MoELayer, moe_layers
from moe.routing import Routing

DEFAULT_MEMORY_BUDGET = 256 * 2**20


def dense_weights(routing: Routing) -> torch.Tensor:
    """(T, E) float32 matrix of combine weights (0 where a token did not pick an expert)."""
    dense = routing.logits.new_zeros(routing.num_tokens, routing.num_experts)
    return dense.index_put_((routing.token_index, routing.expert_index), routing.weight.float(), accumulate=True)


def all_expert_outputs(layer: MoELayer, x: torch.Tensor, chunk_tokens: int = 4096) -> torch.Tensor:
    """(E, T, H): every expert of ``layer`` applied to every row of ``x`` (T, H), in chunks of tokens.

    Cost: E/k times the layer's expert FLOPs on these tokens; memory E * chunk_tokens * H per chunk.
    """
    num_experts = layer.experts.num_experts
    outputs = []
    for chunk in x.split(chunk_tokens):
        rows = chunk.repeat(num_experts, 1)
        counts = torch.full((num_experts,), chunk.shape[0], dtype=torch.int64, device=x.device)
        outputs.append(layer.experts(rows, counts).view(num_experts, chunk.shape[0], -1))
    return torch.cat(outputs, dim=1)


@dataclass
class LayerCalibration:
    """What calibration measured for one MoE layer (statistics over every calibration token).

    Attributes:
        name: module path of the layer.
        num_tokens: tokens seen.
        selection_count: (E,) float64, pairs routed to each expert (its top-k selections).
        score_mass: (E,) float64, sum over tokens of the router probability ``softmax(z)_e``.
        logit_gram: (E, E) float64, ``Zᵀ Z`` of the router logits: the inner products of the
            experts' router-logit columns over all tokens (cosine similarity follows exactly).
        output_sum: (E, H) float64, sum over all tokens of each expert's output (every expert is run
            on every token, routed or not).
        reap_sum: (E,) float64, sum over the tokens routed to each expert of ``softmax(z)_e · ‖f_e(x)‖₂``
            (REAP's saliency numerator).
        inputs, outputs: (N, H) float32 on ``storage_device``: the first N tokens' layer inputs and
            outputs, N limited by the memory budget.
        token_ids: (N,) int64 token ids for those rows when the model passed them, else None.
        top2_ratio: (M,) float32, ``w2 / w1`` of the two largest combine weights of tokens with at
            least two experts (first M such tokens, same budget).
    """

    name: str
    num_tokens: int
    selection_count: torch.Tensor
    score_mass: torch.Tensor
    logit_gram: torch.Tensor
    output_sum: torch.Tensor
    reap_sum: torch.Tensor
    inputs: torch.Tensor
    outputs: torch.Tensor
    token_ids: torch.Tensor | None
    top2_ratio: torch.Tensor

    @property
    def num_experts(self) -> int:
        """E, the layer's expert count when it was calibrated."""
        return self.selection_count.numel()

    @property
    def frequency(self) -> torch.Tensor:
        """(E,) selection share: ``selection_count / sum`` (uniform when nothing was selected)."""
        total = self.selection_count.sum()
        if total == 0:
            return torch.full_like(self.selection_count, 1.0 / self.num_experts)
        return self.selection_count / total

    @property
    def mean_output(self) -> torch.Tensor:
        """(E, H) each expert's mean output over all calibration tokens (HC-SMoE's feature)."""
        return self.output_sum / max(self.num_tokens, 1)

    @property
    def reap_saliency(self) -> torch.Tensor:
        """(E,) REAP saliency: mean over the routed tokens of ``softmax(z)_e · ‖f_e(x)‖₂`` (0 if unused)."""
        return self.reap_sum / self.selection_count.clamp_min(1)

    def logit_cosine(self) -> torch.Tensor:
        """(E, E) cosine similarity of the experts' router-logit columns."""
        norms = self.logit_gram.diagonal().clamp_min(1e-300).sqrt()
        return self.logit_gram / (norms[:, None] * norms[None, :])


@dataclass
class Calibration:
    """Per-layer calibration results keyed by module path, plus what is needed to run the pass again.

    ``batches`` and ``forward`` are kept so that progressive pruning can re-collect inputs.
    """

    layers: dict[str, LayerCalibration]
    batches: list = field(repr=False)
    forward: Callable = field(repr=False)
    memory_budget: int = DEFAULT_MEMORY_BUDGET
    storage_device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    def __getitem__(self, name: str) -> LayerCalibration:
        if name not in self.layers:
            raise KeyError(f"no calibration for layer {name!r}; calibrated layers: {sorted(self.layers)}")
        return self.layers[name]


def default_forward(model: nn.Module, batch) -> None:
    """Run ``model`` on one batch: a tensor, the first item of a tuple/list (inputs, targets), or a dict."""
    if isinstance(batch, dict):
        model(**batch)
    elif isinstance(batch, (tuple, list)):
        model(batch[0])
    else:
        model(batch)


class _LayerCollector:
    """Forward hook state for one layer: accumulates statistics on the layer's device."""

    def __init__(self, name: str, layer: MoELayer, max_rows: int, storage_device: torch.device, chunk_tokens: int):
        self.name = name
        self.layer = layer
        self.max_rows = max_rows
        self.storage_device = storage_device
        self.chunk_tokens = chunk_tokens
        self.num_tokens = 0
        self.sums: dict[str, torch.Tensor] = {}
        self.inputs: list[torch.Tensor] = []
        self.outputs: list[torch.Tensor] = []
        self.token_ids: list[torch.Tensor] = []
        self.ratios: list[torch.Tensor] = []
        self.stored_rows = 0
        self.stored_ratios = 0
        self.saw_token_ids = False

    def _add(self, key: str, value: torch.Tensor) -> None:
        value = value.to(torch.float64)
        self.sums[key] = self.sums[key] + value if key in self.sums else value

    @torch.no_grad()
    def __call__(self, module, args, kwargs, output) -> None:
        x = args[0]
        token_ids = kwargs.get("token_ids", args[1] if len(args) > 1 else None)
        flat = x.reshape(-1, x.shape[-1])
        flat_ids = None if token_ids is None else token_ids.reshape(-1)
        routing = module.last_routing
        weights = dense_weights(routing)
        self.num_tokens += flat.shape[0]
        self._add("selection_count", routing.tokens_per_expert)
        probs = routing.logits.softmax(-1)
        self._add("score_mass", probs.sum(0))
        logits64 = routing.logits.to(torch.float64)
        self._add("logit_gram", logits64.T @ logits64)
        routed_probs = torch.zeros_like(probs).index_put_(
            (routing.token_index, routing.expert_index), probs.new_ones(())
        )
        routed_probs = routed_probs * probs  # softmax(z)_te where t was routed to e, else 0
        for start in range(0, flat.shape[0], self.chunk_tokens):
            outputs = all_expert_outputs(module, flat[start : start + self.chunk_tokens], self.chunk_tokens).float()
            self._add("output_sum", outputs.sum(1))
            norms = torch.linalg.vector_norm(outputs, dim=-1)  # (E, chunk)
            self._add("reap_sum", (routed_probs[start : start + self.chunk_tokens].T * norms).sum(1))
        room = self.max_rows - self.stored_rows
        if room > 0:
            out_flat = output.reshape(-1, output.shape[-1])
            self.inputs.append(flat[:room].float().to(self.storage_device))
            self.outputs.append(out_flat[:room].float().to(self.storage_device))
            if flat_ids is not None:
                self.saw_token_ids = True
                self.token_ids.append(flat_ids[:room].to(self.storage_device))
            self.stored_rows += self.inputs[-1].shape[0]
        if weights.shape[1] >= 2 and self.stored_ratios < self.max_rows:
            top2 = weights.topk(2, dim=-1).values
            has_two = top2[:, 1] > 0
            ratio = (top2[:, 1] / top2[:, 0].clamp_min(torch.finfo(torch.float32).tiny))[has_two]
            ratio = ratio[: self.max_rows - self.stored_ratios].to(self.storage_device)
            self.ratios.append(ratio)
            self.stored_ratios += ratio.numel()

    def result(self) -> LayerCalibration:
        if self.num_tokens == 0:
            raise ValueError(f"layer {self.name!r} saw no tokens during calibration (is it used by the forward?)")
        hidden = self.layer.hidden_size
        return LayerCalibration(
            name=self.name,
            num_tokens=self.num_tokens,
            selection_count=self.sums["selection_count"].cpu(),
            score_mass=self.sums["score_mass"].cpu(),
            logit_gram=self.sums["logit_gram"].cpu(),
            output_sum=self.sums["output_sum"].cpu(),
            reap_sum=self.sums["reap_sum"].cpu(),
            inputs=torch.cat(self.inputs) if self.inputs else torch.zeros(0, hidden),
            outputs=torch.cat(self.outputs) if self.outputs else torch.zeros(0, hidden),
            token_ids=torch.cat(self.token_ids) if self.saw_token_ids else None,
            top2_ratio=torch.cat(self.ratios) if self.ratios else torch.zeros(0),
        )


def calibrate(
    model: nn.Module,
    batches: Iterable,
    *,
    forward: Callable | None = None,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    storage_device: torch.device | str = "cpu",
    chunk_tokens: int = 4096,
    layers: Iterable[str] | None = None,
) -> Calibration:
    """Run ``model`` over ``batches`` once (eval mode, no grad) and measure every ``moe.MoELayer``.

    Args:
        batches: calibration batches (kept in a list for progressive pruning); each is passed to
            ``forward(model, batch)``, by default ``default_forward``.
        memory_budget: bytes for the cached layer inputs/outputs of all layers together (float32,
            first tokens kept); the rest is streamed into running sums.
        storage_device: where cached rows go (CPU keeps accelerator memory free).
        chunk_tokens: tokens per chunk when running every expert on every token.
        layers: restrict to these layer names (default: all).

    Works on CPU and GPU (statistics accumulate in float64 on the layer's device). Cost: one forward
    of the model (each layer's routing is read from ``MoELayer.last_routing``), plus per layer E/k
    times its expert FLOPs (HC-SMoE's mean outputs need every expert on every token).
    """
    if not isinstance(memory_budget, int) or memory_budget < 0:
        raise ValueError(f"memory_budget must be an int >= 0 (bytes), got {memory_budget!r}")
    if isinstance(chunk_tokens, bool) or not isinstance(chunk_tokens, int) or chunk_tokens <= 0:
        raise ValueError(f"chunk_tokens must be an int > 0, got {chunk_tokens!r}")
    found = moe_layers(model)
    if not found:
        raise ValueError("the model has no moe.MoELayer to calibrate")
    if layers is not None:
        wanted = set(layers)
        unknown = wanted - {name for name, _ in found}
        if unknown:
            raise ValueError(f"unknown layers {sorted(unknown)}; MoE layers: {[name for name, _ in found]}")
        found = [(name, layer) for name, layer in found if name in wanted]
    forward = forward or default_forward
    batches = list(batches)
    if not batches:
        raise ValueError("calibration needs at least one batch")
    storage_device = torch.device(storage_device)
    collectors, handles = [], []
    for name, layer in found:
        bytes_per_row = 2 * layer.hidden_size * 4 + 8 + 4
        max_rows = memory_budget // (len(found) * bytes_per_row)
        collector = _LayerCollector(name, layer, max_rows, storage_device, chunk_tokens)
        collectors.append(collector)
        handles.append(layer.register_forward_hook(collector, with_kwargs=True))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in batches:
                forward(model, batch)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return Calibration(
        layers={c.name: c.result() for c in collectors},
        batches=batches,
        forward=forward,
        memory_budget=memory_budget,
        storage_device=storage_device,
    )


def collect_inputs(model: nn.Module, calibration: Calibration, name: str, max_rows: int) -> torch.Tensor:
    """(N, H) float32: the first ``max_rows`` inputs of layer ``name`` when the model runs the calibration batches now.

    Used by progressive pruning after earlier layers changed. Cost: one forward of the model.
    """
    layer = dict(moe_layers(model)).get(name)
    if layer is None:
        raise ValueError(f"model has no MoE layer {name!r}")
    rows: list[torch.Tensor] = []
    stored = 0

    def hook(module, args, output):
        nonlocal stored
        flat = args[0].reshape(-1, args[0].shape[-1])
        if stored < max_rows:
            rows.append(flat[: max_rows - stored].float().to(calibration.storage_device))
            stored += rows[-1].shape[0]

    handle = layer.register_forward_hook(hook)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in calibration.batches:
                calibration.forward(model, batch)
    finally:
        handle.remove()
        model.train(was_training)
    return torch.cat(rows) if rows else torch.zeros(0, layer.hidden_size)
