"""Activations cross devices where a layout splits the model: a forward pre-hook on each module
that starts a new device moves its tensor inputs there, so the model code never names a device.

The stages, in the order a token flows: embeddings -> decoder layers -> final norm -> lm_head;
each MTP head takes the final-normed hidden state (the head's device) and embeddings (the
embeddings' device) and hands its hidden state to lm_head. Token ids start on the host. Where
every stage is on the CPU no hook is added, and the forward pass runs as the bare model would.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from localv3.model.transformer import Transformer

HOST = torch.device("cpu")


@dataclass(frozen=True)
class StageDevices:
    embeddings: torch.device
    layers: list[torch.device]  # the main decoder layers, in order
    mtp: list[torch.device]  # the MTP heads, in order
    head: torch.device  # final norm and lm_head


def _moved(value, device: torch.device):
    """A tensor, or a tuple of them (RoPE's cos/sin), on `device`; anything else as it is."""
    if isinstance(value, torch.Tensor):
        return value.to(device, non_blocking=True)
    if isinstance(value, tuple):
        return tuple(_moved(item, device) for item in value)
    return value


def move_inputs(module: nn.Module, device: torch.device) -> None:
    """Every call of `module` first moves its positional tensor inputs to `device`."""

    def to_device(_module: nn.Module, args: tuple) -> tuple:
        return tuple(_moved(arg, device) for arg in args)

    module.register_forward_pre_hook(to_device)


def add_device_hops(model: Transformer, stages: StageDevices) -> list[str]:
    """Hook the modules where the device changes; returns their names (for tests and logs)."""
    hooked = []

    def hop(name: str, device: torch.device) -> None:
        move_inputs(model.get_submodule(name), device)
        hooked.append(name)

    if stages.embeddings != HOST:  # token ids are made on the host
        hop("model.embed_tokens", stages.embeddings)
    previous = stages.embeddings
    for i, device in enumerate(stages.layers):
        if device != previous:
            hop(f"model.layers.{i}", device)
        previous = device
    if stages.head != previous:
        hop("model.norm", stages.head)
    for j, device in enumerate(stages.mtp):
        if device != stages.head or device != stages.embeddings:
            hop(f"mtp.{j}", device)
    if any(device != stages.head for device in stages.mtp):
        hop("lm_head", stages.head)
    return hooked
