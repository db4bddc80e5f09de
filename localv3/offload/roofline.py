"""Predicted decode and prefill speed of a layout: a roofline per stage, summed along the
critical path of one forward.

Each stage costs max(bytes read / achievable bandwidth, FLOPs / achievable FLOP/s) on its
device. A forward over T tokens with C cached tokens, per decoder layer:
- the layer's resident weights are read once; attention also reads C rows of the latent cache
  and does the FLOPs of the MLA path the engine takes for T queries over C keys (naive for a
  prompt chunk, absorbed for a decode step: localv3.model.mla_cost);
- a routed expert e with routing probability p_e (per token) is read when any of the T tokens
  picks it, probability 1 - (1 - p_e)^T, and does 2 T p_e x its weights FLOPs;
- experts away from the layer's device cost a hand-off each way (hidden states over PCIe plus a
  fixed latency); on a GPU layer they run while the GPU computes the shared expert;
- every layer pays a fixed dispatch cost on its device.
Disk-resident experts are read at the disk rate and computed by the CPU.
On the CPU each weight scheme has its own rates (localv3.offload.kernel_probe, measured on a detected
machine): ggml's block kernels stream at a fraction of the read-bandwidth probe and multiply at
their own FLOP/s; a CPU layer's fixed cost is its torch ops and ggml graph calls.
Every second on the critical path is kept under its resource (GPU memory bandwidth, CPU
compute, ...) and its component (GPU, CPU experts, CPU layers, disk, PCIe, fixed).
"""

from __future__ import annotations

import functools
from collections import Counter
from dataclasses import dataclass

from localv3.offload.hardware import Hardware
from localv3.offload.layout import CPU, DISK, GPU, Layout
from localv3.offload.quant import Quantization, kernel_scheme
from localv3.offload.shape import ModelShape

ACTIVATION_BYTES = 2  # hidden states cross PCIe in bf16

BANDWIDTH_LABEL = {GPU: "GPU memory bandwidth", CPU: "CPU memory bandwidth"}
COMPUTE_LABEL = {GPU: "GPU compute", CPU: "CPU compute"}
DISK_LABEL = "disk reads"
PCIE_LABEL = "PCIe transfers"
FIXED_LABEL = "fixed per-layer costs"
# components: where a decoded token's time goes, for people (the picture of `localv3 plan`)
GPU_PART, CPU_EXPERTS, CPU_LAYERS, DISK_PART, PCIE_PART, FIXED_PART = "GPU", "CPU experts", "CPU layers", "disk", "PCIe", "fixed"
COMPONENTS = (GPU_PART, CPU_EXPERTS, CPU_LAYERS, DISK_PART, PCIE_PART, FIXED_PART)


# One CPU decoder layer's decode step: torch ops (benchmarks/decode_op_count.py counts 62 for a
# dense layer, ~80 for an MoE layer with its banks) and ggml graph calls (four attention
# projections, the MLP or shared expert, the routed experts).
CPU_OPS_PER_LAYER = 80
CPU_GRAPHS_PER_LAYER = 6


@dataclass(frozen=True)
class FixedCosts:
    """Seconds that no bandwidth explains."""

    gpu_layer_s: float = 40e-6  # kernel launches of one decoder layer
    cpu_layer_s: float | None = None  # None: from the hardware's measured op and graph costs
    handoff_s: float = 50e-6  # one GPU<->CPU hand-off: synchronise, copy latency, wake threads


@dataclass(frozen=True)
class Prediction:
    decode_tok_s: float
    prefill_tok_s: float
    bottleneck: str
    decode_seconds: dict[str, float]  # one decoded token's critical path, by resource
    decode_components: dict[str, float]  # the same seconds by component (COMPONENTS)
    context: int  # cached tokens the decode figure assumes
    prefill_chunk: int  # tokens per prefill forward
    decode_tok_s_all_in_ram: float | None = None  # when experts spill to disk: without the spill
    mtp_decode_tok_s: float | None = None  # with MTP speculation at `mtp_acceptance`
    mtp_acceptance: float | None = None

    def to_dict(self) -> dict:
        return {
            "decode_tok_s": self.decode_tok_s,
            "prefill_tok_s": self.prefill_tok_s,
            "bottleneck": self.bottleneck,
            "decode_ms_per_token": {k: v * 1e3 for k, v in self.decode_seconds.items()},
            "decode_ms_per_token_by_component": {k: v * 1e3 for k, v in self.decode_components.items()},
            "context": self.context,
            "prefill_chunk": self.prefill_chunk,
            "decode_tok_s_all_in_ram": self.decode_tok_s_all_in_ram,
            "mtp_decode_tok_s": self.mtp_decode_tok_s,
            "mtp_acceptance": self.mtp_acceptance,
        }


@dataclass(frozen=True)
class Roofline:
    shape: ModelShape
    quant: Quantization
    hardware: Hardware
    expert_probabilities: dict[int, list[float]]  # MoE layer -> per-token probability of each expert
    costs: FixedCosts

    def predict(self, layout: Layout, context: int, prefill_chunk: int, mtp_acceptance: float) -> Prediction:
        main_layers = range(self.shape.num_layers)
        path = self.forward(layout, 1, context, main_layers, logit_rows=1)
        decode = _fold(path, by=1)
        decode_s = sum(decode.values())
        chunk = min(prefill_chunk, context)
        prefill_s = sum(self.forward(layout, chunk, max(chunk // 2, 1), main_layers, logit_rows=1).values())
        without_spill = None
        if layout.count_experts(DISK):
            in_ram = _disk_experts_in_ram(layout)
            without_spill = 1.0 / sum(self.forward(in_ram, 1, context, main_layers, logit_rows=1).values())
        mtp_layers = range(self.shape.num_layers, len(layout.layer_devices))
        mtp_tok_s = None
        if len(mtp_layers):
            depth = len(mtp_layers)
            verify_s = sum(self.forward(layout, depth + 1, context, main_layers, logit_rows=depth + 1).values())
            draft_s = depth * sum(self.forward(layout, 1, context, mtp_layers[:1], logit_rows=1).values())
            accepted = sum(mtp_acceptance**i for i in range(1, depth + 1))
            mtp_tok_s = (1 + accepted) / (verify_s + draft_s)
        return Prediction(
            decode_tok_s=1.0 / decode_s,
            prefill_tok_s=chunk / prefill_s,
            bottleneck=max(decode, key=decode.get),
            decode_seconds=dict(decode),
            decode_components={part: seconds for part, seconds in _fold(path, by=0).items() if seconds > 0},
            context=context,
            prefill_chunk=chunk,
            decode_tok_s_all_in_ram=without_spill,
            mtp_decode_tok_s=mtp_tok_s,
            mtp_acceptance=mtp_acceptance if mtp_tok_s is not None else None,
        )

    def forward(self, layout: Layout, tokens: int, context: int, layers, logit_rows: int) -> Counter:
        """Critical-path seconds of one forward over `tokens` new tokens, by (component, resource)."""
        path: Counter = Counter()
        previous = layout.embedding_device
        for layer in layers:
            device = layout.layer_devices[layer]
            if device != previous:
                path += self._handoff(tokens)
            path += self._resident(device, layer, tokens, context)
            path[FIXED_PART, FIXED_LABEL] += self.costs.gpu_layer_s if device == GPU else self._cpu_layer_s
            if layer in layout.expert_devices:
                path += self._moe(layout, device, layer, tokens)
            previous = device
        if layout.head_device != previous:
            path += self._handoff(tokens)
        head = [self.shape.group("norm"), self.shape.group("lm_head")]
        path += self._groups_roof(layout.head_device, head, logit_rows)
        return path

    @property
    def _cpu_layer_s(self) -> float:
        if self.costs.cpu_layer_s is not None:
            return self.costs.cpu_layer_s
        kernels = self.hardware.kernels
        return CPU_OPS_PER_LAYER * kernels.op_seconds + CPU_GRAPHS_PER_LAYER * kernels.graph_seconds

    def _groups_roof(self, device: str, groups, tokens: int) -> Counter:
        """Reading and multiplying the tensors of `groups` once for `tokens` tokens, each tensor
        at its format's kernel rates."""
        by_scheme: dict[str, list[float]] = {}
        for g in groups:
            for t in g.tensors:
                fmt = self.quant.format_of(g, t)
                part = by_scheme.setdefault(kernel_scheme(fmt), [0.0, 0.0])
                part[0] += g.count * fmt.tensor_bytes(t.shape)
                part[1] += g.count * 2 * tokens * t.elements
        path: Counter = Counter()
        for scheme, (nbytes, flops) in by_scheme.items():
            path += self._roof(device, nbytes, flops, scheme, rows=tokens)
        return path

    # ----- stages ---------------------------------------------------------------------------
    def _resident(self, device: str, layer: int, tokens: int, context: int) -> Counter:
        groups = [g for g in self.shape.layer_groups(layer) if g.kind not in ("shared_expert", "routed_expert")]
        s = self.shape
        kv_bytes = context * s.kv_bytes_per_token_per_layer
        attention_flops = 2 * self._attention_multiply_adds(tokens, context)
        return self._groups_roof(device, groups, tokens) + self._roof(device, kv_bytes, attention_flops)

    def _attention_multiply_adds(self, tokens: int, context: int) -> int:
        """The engine's cheaper MLA path for `tokens` queries over `context` keys, less what the
        layer's groups already count: W_UK and W_UV (held as `absorbed`) applied per query."""
        widths = self.shape.mla_widths
        costs = widths.costs(tokens, max(context, 1))
        per_query_up = widths.heads * tokens * widths.rank * (widths.nope + widths.v)
        return max(min(costs.values()) - per_query_up, 0)

    def _moe(self, layout: Layout, device: str, layer: int, tokens: int) -> Counter:
        """The shared expert on the layer's device; routed experts wherever they live. On a GPU
        layer the CPU's experts run while the GPU does the shared expert and its own experts."""
        shared = self.shape.group("shared_expert", layer)
        shared_part = self._groups_roof(device, [shared], tokens) if shared else Counter()
        read, flops = self._expert_traffic(layout, layer, tokens)
        gpu_part = self._experts_roof(GPU, layer, read[GPU], flops[GPU], tokens) if read[GPU] else Counter()
        cpu_part: Counter = Counter()
        if read[CPU] or read[DISK]:
            cpu_part = self._experts_roof(CPU, layer, read[CPU], flops[CPU] + flops[DISK], tokens)
            if read[DISK]:
                cpu_part[DISK_PART, DISK_LABEL] += read[DISK] / self.hardware.effective("disk_bw")
        local, remote = (gpu_part, cpu_part) if device == GPU else (cpu_part, gpu_part)
        local += shared_part
        if remote:
            remote += self._handoff(tokens) + self._handoff(tokens)
        if device == GPU:
            return local if sum(local.values()) >= sum(remote.values()) else remote
        return local + remote

    def _expert_traffic(self, layout: Layout, layer: int, tokens: int) -> tuple[Counter, Counter]:
        """Expected bytes read and FLOPs per device for the routed experts of one layer."""
        experts = self.shape.group("routed_expert", layer)
        expert_bytes, expert_flops = experts.unit_bytes(self.quant), 2 * tokens * experts.unit_elements
        read: Counter = Counter()
        flops: Counter = Counter()
        for p, device in zip(self.expert_probabilities[layer], layout.expert_devices[layer]):
            read[device] += (1.0 - (1.0 - p) ** tokens) * expert_bytes
            flops[device] += p * expert_flops
        return read, flops

    def _experts_roof(self, device: str, layer: int, nbytes: float, flops: float, tokens: int) -> Counter:
        """Routed experts' reads and products on `device`, each share at its formats' kernel
        rates for the rows an expert gets on average (tokens x k / E)."""
        rows = tokens * self.shape.experts_per_token / max(self.shape.n_routed_experts, 1)
        path: Counter = Counter()
        for scheme, byte_share, flop_share in self._expert_schemes[layer]:
            path += self._roof(device, nbytes * byte_share, flops * flop_share, scheme, experts=True, rows=rows)
        return path

    @functools.cached_property
    def _expert_schemes(self) -> dict[int, list[tuple[str, float, float]]]:
        """Per MoE layer: (kernel scheme, share of one expert's bytes, share of its weights)."""
        shares = {}
        for layer in self.expert_probabilities:
            group = self.shape.group("routed_expert", layer)
            parts: dict[str, list[float]] = {}
            for t in group.tensors:
                fmt = self.quant.format_of(group, t)
                part = parts.setdefault(kernel_scheme(fmt), [0.0, 0.0])
                part[0] += fmt.tensor_bytes(t.shape)
                part[1] += t.elements
            nbytes, elements = group.unit_bytes(self.quant), group.unit_elements
            shares[layer] = [(scheme, b / nbytes, e / elements) for scheme, (b, e) in parts.items()]
        return shares

    def _roof(
        self, device: str, nbytes: float, flops: float, scheme: str | None = None, experts: bool = False, rows: float | None = None
    ) -> Counter:
        """max(read time, compute time) on `device`; on the CPU at `scheme`'s kernel rates for
        `rows` rows per matrix (the routed experts' products have their own FLOP/s and count as
        the CPU experts' time)."""
        hw = self.hardware
        bandwidth, compute = hw.effective(f"{device}_bw"), hw.effective(f"{device}_flops")
        if device == CPU and scheme is not None:
            bandwidth = hw.kernels.read_rate(scheme, bandwidth)
            compute = hw.kernels.flop_rate(scheme, compute, experts, rows)
        memory_s = nbytes / bandwidth
        compute_s = flops / compute
        part = GPU_PART if device == GPU else (CPU_EXPERTS if experts else CPU_LAYERS)
        if memory_s >= compute_s:
            return Counter({(part, BANDWIDTH_LABEL[device]): memory_s})
        return Counter({(part, COMPUTE_LABEL[device]): compute_s})

    def _handoff(self, tokens: int) -> Counter:
        pcie = tokens * self.shape.hidden_size * ACTIVATION_BYTES / self.hardware.effective("pcie_bw")
        return Counter({(PCIE_PART, PCIE_LABEL): pcie, (FIXED_PART, FIXED_LABEL): self.costs.handoff_s})


def _fold(path: Counter, by: int) -> Counter:
    """Seconds keyed by (component, resource) summed by component (by=0) or resource (by=1)."""
    folded: Counter = Counter()
    for key, seconds in path.items():
        folded[key[by]] += seconds
    return folded


def _disk_experts_in_ram(layout: Layout) -> Layout:
    moved = {layer: tuple(CPU if d == DISK else d for d in devices) for layer, devices in layout.expert_devices.items()}
    return Layout(layout.layer_devices, moved, layout.head_device, layout.embedding_device)
