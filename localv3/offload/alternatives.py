"""What would change a plan's speed: the same model planned again one step away (twice the RAM
bandwidth, a GPU with twice the memory or a GPU at all, the routed experts in q8 or q4), each
with its predicted decode tok/s, so that a plan also answers "what should I buy"."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from localv3.render import format_bytes
from localv3.offload.hardware import Hardware
from localv3.offload.layout import DISK
from localv3.offload.planner import Plan, PlanError, Policy, plan
from localv3.offload.profiles import load_profiles
from localv3.offload.quant import Quantization
from localv3.offload.shape import ModelShape
from localv3.offload.stated import StatedHardware
from localv3.offload.units import format_rate


@dataclass(frozen=True)
class Alternative:
    change: str  # "2x RAM bandwidth (922 GB/s)"
    decode_tok_s: float | None  # None: the model does not fit that way
    experts_on_disk: bool = False  # some routed experts would be read from disk

    def to_dict(self) -> dict:
        return {"change": self.change, "decode_tok_s": self.decode_tok_s, "experts_on_disk": self.experts_on_disk}


def what_would_change(result: Plan, shape: ModelShape, policy: Policy) -> tuple[Alternative, ...]:
    hw, quant, context = result.hardware, result.quantization, result.kv_cache.context
    variants = [
        (f"2x RAM bandwidth ({format_rate(2 * hw.cpu_bw)})", dataclasses.replace(hw, cpu_bw=2 * hw.cpu_bw), quant),
        _bigger_gpu(hw) + (quant,),
        _other_experts(quant, hw),
    ]
    return tuple(_alternative(change, shape, q, h, context, policy) for change, h, q in variants)


def _bigger_gpu(hw: Hardware) -> tuple[str, Hardware]:
    if not hw.has_gpu:
        default = load_profiles().default_gpu
        gpu = StatedHardware(gpu_mem=default.memory_bytes, gpu_bw=default.bandwidth).apply(hw)
        return f"a {format_bytes(default.memory_bytes)} GPU ({default.name})", gpu
    bigger = dataclasses.replace(hw, gpu_mem_bytes=2 * hw.gpu_mem_bytes, gpu_free_bytes=hw.gpu_free_bytes + hw.gpu_mem_bytes)
    return f"a {format_bytes(bigger.gpu_mem_bytes)} GPU", bigger


def _other_experts(quant: Quantization, hw: Hardware) -> tuple[str, Hardware, Quantization]:
    scheme = "q8" if quant.experts == "q4" and not quant.stores("experts") else "q4"
    return f"routed experts in {scheme}", hw, quant.with_scheme("experts", scheme)


def _alternative(change: str, shape: ModelShape, quant: Quantization, hw: Hardware, context: int, policy: Policy) -> Alternative:
    try:
        result = plan(shape, quant, hw, context, policy)
    except PlanError:
        return Alternative(change, None)
    return Alternative(change, result.predicted.decode_tok_s, bool(result.layout.count_experts(DISK)))
