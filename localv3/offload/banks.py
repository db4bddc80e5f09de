"""Expert banks for one MoE layer whose routed experts live on several devices, behind the one
bank interface of localv3.model.moe: `forward(x [T, D], indices [T, k], weights [T, k]) -> [T, D]`.

- `BankSlice`: a bank holding some of a layer's experts, numbered 0..n-1 inside it, seen
  through the layer's expert ids: it takes the (token, slot) pairs routed to its experts on its
  own device and returns their weighted outputs on the caller's device.
- `DiskExpertBank`: experts left in the checkpoint file, read memory-mapped on every use.
- `PlacedExperts`: a layer's slices plus its shared expert (the runtime moves the shared expert
  in here, out of `MoE.shared_experts`), summed on the layer's device. When the layer runs on a
  CUDA device and some slices on the host, the host slices run in a worker thread on pinned,
  non-blocking copies while the GPU computes its own experts and the shared expert; on any
  other device everything runs in turn on the calling thread.
"""

from __future__ import annotations

import functools
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn.functional as F
from torch import nn

from localv3.checkpoint import CheckpointReader
from localv3.loader import EXPERT_PROJECTIONS, expert_tensor_names
from localv3.model.moe import run_experts
from localv3.formats.table import BlockType
from localv3.quantized import read_quantized


class BankSlice(nn.Module):
    def __init__(self, bank: nn.Module, expert_ids: list[int], n_experts: int, device: torch.device | str):
        super().__init__()
        self.bank = bank
        self.device = torch.device(device)
        self.expert_ids = list(expert_ids)
        self.whole = self.expert_ids == list(range(n_experts))  # the bank's ids are the layer's
        local_of = torch.full((n_experts,), -1, dtype=torch.long)  # [E]: the bank's id, -1 if elsewhere
        local_of[self.expert_ids] = torch.arange(len(self.expert_ids))
        self._local_of = {local_of.device: local_of}  # per device the routing runs on

    def forward(self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x [T, D], indices/weights [T, k] on one device -> this slice's share of the output [T, D] there."""
        if self.whole and x.device == self.device:
            return self.bank(x, indices, weights)
        if self.whole:
            y = self.bank(x.to(self.device), indices.to(self.device), weights.to(self.device))
            return y.to(x.device)
        local = self._table(indices.device)[indices]  # [T, k]
        token, slot = (local >= 0).nonzero(as_tuple=True)  # [N] each: the pairs routed here
        out = torch.zeros_like(x)
        if token.numel() == 0:
            return out
        rows = x[token].to(self.device)  # [N, D], one row per pair
        chosen = local[token, slot, None].to(self.device)  # [N, 1]
        weight = weights[token, slot, None].to(self.device)  # [N, 1]
        return out.index_add_(0, token, self.bank(rows, chosen, weight).to(x.device))

    def _table(self, device: torch.device) -> torch.Tensor:
        if device not in self._local_of:
            self._local_of[device] = next(iter(self._local_of.values())).to(device)
        return self._local_of[device]

    def extra_repr(self) -> str:
        return f"device={self.device}, experts={len(self.expert_ids)}"


class DiskExpertBank(nn.Module):
    """Routed experts read from the checkpoint (memory-mapped) each time they run, dequantised
    (FP8 blocks, or the block types of a localv3 checkpoint: `stored`, for gate/up and for down)
    to the activations' dtype: nothing of them stays in RAM but the page cache."""

    def __init__(
        self,
        reader: CheckpointReader,
        prefix: str,
        expert_ids: list[int],
        dim: int,
        hidden: int,
        stored: tuple[BlockType, BlockType] | None = None,
    ):
        super().__init__()
        self.reader = reader
        self.prefix = prefix  # model.layers.{i}.mlp.experts
        self.expert_ids = list(expert_ids)
        self.dim, self.hidden = dim, hidden
        self.stored = stored

    def forward(self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return run_experts(x, indices, weights, self.expert_forward)

    def expert_forward(self, expert: int, x: torch.Tensor) -> torch.Tensor:
        names = expert_tensor_names(self.prefix, self.expert_ids[expert])
        gate, up, down = (self._read(names[p], x.dtype, p == "down_proj") for p in EXPERT_PROJECTIONS)
        return F.linear(F.silu(F.linear(x, gate)) * F.linear(x, up), down)  # [N, D]

    def _read(self, weight_name: str, dtype: torch.dtype, is_down: bool) -> torch.Tensor:
        if self.stored is None:
            return self.reader.get(weight_name, dtype)
        in_features = self.hidden if is_down else self.dim
        return read_quantized(self.reader, weight_name, self.stored[is_down], in_features).dequantize(dtype)

    def extra_repr(self) -> str:
        return f"{self.prefix}, experts={len(self.expert_ids)}, read per use"


class PlacedExperts(nn.Module):
    """The routed experts of one MoE layer over several banks, plus the layer's shared expert."""

    def __init__(self, slices: list[BankSlice], shared: nn.Module | None):
        super().__init__()
        self.slices = nn.ModuleList(slices)
        self.shared = shared
        self.stage = PinnedStage()

    def forward(self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        host = [s for s in self.slices if s.device.type == "cpu"]
        if x.device.type == "cuda" and host:
            return self._overlapped(x, indices, weights, host)
        out = self._sum(self.slices, x, indices, weights)
        return out if self.shared is None else out + self.shared(x)

    @staticmethod
    def _sum(slices, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        if len(slices) == 1:
            return slices[0](x, indices, weights)
        out = torch.zeros_like(x)  # [T, D]
        for s in slices:
            out = out + s(x, indices, weights)
        return out

    def _overlapped(self, x, indices, weights, host: list[BankSlice]) -> torch.Tensor:
        """CUDA: host slices in the worker thread, GPU slices and the shared expert meanwhile."""
        x_h = self.stage.to_host("x", x)
        indices_h = self.stage.to_host("indices", indices)
        weights_h = self.stage.to_host("weights", weights)
        copied = torch.cuda.Event()
        copied.record(torch.cuda.current_stream(x.device))
        modes = (torch.is_inference_mode_enabled(), torch.is_grad_enabled())
        future = host_executor().submit(self._host_part, host, copied, modes, x_h, indices_h, weights_h)
        out = self._sum([s for s in self.slices if s not in host], x, indices, weights)
        if self.shared is not None:
            out = out + self.shared(x)
        return out + future.result().to(x.device, non_blocking=True)

    def _host_part(self, host, copied, modes, x_h, indices_h, weights_h) -> torch.Tensor:
        """Worker thread: the host slices' sum [T, D], left in a pinned buffer."""
        inference, grad = modes
        copied.synchronize()
        with torch.inference_mode(inference), torch.set_grad_enabled(grad):
            return self.stage.hold("out", self._sum(host, x_h, indices_h, weights_h))


class PinnedStage:
    """Reusable pinned host buffers, one per name, grown as needed. Reuse is safe: a buffer is
    refilled only by copies queued on the stream after the last copy out of it."""

    def __init__(self):
        self.buffers: dict[str, torch.Tensor] = {}

    def _buffer(self, name: str, like: torch.Tensor) -> torch.Tensor:
        buffer = self.buffers.get(name)
        if buffer is None or buffer.numel() < like.numel() or buffer.dtype != like.dtype:
            with torch.inference_mode(False):  # a normal tensor: writable in and out of inference mode
                buffer = self.buffers[name] = torch.empty(like.numel(), dtype=like.dtype, pin_memory=True)
        return buffer[: like.numel()].view(like.shape)

    def to_host(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """A non-blocking device -> host copy (wait on an event recorded after it)."""
        return self._buffer(name, tensor).copy_(tensor, non_blocking=True)

    def hold(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """A host tensor copied into pinned memory, ready for a non-blocking copy to the device."""
        return self._buffer(name, tensor).copy_(tensor)


@functools.cache
def host_executor() -> ThreadPoolExecutor:
    """The one worker thread that runs host-resident experts while the GPU works."""
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="localv3-host-experts")
