"""The offload planner: ModelShape + Quantization + Hardware + context + Policy -> Plan.

Pure arithmetic over numbers (no torch state), in three steps:
1. Resident parts (everything but the routed experts) go to the GPU first, as units in this
   order: each decoder layer with its KV cache rows for `context` tokens, the final norm with
   lm_head, the MTP layers, the embeddings. A unit that does not fit goes to CPU RAM.
2. Routed experts go to CPU RAM; spare VRAM takes the hottest (per the routing profile, else
   uniform, which fills whole layers in order), unless `cpu_moe`, `n_cpu_moe` or `gpu_experts`
   say otherwise. MTP experts come after all main-model experts.
3. Experts that do not fit in RAM go to disk, coldest first, and the slowdown is stated.
Headroom is kept on the GPU for the CUDA context and one prefill chunk's activations, and in
RAM for the OS and the runtime. A plan that cannot fit is refused with a PlanError naming the
shortfall and the smallest change that fits.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace

from localv3.errors import LocalV3Error
from localv3.render import format_bytes
from localv3.offload.hardware import Hardware
from localv3.offload.layout import CPU, DISK, GPU, Layout
from localv3.offload.quant import ROLE_SCHEMES, ROLES, Quantization
from localv3.offload.roofline import FixedCosts, Prediction, Roofline
from localv3.offload.shape import ModelShape, ParameterCount, TensorGroup

GiB = 2**30
LOWER_QUANT = {"fp32": ("bf16", "q8", "q4"), "bf16": ("q8", "q4"), "fp16": ("q8", "q4"), "fp8": ("q4",), "q8": ("q4",)}
USEFUL_CONTEXT = 2048  # a shorter context is not offered as the fix


@dataclass(frozen=True)
class Fix:
    """One setting changed: the smallest change that makes a refused plan fit. `setting` is a
    plan() argument or a Policy/Quantization field: context, experts, dense, embeddings,
    n_cpu_moe, gpu_experts, allow_disk."""

    setting: str
    value: int | str | bool

    def describe(self) -> str:
        """The change in plain words, for a caller without flags of its own (the Python API)."""
        if self.setting == "context":
            return f"a context of {self.value:,} tokens"
        if self.setting == "allow_disk":
            return "experts spilling to disk"
        if self.setting in ROLES:
            return f"{self.setting} in {self.value}"
        return f"{self.setting} {self.value}"


class PlanError(LocalV3Error):
    """The model does not fit the hardware under the policy, or the request contradicts itself.

    Structured, so each command words it with its own flags (`plan` in commands/plan.py, the
    loading commands in engine_choice.open_engine):
    `setting` and `given` name the argument at fault, `fix` the smallest change that fits,
    `more_ram` the RAM that would do as well (0: not known)."""

    def __init__(
        self, reason: str, setting: str | None = None, given=None, fix: Fix | None = None, more_ram: int = 0
    ):
        self.reason, self.setting, self.given, self.fix, self.more_ram = reason, setting, given, fix, more_ram
        super().__init__(self.render({}))

    def render(self, flags: dict[str, str], describe_fix=None) -> str:
        """The message with settings called by `flags` (setting -> flag): `setting`, a fix's
        setting and any `{setting}` in the reason; a setting without a flag keeps its own name,
        a fix without one is described by `describe_fix` or in words."""
        text = re.sub(r"\{(\w+)\}", lambda named: flags.get(named[1], named[1]), self.reason)
        if self.setting is not None:
            text = f"{flags.get(self.setting, self.setting)} {self.given}: {text}"
        if self.fix is None and not self.more_ram:
            return text
        more_ram = f"{format_bytes(self.more_ram)} more RAM" if self.more_ram else None
        if self.fix is None:
            return f"{text}; the smallest change that fits: {more_ram}"
        if self.fix.setting in flags:
            fix = f"{flags[self.fix.setting]} {self.fix.value}"
        else:
            fix = (describe_fix or Fix.describe)(self.fix)
        return f"{text}; the smallest change that fits: {fix}" + (f" (or {more_ram})" if more_ram else "")


@dataclass(frozen=True)
class Policy:
    cpu_moe: bool = False  # every routed expert stays off the GPU
    n_cpu_moe: int | None = None  # experts of layers < N in RAM, of the other MoE layers on the GPU
    gpu_experts: int | None = None  # the N hottest experts of every MoE layer on the GPU
    routing_profile: dict[int, list[int]] | None = None  # MoE layer -> tokens routed to each expert
    include_mtp: bool = True  # place the MTP module (for speculative decoding)
    allow_disk: bool = True  # experts that do not fit in RAM are read from disk
    prefill_chunk: int = 512  # tokens per prefill forward
    cuda_context_bytes: int = 768 * 2**20  # CUDA context, cuBLAS workspace, allocator slack
    ram_reserve_bytes: int | None = None  # OS and runtime; default 4 GiB + 2% of RAM
    mtp_acceptance: float = 0.85  # draft acceptance assumed for the MTP prediction
    costs: FixedCosts = field(default_factory=FixedCosts)


@dataclass(frozen=True)
class GroupPlacement:
    name: str
    kind: str
    layer: int | None
    device: str
    bytes: int
    experts: tuple[int, ...] | None = None  # routed_expert: the ids on this device

    def to_dict(self) -> dict:
        data = {"name": self.name, "kind": self.kind, "layer": self.layer, "device": self.device, "bytes": self.bytes}
        if self.experts is not None:
            data.update(count=len(self.experts), experts=list(self.experts))
        return data


@dataclass(frozen=True)
class DeviceUse:
    name: str
    label: str
    capacity_bytes: int | None  # None: not a limit (disk: the weights are read from the model file)
    reserved_bytes: int  # headroom (and memory others already use)
    used_bytes: int

    @property
    def free_bytes(self) -> int | None:
        return None if self.capacity_bytes is None else self.capacity_bytes - self.reserved_bytes - self.used_bytes

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "label": self.label,
            "capacity_bytes": self.capacity_bytes,
            "reserved_bytes": self.reserved_bytes,
            "used_bytes": self.used_bytes,
        }


@dataclass(frozen=True)
class KVCachePlan:
    bytes_per_token: int  # over all cache layers placed
    context: int  # tokens reserved
    max_context: int  # longest context whose cache fits where it is, if GPU experts give way
    device_bytes: dict[str, int]

    @property
    def bytes(self) -> int:
        return self.bytes_per_token * self.context

    def to_dict(self) -> dict:
        return {
            "bytes_per_token": self.bytes_per_token,
            "context": self.context,
            "max_context": self.max_context,
            "bytes": self.bytes,
            "device_bytes": self.device_bytes,
        }


@dataclass(frozen=True)
class Plan:
    model: str
    hardware: Hardware
    quantization: Quantization
    layout: Layout  # what the runtime builds from
    devices: tuple[DeviceUse, ...]
    groups: tuple[GroupPlacement, ...]
    kv_cache: KVCachePlan
    predicted: Prediction
    notes: tuple[str, ...]
    parameters: ParameterCount  # of the layers placed
    bits_per_weight: dict[str, float]  # role (experts, dense, embeddings) -> average storage bits

    def device(self, name: str) -> DeviceUse | None:
        return next((d for d in self.devices if d.name == name), None)

    def summary(self) -> str:
        p = self.predicted
        experts = ", ".join(
            f"{n} on {d}" for d in (GPU, CPU, DISK) if (n := self.layout.count_experts(d))
        )
        resident = {g.device for g in self.groups if g.kind != "routed_expert"}
        where = " and ".join(place for device, place in ((GPU, "on the GPU"), (CPU, "in RAM")) if device in resident)
        expert_part = f"; routed experts: {experts}" if experts else ""
        return (
            f"{self.model}: non-expert weights and the KV cache for {self.kv_cache.context} tokens {where}{expert_part}; "
            f"~{p.decode_tok_s:.1f} tok/s decode, ~{p.prefill_tok_s:.0f} tok/s prefill, "
            f"bound by {p.bottleneck}"
        )

    def to_dict(self) -> dict:
        return {
            "model": self.model,
            "hardware": self.hardware.to_dict(),
            "quantization": self.quantization.to_dict(),
            "bits_per_weight": self.bits_per_weight,
            "parameters": self.parameters.to_dict(),
            "devices": [d.to_dict() for d in self.devices],
            "groups": [g.to_dict() for g in self.groups],
            "kv_cache": self.kv_cache.to_dict(),
            "predicted": self.predicted.to_dict(),
            "notes": list(self.notes),
            "summary": self.summary(),
        }


def plan(shape: ModelShape, quant: Quantization, hardware: Hardware, context: int, policy: Policy = Policy()) -> Plan:
    _check_request(shape, hardware, context, policy)
    planner = _Planner(shape, quant, hardware, policy)
    try:
        layout = planner.layout(context)
    except _DoesNotFit as failure:
        raise planner.refusal(context, failure) from None
    return planner.plan(layout, context)


def expert_probabilities(shape: ModelShape, routing_profile: dict[int, list[int]] | None) -> dict[int, list[float]]:
    """Per MoE layer, the probability that a token picks each expert: from the profile's counts,
    else uniform (num_experts_per_tok / n_routed_experts)."""
    k, n = shape.experts_per_token, shape.n_routed_experts
    profile = {int(layer): counts for layer, counts in (routing_profile or {}).items()}
    probabilities = {}
    for layer in shape.moe_layers:
        counts = profile.get(layer)
        if counts is None:
            probabilities[layer] = [k / n] * n
            continue
        if len(counts) != n or min(counts) < 0 or sum(counts) <= 0:
            raise PlanError(f"routing profile layer {layer}: needs {n} non-negative counts with a positive sum")
        total = sum(counts)
        probabilities[layer] = [min(1.0, k * c / total) for c in counts]
    return probabilities


# ----- internals -----------------------------------------------------------------------------
@dataclass(frozen=True)
class _Unit:
    """Resident groups placed together: a decoder layer (with its KV rows), the head, the embeddings."""

    label: str
    groups: tuple[TensorGroup, ...]
    layer: int | None = None


class _DoesNotFit(Exception):
    def __init__(self, reason: str, ram_shortfall: int = 0, fix: Fix | None = None):
        super().__init__(reason)
        self.reason = reason
        self.ram_shortfall = ram_shortfall
        self.fix = fix


class _Planner:
    def __init__(self, shape: ModelShape, quant: Quantization, hardware: Hardware, policy: Policy):
        self.shape, self.quant, self.hw, self.policy = shape, quant, hardware, policy
        self.layers = list(shape.layers if policy.include_mtp else range(shape.num_layers))
        self.units = self._units()
        self.probabilities = {
            layer: p for layer, p in expert_probabilities(shape, policy.routing_profile).items() if layer in self.layers
        }
        self.hot_order = sorted(
            ((layer, e) for layer, p in self.probabilities.items() for e in range(len(p))),
            key=lambda x: (shape.is_mtp_layer(x[0]), -self.probabilities[x[0]][x[1]], x[0], x[1]),
        )
        self.hot_per_layer: dict[int, list[int]] = {layer: [] for layer in self.probabilities}
        for layer, e in self.hot_order:
            self.hot_per_layer[layer].append(e)
        self.expert_bytes = {
            layer: shape.group("routed_expert", layer).unit_bytes(quant) for layer in self.probabilities
        }

    # ----- budgets ---------------------------------------------------------------------------
    def gpu_reserve(self, context: int) -> int:
        if not self.hw.has_gpu:
            return 0
        return self.policy.cuda_context_bytes + self.shape.activation_bytes(min(self.policy.prefill_chunk, context))

    def ram_reserve(self, context: int) -> int:
        reserve = self.policy.ram_reserve_bytes
        if reserve is None:
            reserve = 4 * GiB + self.hw.ram_bytes // 50
        if not self.hw.has_gpu:
            reserve += self.shape.activation_bytes(min(self.policy.prefill_chunk, context))
        return reserve

    def gpu_budget(self, context: int) -> int:
        return max(self.hw.gpu_free_bytes - self.gpu_reserve(context), 0) if self.hw.has_gpu else 0

    def ram_budget(self, context: int) -> int:
        return max(self.hw.ram_available_bytes - self.ram_reserve(context), 0)

    # ----- sizes -----------------------------------------------------------------------------
    def _units(self) -> list[_Unit]:
        """Resident units in the order they claim the GPU."""
        s = self.shape
        layers = [
            _Unit(f"{'MTP layer' if s.is_mtp_layer(i) else 'layer'} {i}", self._resident_groups(i), i)
            for i in self.layers
        ]
        main, mtp = layers[: s.num_layers], layers[s.num_layers :]
        head = _Unit("lm_head", (s.group("norm"), s.group("lm_head")))
        return main + [head] + mtp + [_Unit("embeddings", (s.group("embedding"),))]

    def _resident_groups(self, layer: int) -> tuple[TensorGroup, ...]:
        return tuple(g for g in self.shape.layer_groups(layer) if g.kind != "routed_expert")

    def unit_bytes(self, unit: _Unit, context: int) -> int:
        kv = context * self.shape.kv_bytes_per_token_per_layer if unit.layer is not None else 0
        return sum(g.bytes(self.quant) for g in unit.groups) + kv

    # ----- placement ---------------------------------------------------------------------------
    def layout(self, context: int) -> Layout:
        gpu_free, ram_free = self.gpu_budget(context), self.ram_budget(context)
        unit_devices = {}
        for unit in self.units:
            need = self.unit_bytes(unit, context)
            if self.hw.has_gpu and need <= gpu_free:
                unit_devices[unit.label], gpu_free = GPU, gpu_free - need
            else:
                unit_devices[unit.label], ram_free = CPU, ram_free - need
        if ram_free < 0:
            on_cpu = sum(self.unit_bytes(u, context) for u in self.units if unit_devices[u.label] == CPU)
            gpu_part = " beyond what the GPU holds" if self.hw.has_gpu else ""
            raise _DoesNotFit(
                f"the non-expert weights and the KV cache for {context} tokens need {format_bytes(on_cpu)} of RAM"
                f"{gpu_part}, but {format_bytes(self.ram_budget(context))} is usable",
                ram_shortfall=-ram_free,
            )
        expert_devices = self._place_experts(gpu_free, ram_free)
        by_layer = {u.layer: unit_devices[u.label] for u in self.units if u.layer is not None}
        return Layout(
            layer_devices=tuple(by_layer[layer] for layer in self.layers),
            expert_devices=expert_devices,
            head_device=unit_devices["lm_head"],
            embedding_device=unit_devices.get("embeddings", unit_devices["lm_head"]),
        )

    def _place_experts(self, gpu_free: int, ram_free: int) -> dict[int, tuple[str, ...]]:
        on_gpu = self._gpu_experts(gpu_free)
        devices = {layer: [CPU] * len(p) for layer, p in self.probabilities.items()}
        for layer, e in on_gpu:
            devices[layer][e] = GPU
        spilled = []
        for layer, e in self.hot_order:
            if devices[layer][e] == GPU:
                continue
            size = self.expert_bytes[layer]
            if size <= ram_free:
                ram_free -= size
            else:
                devices[layer][e] = DISK
                spilled.append(size)
        if spilled and not self.policy.allow_disk:
            raise _DoesNotFit(
                f"{len(spilled)} routed experts ({format_bytes(sum(spilled))}) do not fit in RAM "
                "and experts may not be read from disk",
                ram_shortfall=sum(spilled),
            )
        return {layer: tuple(d) for layer, d in devices.items()}

    def _gpu_experts(self, gpu_free: int) -> list[tuple[int, int]]:
        policy = self.policy
        if not self.hw.has_gpu or policy.cpu_moe:
            return []
        if policy.n_cpu_moe is not None:  # a larger N puts fewer experts on the GPU
            fewer = range(policy.n_cpu_moe + 1, max(self.probabilities) + 2)
            return self._fixed_gpu_experts(gpu_free, "n_cpu_moe", policy.n_cpu_moe, self._layers_from, fewer)
        if policy.gpu_experts is not None:  # a smaller N does
            fewer = range(policy.gpu_experts - 1, -1, -1)
            return self._fixed_gpu_experts(gpu_free, "gpu_experts", policy.gpu_experts, self._hottest_per_layer, fewer)
        chosen = []
        for layer, e in self.hot_order:
            size = self.expert_bytes[layer]
            if size > gpu_free:
                break
            chosen.append((layer, e))
            gpu_free -= size
        return chosen

    def _layers_from(self, first: int) -> list[tuple[int, int]]:
        return [(layer, e) for layer, p in self.probabilities.items() if layer >= first for e in range(len(p))]

    def _hottest_per_layer(self, n: int) -> list[tuple[int, int]]:
        return [(layer, e) for layer, hottest in self.hot_per_layer.items() for e in hottest[:n]]

    def _fixed_gpu_experts(
        self, gpu_free: int, setting: str, value: int, chosen_by: Callable[[int], list[tuple[int, int]]], fewer: Iterable[int]
    ) -> list[tuple[int, int]]:
        """The experts `chosen_by(value)` puts on the GPU, or the refusal naming the first of the
        `fewer` values whose experts fit."""
        wanted = chosen_by(value)
        need = sum(self.expert_bytes[layer] for layer, _ in wanted)
        if need <= gpu_free:
            return wanted
        fit = next(n for n in fewer if sum(self.expert_bytes[layer] for layer, _ in chosen_by(n)) <= gpu_free)
        raise _DoesNotFit(
            f"{setting} {value} puts {len(wanted)} routed experts ({format_bytes(need)}) on the GPU, but "
            f"{format_bytes(gpu_free)} is free after the non-expert weights and the KV cache",
            fix=Fix(setting, fit),
        )

    # ----- refusal ---------------------------------------------------------------------------
    def refusal(self, context: int, failure: _DoesNotFit) -> PlanError:
        reason = f"{self.shape.name} does not fit: {failure.reason}"
        if failure.fix:
            return PlanError(reason, fix=failure.fix)
        shorter = self._longest_fitting_context(context)
        if shorter >= min(USEFUL_CONTEXT, context):
            fix = Fix("context", shorter)
        else:
            fix = self._lower_quantisation(context)
        if fix is None and not self.policy.allow_disk and self._fits(context, replace(self.policy, allow_disk=True)):
            fix = Fix("allow_disk", True)
        return PlanError(reason, fix=fix, more_ram=failure.ram_shortfall)

    def _fits(self, context: int, policy: Policy | None = None, quant: Quantization | None = None) -> bool:
        if policy is None and quant is None:
            planner = self
        else:
            planner = _Planner(self.shape, quant or self.quant, self.hw, policy or self.policy)
        try:
            planner.layout(context)
            return True
        except _DoesNotFit:
            return False

    def _longest_fitting_context(self, context: int) -> int:
        low, high = 0, context - 1  # low fits (or is 0), high is the largest candidate
        while low < high:
            middle = (low + high + 1) // 2
            if self._fits(middle):
                low = middle
            else:
                high = middle - 1
        return low

    def _lower_quantisation(self, context: int) -> Fix | None:
        """The first single-role step down that fits: experts, then dense, then embeddings (a
        role whose formats a file fixes: any quantised scheme that fits)."""
        for role in ROLES:
            current = "bf16" if self.quant.stores(role) else getattr(self.quant, role)
            for lower in LOWER_QUANT.get(current, ()):
                if lower in ROLE_SCHEMES[role] and self._fits(context, quant=self.quant.with_scheme(role, lower)):
                    return Fix(role, lower)
        return None

    # ----- the plan ----------------------------------------------------------------------------
    def plan(self, layout: Layout, context: int) -> Plan:
        groups = tuple(self._placements(layout, context))
        kv_device_bytes: dict[str, int] = {}
        for g in groups:
            if g.kind == "kv_cache":
                kv_device_bytes[g.device] = kv_device_bytes.get(g.device, 0) + g.bytes
        kv = KVCachePlan(
            bytes_per_token=self.shape.kv_bytes_per_token_per_layer * len(self.layers),
            context=context,
            max_context=self._max_context(layout, groups, context),
            device_bytes=kv_device_bytes,
        )
        roofline = Roofline(self.shape, self.quant, self.hw, self.probabilities, self.policy.costs)
        predicted = roofline.predict(layout, context, self.policy.prefill_chunk, self.policy.mtp_acceptance)
        return Plan(
            model=self.shape.name,
            hardware=self.hw,
            quantization=self.quant,
            layout=layout,
            devices=self._devices(groups, context),
            groups=groups,
            kv_cache=kv,
            predicted=predicted,
            notes=tuple(self._notes(layout, predicted)),
            parameters=self.shape.parameter_count(self.policy.include_mtp),
            bits_per_weight={role: self.shape.bits_per_weight(self.quant, role) for role in ROLES},
        )

    def _placements(self, layout: Layout, context: int):
        layer_device = dict(zip(self.layers, layout.layer_devices))
        device_of_unit = {"lm_head": layout.head_device, "embeddings": layout.embedding_device}
        device_of_group = {
            g.name: layer_device[u.layer] if u.layer is not None else device_of_unit[u.label]
            for u in self.units
            for g in u.groups
        }
        for g in self.shape.groups:
            if g.layer is not None and g.layer not in self.layers:
                continue  # the MTP module, left out
            if g.kind == "routed_expert":
                for device in (GPU, CPU, DISK):
                    ids = tuple(layout.experts_on(g.layer, device))
                    if ids:
                        yield GroupPlacement(g.name, g.kind, g.layer, device, len(ids) * g.unit_bytes(self.quant), ids)
                continue
            device = device_of_group[g.name]
            yield GroupPlacement(g.name, g.kind, g.layer, device, g.bytes(self.quant))
            if g.kind == "attention":
                kv_bytes = context * self.shape.kv_bytes_per_token_per_layer
                yield GroupPlacement(f"kv_cache.layers.{g.layer}", "kv_cache", g.layer, device, kv_bytes)

    def _devices(self, groups: tuple[GroupPlacement, ...], context: int) -> tuple[DeviceUse, ...]:
        used = {d: sum(g.bytes for g in groups if g.device == d) for d in (GPU, CPU, DISK)}
        hw = self.hw
        devices = []
        if hw.has_gpu:
            others = hw.gpu_mem_bytes - hw.gpu_free_bytes
            devices.append(DeviceUse(GPU, hw.gpu_name, hw.gpu_mem_bytes, others + self.gpu_reserve(context), used[GPU]))
        others = hw.ram_bytes - hw.ram_available_bytes
        devices.append(DeviceUse(CPU, hw.cpu_name, hw.ram_bytes, others + self.ram_reserve(context), used[CPU]))
        if used[DISK]:
            devices.append(DeviceUse(DISK, "memory-mapped model file", None, 0, used[DISK]))
        return tuple(devices)

    def _max_context(self, layout: Layout, groups: tuple[GroupPlacement, ...], context: int) -> int:
        """Longest context whose cache fits on the devices holding it, with the placement kept
        and GPU-resident experts giving way."""
        spare = {
            GPU: self.gpu_budget(context) - sum(g.bytes for g in groups if g.device == GPU and g.kind != "routed_expert"),
            CPU: self.ram_budget(context) - sum(g.bytes for g in groups if g.device == CPU),
        }
        extra = min(
            spare[device] // (self.shape.kv_bytes_per_token_per_layer * layout.layer_devices.count(device))
            for device in (GPU, CPU)
            if device in layout.layer_devices
        )
        return min(self.shape.max_position_embeddings, context + extra)

    def _notes(self, layout: Layout, predicted: Prediction) -> list[str]:
        notes = []
        cpu_layers = [layer for layer, d in zip(self.layers, layout.layer_devices) if d == CPU]
        if self.hw.has_gpu and cpu_layers:
            notes.append(f"the GPU is full: layers {layer_ranges(cpu_layers)} run attention on the CPU")
        if self.hw.has_gpu and layout.head_device == CPU:
            notes.append("the GPU is full: lm_head runs on the CPU")
        hot = layout.count_experts(GPU)
        if hot:
            whole = [layer for layer, d in layout.expert_devices.items() if set(d) == {GPU}]
            partial = [
                f"layer {layer}: {len(layout.experts_on(layer, GPU))} of {len(d)}"
                for layer, d in layout.expert_devices.items()
                if GPU in d and set(d) != {GPU}
            ]
            parts = ([f"all of layers {layer_ranges(whole)}"] if whole else []) + partial
            notes.append(f"{hot} routed experts on the GPU ({'; '.join(parts)})")
        spilled = layout.count_experts(DISK)
        if spilled:
            size = sum(self.expert_bytes[layer] for layer, d in layout.expert_devices.items() for x in d if x == DISK)
            notes.append(
                f"{spilled} routed experts ({format_bytes(size)}) do not fit in RAM and are read from disk per use: "
                f"~{predicted.decode_tok_s:.2f} tok/s instead of ~{predicted.decode_tok_s_all_in_ram:.1f} tok/s "
                f"with {format_bytes(size)} more RAM"
            )
        if predicted.mtp_decode_tok_s is not None:
            verdict = "pays" if predicted.mtp_decode_tok_s > predicted.decode_tok_s else "does not pay"
            notes.append(
                f"MTP speculation at {predicted.mtp_acceptance:.0%} acceptance: "
                f"~{predicted.mtp_decode_tok_s:.1f} tok/s decode ({verdict})"
            )
        return notes


def _check_request(shape: ModelShape, hardware: Hardware, context: int, policy: Policy) -> None:
    if context < 1:
        raise PlanError("a context holds at least one token", "context", context)
    if context > shape.max_position_embeddings:
        raise PlanError(
            f"longer than {shape.name} supports (max_position_embeddings {shape.max_position_embeddings})",
            "context",
            context,
            fix=Fix("context", shape.max_position_embeddings),
        )
    given = {"cpu_moe": policy.cpu_moe, "n_cpu_moe": policy.n_cpu_moe is not None, "gpu_experts": policy.gpu_experts is not None}
    overrides = [setting for setting, on in given.items() if on]
    if len(overrides) > 1:
        raise PlanError(" and ".join(f"{{{setting}}}" for setting in overrides) + " contradict each other; give one")
    for setting in ("n_cpu_moe", "gpu_experts"):
        value = getattr(policy, setting)
        if value is not None and value < 0:
            raise PlanError("must not be negative", setting, value)
    if policy.gpu_experts is not None and policy.gpu_experts > shape.n_routed_experts:
        raise PlanError(f"{shape.name} has {shape.n_routed_experts} experts per layer", "gpu_experts", policy.gpu_experts)
    if overrides and overrides != ["cpu_moe"] and not hardware.has_gpu:
        setting = overrides[0]
        raise PlanError("places experts on the GPU, but this hardware has no GPU", setting, getattr(policy, setting))
    if policy.prefill_chunk < 1 or not 0.0 <= policy.mtp_acceptance <= 1.0:
        raise PlanError("the prefill chunk must be positive and the MTP acceptance between 0 and 1")


def layer_ranges(numbers: list[int]) -> str:
    """[3, 4, 5, 9] -> '3-5, 9'."""
    spans: list[list[int]] = []
    for n in numbers:
        if spans and n == spans[-1][1] + 1:
            spans[-1][1] = n
        else:
            spans.append([n, n])
    return ", ".join(f"{a}-{b}" if a != b else f"{a}" for a, b in spans)
