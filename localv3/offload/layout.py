"""Where each part of a model lives: the part of a Plan that the runtime builds from.

Devices are `gpu`, `cpu`, or `disk` (routed experts only: memory-mapped, read per use).
A decoder layer's attention, norms, router, shared experts or dense FFN, and its rows of the
KV cache all live on the layer's device; its routed experts are placed one by one.
Layers are numbered as in the checkpoint: the main layers, then the MTP layers.
"""

from __future__ import annotations

from dataclasses import dataclass

GPU, CPU, DISK = "gpu", "cpu", "disk"


@dataclass(frozen=True)
class Layout:
    layer_devices: tuple[str, ...]  # per decoder layer placed (main, then MTP): also its KV cache rows
    expert_devices: dict[int, tuple[str, ...]]  # MoE layer -> device of each routed expert, by id
    head_device: str  # the final norm and lm_head
    embedding_device: str

    def experts_on(self, layer: int, device: str) -> list[int]:
        return [e for e, d in enumerate(self.expert_devices.get(layer, ())) if d == device]

    def count_experts(self, device: str) -> int:
        return sum(devices.count(device) for devices in self.expert_devices.values())
