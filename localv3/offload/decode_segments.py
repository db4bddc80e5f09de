"""One decode step as a program of segments over static buffers, which a CUDA graph can capture.

A `Segment` is device code on one device: its stages read only static buffers (the token and
position tensors, the cache, buffers earlier segments wrote) and write their results into
static buffers, never into their own inputs, so running a segment twice gives the same state
and every tensor it touches has the same shape and address at every step of a capacity bucket
(`keys`: how many cache rows attention reads). A `HostCall` is the routed experts that the plan
keeps in host memory: eager, between segments, on pinned staging buffers.

A MoE layer on the plan's GPU with experts in host memory is split in three:
- segment A (closes the current segment): attention block, post-attention norm, router; the
  normed hidden state and the router's indices/weights are copied into pinned host buffers
  (non_blocking);
- segment A2 (only when there is device work left): the shared expert and the layer's experts
  on the device, the latter through DenseExpertBank.gathered (no host sync); it runs while the
  host call computes;
- the host call: waits for segment A only, runs the host banks on the staged inputs, leaves
  their sum in a pinned buffer; expert banks on the device that cannot be gathered (quantised
  ones) run here too, eagerly, on the device buffers: never inside a captured segment;
- the next segment starts by adding the experts' outputs (copied back non_blocking) to the
  residual, then goes on with the following layers.
Dense layers and MoE layers without such banks are one stretch of their segment. A layer the
plan puts on the host runs eagerly in a host segment, through its own modules.

The split path's MoE layers do not call their routing observers inside a segment (one may
sync: bincount); `notify_routing` calls them after the step on the routing the static buffers
hold.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from localv3.model.cache import LatentCache
from localv3.model.moe import DenseExpertBank, MoE
from localv3.model.transformer import DecoderBlock, Transformer
from localv3.offload.banks import BankSlice, PlacedExperts

Stage = Callable[[torch.Tensor | None, int], torch.Tensor | None]  # (hidden or None, keys) -> hidden or None


@dataclass(frozen=True)
class StepPlacement:
    """What the plan says the split needs: the layers on the plan's GPU device, and per MoE layer
    the expert ids it keeps in host memory (RAM or disk)."""

    gpu_layers: frozenset[int]
    host_experts: dict[int, frozenset[int]] = field(default_factory=dict)

    @classmethod
    def one_device(cls, model: Transformer) -> StepPlacement:
        """Every layer on the model's one device, no experts apart."""
        return cls(frozenset(range(len(model.model.layers))))


@dataclass
class Segment:
    device: torch.device
    stages: list[Stage] = field(default_factory=list)

    def run(self, keys: int) -> None:
        hidden = None
        for stage in self.stages:
            hidden = stage(hidden, keys)


@dataclass
class HostCall:
    run: Callable[[], None]
    after: Segment  # the segment whose outputs it reads


@dataclass
class RoutedLayer:
    """A split MoE layer's router outputs, which `notify_routing` hands its observers after the step."""

    moe: MoE
    x: torch.Tensor  # [1, D]
    indices: torch.Tensor  # [1, k]
    weights: torch.Tensor  # [1, k]


@dataclass
class DecodeProgram:
    items: list[Segment | HostCall]
    token: torch.Tensor  # [1, 1] int64 on the embeddings' device
    positions: dict[torch.device, torch.Tensor]  # [1] int64 per device
    hidden: torch.Tensor  # [1, 1, D] final-normed hidden state
    logits: torch.Tensor  # [1, 1, V] fp32
    routed: list[RoutedLayer]


def _static(shape, dtype, device: torch.device, pinned: bool) -> torch.Tensor:
    """A zeroed buffer; pinned where it is host memory that CUDA copies read or write."""
    with torch.inference_mode(False):  # a normal tensor: writable in and out of inference mode
        if pinned and device.type == "cpu":
            return torch.zeros(shape, dtype=dtype, pin_memory=True)
        return torch.zeros(shape, dtype=dtype, device=device)


def _device_of(module: nn.Module) -> torch.device:
    return next(itertools.chain(module.parameters(), module.buffers())).device  # quantised modules hold buffers


class _ProgramBuilder:
    def __init__(self, model: Transformer, cache: LatentCache, placement: StepPlacement):
        self.model, self.cache, self.placement = model, cache, placement
        self.dtype, self.dim = model.compute_dtype, model.config.hidden_size
        self.pinned = any(p.is_cuda for p in model.parameters())
        self.items: list[Segment | HostCall] = []
        self.segment: Segment | None = None
        self.positions: dict[torch.device, torch.Tensor] = {}
        self.ropes: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        self.routed: list[RoutedLayer] = []

    def buffer(self, shape, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
        return _static(shape, dtype or self.dtype, device, self.pinned)

    def open(self, device: torch.device, first: Stage) -> Segment:
        self.segment = Segment(device, [first])
        self.items.append(self.segment)
        return self.segment

    def hidden_on(self, device: torch.device) -> None:
        """Continue the hidden state on `device`: in the current segment if it is there, else
        through a boundary buffer on the current segment's device into a new segment."""
        if self.segment.device == device:
            return
        boundary = self.buffer((1, 1, self.dim), self.segment.device)

        def leave(h, keys):
            boundary.copy_(h)

        self.segment.stages.append(leave)
        self.open(device, lambda h, keys: boundary.to(device, non_blocking=True))

    def position(self, device: torch.device) -> torch.Tensor:
        if device not in self.positions:
            self.positions[device] = self.buffer((1,), device, torch.long)
        return self.positions[device]

    def rope(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [1, 1, R] of the step's position on `device`, computed there by the first
        segment that needs them (a copy of the rotary tables on each device)."""
        if device not in self.ropes:
            rotary = copy.deepcopy(self.model.rotary).to(device)
            position = self.position(device)
            cos, sin = (self.buffer((1, 1, self.model.config.qk_rope_head_dim), device) for _ in range(2))

            def compute(h, keys):
                new_cos, new_sin = rotary(position, self.dtype)
                cos.copy_(new_cos), sin.copy_(new_sin)
                return h

            self.segment.stages.append(compute)
            self.ropes[device] = (cos, sin)
        return self.ropes[device]

    # ----- the model's parts, in order ---------------------------------------------------------
    def build(self) -> DecodeProgram:
        model = self.model
        embed_device = _device_of(model.model.embed_tokens)
        token = self.buffer((1, 1), embed_device, torch.long)
        self.open(embed_device, lambda h, keys: model.model.embed_tokens(token))
        for index, block in enumerate(model.model.layers):
            self.layer(index, block)
        head_device = _device_of(model.lm_head)
        self.hidden_on(head_device)
        hidden = self.buffer((1, 1, self.dim), head_device)
        logits = self.buffer((1, 1, model.config.vocab_size), head_device, torch.float32)

        def head(h, keys):
            hidden.copy_(model.model.norm(h))
            logits.copy_(model.logits(hidden))

        self.segment.stages.append(head)
        return DecodeProgram(self.items, token, self.positions, hidden, logits, self.routed)

    def layer(self, index: int, block: DecoderBlock) -> None:
        device = _device_of(block)
        self.hidden_on(device)
        position, rope = self.position(device), self.rope(device)

        def attend(h: torch.Tensor, keys: int) -> torch.Tensor:
            return h + block.self_attn.decode_at(block.input_layernorm(h), position, rope, self.cache, index, keys)

        on_gpu = index in self.placement.gpu_layers
        if not isinstance(block.mlp, MoE) or not on_gpu:  # one stretch, through the modules
            self.segment.stages.append(lambda h, keys: _residual_mlp(block, attend(h, keys)))
            return
        parts = ExpertParts.of(block.mlp, self.placement.host_experts.get(index, frozenset()))
        routed = self.routed_buffers(block.mlp, device)
        if parts.eager:
            self.split_layer(block, attend, parts, routed)
        else:
            self.segment.stages.append(lambda h, keys: self.whole_moe(block, parts, routed, attend(h, keys)))

    def routed_buffers(self, moe: MoE, device: torch.device) -> RoutedLayer:
        k = moe.gate.top_k
        routed = RoutedLayer(
            moe,
            self.buffer((1, self.dim), device),
            self.buffer((1, k), device, torch.long),
            self.buffer((1, k), device, torch.float32),
        )
        self.routed.append(routed)
        return routed

    def whole_moe(self, block: DecoderBlock, parts: ExpertParts, routed: RoutedLayer, h: torch.Tensor) -> torch.Tensor:
        """A MoE layer with every bank on its device and gatherable: all in the segment."""
        x, indices, weights = _route(block, routed, h)
        return h + parts.with_shared(parts.device_sum(x, indices, weights), x).view_as(h)

    def split_layer(self, block: DecoderBlock, attend: Callable, parts: ExpertParts, routed: RoutedLayer) -> None:
        """Segment A (router, staging), segment A2 (device experts), the host call, then the
        next segment adds their outputs to the residual."""
        device = routed.x.device
        residual = self.buffer((1, 1, self.dim), device)
        host = HostStaging.for_layer(self, block.mlp.gate.top_k) if parts.host else None

        def route(h, keys):
            after = attend(h, keys)
            residual.copy_(after)
            x, indices, weights = _route(block, routed, after)
            if host is not None:
                host.stage(x, indices, weights)

        self.segment.stages.append(route)
        segment_a = self.segment
        device_out = self.buffer((1, self.dim), device)
        if parts.gathered or parts.shared is not None:

            def device_experts(h, keys):
                out = parts.device_sum(routed.x, routed.indices, routed.weights)
                device_out.copy_(parts.with_shared(out, routed.x))

            self.open(device, device_experts)
        eager_out = self.buffer((1, self.dim), device) if parts.eager_device else None

        def host_call():
            if host is not None:
                host.out.copy_(parts.host_sum(host.x, host.indices, host.weights))
            if eager_out is not None:
                eager_out.copy_(parts.eager_device_sum(routed.x, routed.indices, routed.weights))

        self.items.append(HostCall(host_call, segment_a))

        def add_experts(h, keys):
            out = device_out
            if host is not None:
                out = out + host.out.to(device, non_blocking=True)
            if eager_out is not None:
                out = out + eager_out
            return residual + out.view(1, 1, self.dim)

        self.open(device, add_experts)


def _residual_mlp(block: DecoderBlock, h: torch.Tensor) -> torch.Tensor:
    return h + block.mlp(block.post_attention_layernorm(h))


def _route(block: DecoderBlock, routed: RoutedLayer, h: torch.Tensor):
    """Post-attention norm and router, kept in `routed` -> (x [1, D], indices [1, k], weights [1, k])."""
    x = block.post_attention_layernorm(h).view(1, -1)  # [1, D]
    indices, weights = block.mlp.gate(x)  # observers are told after the step: notify_routing
    routed.x.copy_(x)
    routed.indices.copy_(indices)
    routed.weights.copy_(weights)
    return x, indices, weights


@dataclass
class HostStaging:
    """Pinned host copies of a split layer's router inputs and outputs, and of the host experts' sum."""

    x: torch.Tensor  # [1, D]
    indices: torch.Tensor  # [1, k]
    weights: torch.Tensor  # [1, k] fp32
    out: torch.Tensor  # [1, D]

    @classmethod
    def for_layer(cls, builder: _ProgramBuilder, k: int) -> HostStaging:
        host = torch.device("cpu")
        x, out = (builder.buffer((1, builder.dim), host) for _ in range(2))
        return cls(x, builder.buffer((1, k), host, torch.long), builder.buffer((1, k), host, torch.float32), out)

    def stage(self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> None:
        self.x.copy_(x, non_blocking=True)
        self.indices.copy_(indices, non_blocking=True)
        self.weights.copy_(weights, non_blocking=True)


@dataclass
class ExpertParts:
    """A MoE layer's expert banks sorted by how a static step runs them: `gathered` (dense banks
    on the layer's device: DenseExpertBank.gathered), `host` (slices the plan keeps in host
    memory), `eager_device` (other banks on the device: quantised); plus the shared expert."""

    gathered: list[tuple[DenseExpertBank, torch.Tensor | None]]  # (bank, layer id -> bank id [E] or None: all)
    host: list[nn.Module]
    eager_device: list[nn.Module]
    shared: nn.Module | None

    @property
    def eager(self) -> bool:
        return bool(self.host or self.eager_device)

    @classmethod
    def of(cls, moe: MoE, host_ids: frozenset[int]) -> ExpertParts:
        experts = moe.experts
        if not isinstance(experts, PlacedExperts):  # one bank of every expert, on the layer's device
            gathered = [(experts, None)] if isinstance(experts, DenseExpertBank) else []
            return cls(gathered, [], [] if gathered else [experts], moe.shared_experts)
        parts = cls([], [], [], experts.shared)
        for bank_slice in experts.slices:
            if set(bank_slice.expert_ids) <= host_ids:
                parts.host.append(bank_slice)
            elif isinstance(bank_slice.bank, DenseExpertBank):
                parts.gathered.append((bank_slice.bank, _local_ids(bank_slice, moe.gate.n_experts)))
            else:
                parts.eager_device.append(bank_slice)
        return parts

    def device_sum(self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """The gathered banks' weighted outputs [1, D] (zeros without any)."""
        out = torch.zeros_like(x)
        for bank, local_of in self.gathered:
            if local_of is None:
                out = out + bank.gathered(x, indices, weights)
                continue
            local = local_of[indices]  # [1, k]: the bank's id, -1 if elsewhere
            here = local >= 0
            out = out + bank.gathered(x, local.clamp(min=0), weights * here)
        return out

    def with_shared(self, routed: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return routed if self.shared is None else routed + self.shared(x)

    def host_sum(self, x, indices, weights) -> torch.Tensor:
        return PlacedExperts._sum(self.host, x, indices, weights)

    def eager_device_sum(self, x, indices, weights) -> torch.Tensor:
        return PlacedExperts._sum(self.eager_device, x, indices, weights)


def _local_ids(bank_slice: BankSlice, n_experts: int) -> torch.Tensor | None:
    """[E]: the slice's bank id of each of the layer's experts, -1 where another bank holds it;
    None when the slice holds them all, in order."""
    if bank_slice.whole:
        return None
    local_of = torch.full((n_experts,), -1, dtype=torch.long)
    local_of[bank_slice.expert_ids] = torch.arange(len(bank_slice.expert_ids))
    return local_of.to(bank_slice.device)


def build_program(model: Transformer, cache: LatentCache, placement: StepPlacement) -> DecodeProgram:
    return _ProgramBuilder(model, cache, placement).build()


def notify_routing(program: DecodeProgram) -> None:
    """Hand each split MoE layer's choice of this step to its routing observers (routing
    statistics, expert reads), outside any captured segment."""
    for routed in program.routed:
        for observe in routed.moe.routing_observers:
            observe(routed.indices.clone())
