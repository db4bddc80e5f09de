"""torch modules over block-quantised weights: a linear layer, a SwiGLU MLP and a routed-expert
bank. On the CPU localv3's own kernels (localv3.kernels.products) take every call they can: a
decode-sized call (a few tokens; weights read near the memory bandwidth), a prompt chunk of a
block type the panel kernels have (AVX-512 VNNI: Q4_K, Q6_K, Q8_0), routed experts that get few
rows each. The other calls run ggml's (one ggml graph per call, built once per token count), as
does any call of a block type ours lack; elsewhere (a GPU) the weights are dequantised in torch
on each call.

benchmarks/expert_kernels.py has the table: on the 2-core development machine 8 of a V3 layer's
Q4_K experts at one token are read at 74-96% of the read bandwidth by our kernels (by the
minute's speed of the VM), 41-51% by ggml's, where torch's int4/int8 kernels were compute-bound
at 5-11 GB/s; at 256 tokens ours compute 302 GFLOP/s, ggml's 183.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from localv3.files import warn
from localv3.formats import ggml
from localv3.formats.blocks import QuantizedWeight, dequantize_rows, quantize_to
from localv3.formats.table import BLOCK_TYPES, BlockType, QuantError
from localv3.kernels import products
from localv3.model.moe import run_experts

ACTIVATIONS = torch.float32  # what the ggml graphs take in and give out


def _uses_ggml(device: torch.device) -> bool:
    if device.type != "cpu":
        return False
    if ggml.available():
        return True
    _warn_slow_path()
    return False


def runs_blocks(block_type: BlockType, device: torch.device) -> bool:
    """Whether the modules here compute over `block_type` blocks on `device`: ggml's CPU kernels
    take every ggml type; elsewhere only the block types torch dequantises (BLOCK_TYPES)."""
    return (device.type == "cpu" and ggml.available()) or block_type.name in BLOCK_TYPES


@functools.cache
def _warn_slow_path() -> None:
    warn(
        "llama-cpp-python is not installed, so quantised weights are dequantised on every call "
        "(slow); pip install 'localv3[llama]' for ggml's CPU kernels"
    )


class QuantMatrices(nn.Module):
    """`count` block-quantised [out, in] matrices of one shape: `data` uint8 [count, out, row_bytes].

    `data` is allocated and filled by `store`, or given: e.g. a read-only view of a memory-mapped
    file, which nothing here writes to (ggml reads weights; `store` is for allocated matrices)."""

    def __init__(
        self, block_type: BlockType, count: int, out_features: int, in_features: int, device="cpu", data: torch.Tensor | None = None
    ):
        super().__init__()
        if in_features % block_type.block:
            raise QuantError(f"input dimension {in_features} is not a multiple of the {block_type.name} block size {block_type.block}")
        self.block_type = block_type
        self.out_features, self.in_features = out_features, in_features
        shape = (count, out_features, block_type.row_bytes(in_features))
        if data is None:
            data = torch.empty(shape, dtype=torch.uint8, device=device)
        elif data.dtype != torch.uint8 or tuple(data.shape) != shape:
            raise QuantError(f"{block_type.name} matrices {list(shape)} cannot view {data.dtype} {list(data.shape)}")
        self.register_buffer("data", data)

    def store(self, index: int, weight: QuantizedWeight) -> None:
        if weight.shape != (self.out_features, self.in_features) or weight.block_type != self.block_type:
            raise QuantError(
                f"cannot store a {weight.block_type.name} {list(weight.shape)} weight in "
                f"{self.block_type.name} [{self.out_features}, {self.in_features}] matrices"
            )
        self.data[index].copy_(weight.data)

    def dense(self, index: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dequantised matrix [out, in]."""
        return dequantize_rows(self.data[index], self.block_type, self.in_features).to(dtype)

    def ggml_tensor(self, graph: ggml.Graph, index: int | None = None) -> int:
        """Matrix `index` ([in, out] in ggml order), or all of them ([in, out, count])."""
        if index is None:
            count = self.data.shape[0]
            return graph.tensor_from(self.data, self.block_type.ggml_type, (self.in_features, self.out_features, count))
        return graph.tensor_from(self.data[index], self.block_type.ggml_type, (self.in_features, self.out_features))

    def extra_repr(self) -> str:
        return f"{self.data.shape[0]} x [{self.out_features}, {self.in_features}] {self.block_type.name}"


class _Staged:
    """One built graph with its torch-side input and output tensors."""

    def __init__(self, graph: ggml.Graph, inputs: dict[str, torch.Tensor], output: torch.Tensor):
        self.graph, self.inputs, self.output = graph, inputs, output


class _GraphModule(nn.Module):
    """A module computed by ggml graphs on the CPU, one per token count (rebuilt if its weights
    move); subclasses say how to build one."""

    def __init__(self):
        super().__init__()
        self._graphs = ggml.GraphCache(self._build, lambda staged: staged.graph.held_bytes)
        self._built_for: int | None = None  # data pointer the cached graphs were built over

    def _compute(self, key, weights: torch.Tensor, **inputs: torch.Tensor) -> torch.Tensor:
        """Run the graph for `key` (built over `weights`) on `inputs`: its output buffer, which
        the next call with the same key overwrites."""
        if self._built_for != weights.data_ptr():
            self._graphs.clear()
            self._built_for = weights.data_ptr()
        staged = self._graphs.get(key)
        for name, value in inputs.items():
            staged.inputs[name].copy_(value)
        staged.graph.compute()
        return staged.output

    def _build(self, key) -> _Staged:
        raise NotImplementedError


class QuantLinear(_GraphModule):
    """A drop-in for nn.Linear (no weight attribute) holding a block-quantised weight."""

    def __init__(self, in_features: int, out_features: int, block_type: BlockType, bias: bool = False, device="cpu"):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.matrices = QuantMatrices(block_type, 1, out_features, in_features, device)
        self.bias = nn.Parameter(torch.zeros(out_features, device=device), requires_grad=False) if bias else None

    @classmethod
    def from_weight(cls, weight: QuantizedWeight, bias: torch.Tensor | None = None, device="cpu") -> QuantLinear:
        out_features, in_features = weight.shape
        module = cls(in_features, out_features, weight.block_type, bias is not None, device)
        module.matrices.store(0, _moved(weight, device))
        if bias is not None:
            module.bias.data.copy_(bias)
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)  # [T, in]
        if not flat.shape[0]:  # no rows (logits of none of a draft's positions): no graph to build
            y = flat.new_empty(0, self.out_features)
        elif flat.device.type == "cpu" and (y := products.matmul(self.matrices.data[0], self.matrices.block_type, self.in_features, flat)) is not None:
            y = y.to(x.dtype)  # [T, out]
        elif _uses_ggml(flat.device):
            y = self._compute(flat.shape[0], self.matrices.data, x=flat).to(x.dtype, copy=True)  # [T, out]
        else:
            y = F.linear(flat, self.matrices.dense(0, flat.dtype))
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.view(*x.shape[:-1], self.out_features)

    def _build(self, tokens: int) -> _Staged:
        graph = ggml.Graph()
        x = torch.empty(tokens, self.in_features, dtype=ACTIVATIONS)
        out = torch.empty(tokens, self.out_features, dtype=ACTIVATIONS)
        product = graph.mul_mat(self.matrices.ggml_tensor(graph, 0), graph.tensor_from(x))  # [out, T]
        graph.finish([(product, out)])
        return _Staged(graph, {"x": x}, out)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, {self.matrices.block_type.name}"


def _gate_up(gate: QuantizedWeight, up: QuantizedWeight) -> QuantizedWeight:
    """Gate rows then up rows: block rows stack as the rows they hold."""
    return QuantizedWeight(torch.cat([gate.data, up.data]), gate.block_type, gate.in_features)


class QuantFeedForward(_GraphModule):
    """SwiGLU MLP (dense FFN, shared expert) over block-quantised weights: one graph per call."""

    def __init__(self, gate: QuantizedWeight, up: QuantizedWeight, down: QuantizedWeight, device="cpu"):
        super().__init__()
        hidden, dim = gate.shape
        self.dim, self.hidden = dim, hidden
        self.gate_up = QuantMatrices(gate.block_type, 1, 2 * hidden, dim, device)
        self.down = QuantMatrices(down.block_type, 1, dim, hidden, device)
        self.gate_up.store(0, _moved(_gate_up(gate, up), device))
        self.down.store(0, _moved(down, device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.dim)  # [T, D]
        if flat.device.type == "cpu" and (y := self._own_kernels(flat)) is not None:
            y = y.to(x.dtype)  # [T, D]
        elif _uses_ggml(flat.device):
            y = self._compute(flat.shape[0], self.gate_up.data, x=flat).to(x.dtype, copy=True)  # [T, D]
        else:
            gate, up = F.linear(flat, self.gate_up.dense(0, flat.dtype)).chunk(2, dim=-1)
            y = F.linear(F.silu(gate) * up, self.down.dense(0, flat.dtype))
        return y.view(x.shape)

    def _own_kernels(self, flat: torch.Tensor) -> torch.Tensor | None:
        """The MLP as the one expert every token chooses with weight 1."""
        tokens = flat.shape[0]
        gate_up = self.gate_up.data  # [1, 2I, row bytes]
        return products.swiglu_experts(
            gate_up[:, : self.hidden], gate_up[:, self.hidden :], self.gate_up.block_type, self.down.data,
            self.down.block_type, flat, torch.zeros(tokens, 1, dtype=torch.int32), torch.ones(tokens, 1),
        )  # fmt: skip

    def _build(self, tokens: int) -> _Staged:
        graph = ggml.Graph()
        x = torch.empty(tokens, self.dim, dtype=ACTIVATIONS)
        out = torch.empty(tokens, self.dim, dtype=ACTIVATIONS)
        gate_up = graph.mul_mat(self.gate_up.ggml_tensor(graph, 0), graph.tensor_from(x))  # [2I, T]
        down = graph.mul_mat(self.down.ggml_tensor(graph, 0), graph.swiglu(gate_up))  # [D, T]
        graph.finish([(down, out)])
        return _Staged(graph, {"x": x}, out)


class QuantExpertBank(_GraphModule):
    """The routed experts of one layer, block-quantised: the DenseExpertBank interface.

    Built by copying (`store`): gate_up, E matrices [2 * I, D] (gate rows, then up rows), and
    down, E matrices [D, I]. Built over given matrices (`over`, e.g. a GGUF's memory-mapped
    ffn_*_exps): gate and up apart, and `slots` [E'] naming the matrix of each of the bank's
    experts (the given tensors may hold more experts than the bank serves). On the CPU one ggml
    graph runs every chosen expert of every token (mul_mat_id, swiglu, mul_mat_id) and torch
    sums the k outputs with the router weights; elsewhere each chosen expert runs once on its
    tokens, dequantised.
    """

    def __init__(self, n_experts: int, dim: int, hidden: int, gate_up_type: BlockType, down_type: BlockType, device="cpu"):
        super().__init__()
        self.dim, self.hidden = dim, hidden
        self.gate_up = QuantMatrices(gate_up_type, n_experts, 2 * hidden, dim, device)
        self.down = QuantMatrices(down_type, n_experts, dim, hidden, device)
        self.gate = self.up = None
        self.slots: torch.Tensor | None = None

    @classmethod
    def over(cls, gate: QuantMatrices, up: QuantMatrices, down: QuantMatrices, slots: list[int]) -> QuantExpertBank:
        """A bank of len(slots) experts, expert j being matrix slots[j] of gate, up and down
        (each [E, out, row_bytes]), which it views, never copies."""
        bank = cls.__new__(cls)
        _GraphModule.__init__(bank)
        bank.dim, bank.hidden = down.out_features, down.in_features
        bank.gate_up, bank.gate, bank.up, bank.down = None, gate, up, down
        bank.register_buffer("slots", torch.tensor(slots, dtype=torch.int32), persistent=False)
        return bank

    def store(self, expert: int, gate: QuantizedWeight, up: QuantizedWeight, down: QuantizedWeight) -> None:
        self.gate_up.store(expert, _moved(_gate_up(gate, up), self.gate_up.data.device))
        self.down.store(expert, _moved(down, self.down.data.device))

    def forward(self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x [T, D], indices/weights [T, k] -> [T, D]."""
        slots = indices if self.slots is None else self.slots[indices]  # [T, k]: the matrices chosen
        if x.device.type == "cpu" and (mixed := self._own_kernels(x, slots, weights)) is not None:
            return mixed.to(x.dtype)
        if not _uses_ggml(x.device):
            return run_experts(x, indices, weights, self.expert_forward)
        outputs = self._compute(indices.shape, self.down.data, x=x, ids=slots)  # [T, k, D]
        mixed = torch.bmm(weights.unsqueeze(1).to(ACTIVATIONS), outputs)  # [T, 1, D]
        return mixed.view(x.shape).to(x.dtype)

    def _own_kernels(self, x: torch.Tensor, slots: torch.Tensor, weights: torch.Tensor) -> torch.Tensor | None:
        if self.gate_up is not None:
            gate_type, gate, up = self.gate_up.block_type, self.gate_up.data[:, : self.hidden], self.gate_up.data[:, self.hidden :]
        elif self.gate.block_type == self.up.block_type:
            gate_type, gate, up = self.gate.block_type, self.gate.data, self.up.data
        else:
            return None
        return products.swiglu_experts(gate, up, gate_type, self.down.data, self.down.block_type, x, slots, weights)

    def _build(self, shape: tuple[int, int]) -> _Staged:
        tokens, k = shape
        graph = ggml.Graph()
        x = torch.empty(tokens, self.dim, dtype=ACTIVATIONS)
        ids = torch.empty(tokens, k, dtype=torch.int32)
        out = torch.empty(tokens, k, self.dim, dtype=ACTIVATIONS)
        x_t = graph.tensor_from(x, ne=(self.dim, 1, tokens))  # one row per token, shared by its k experts
        ids_t = graph.tensor_from(ids)  # [k, T]
        if self.gate_up is not None:
            hidden = graph.swiglu(graph.mul_mat_id(self.gate_up.ggml_tensor(graph), x_t, ids_t))  # [I, k, T]
        else:
            gate = graph.mul_mat_id(self.gate.ggml_tensor(graph), x_t, ids_t)  # [I, k, T]
            hidden = graph.swiglu_split(gate, graph.mul_mat_id(self.up.ggml_tensor(graph), x_t, ids_t))
        down = graph.mul_mat_id(self.down.ggml_tensor(graph), hidden, ids_t)  # [D, k, T]
        graph.finish([(down, out)])
        return _Staged(graph, {"x": x, "ids": ids}, out)

    def expert_forward(self, expert: int, x: torch.Tensor) -> torch.Tensor:
        """x [N, D] -> [N, D] through the bank's expert `expert`, dequantised."""
        if self.gate_up is not None:
            gate, up = F.linear(x, self.gate_up.dense(expert, x.dtype)).chunk(2, dim=-1)  # [N, I] each
            return F.linear(F.silu(gate) * up, self.down.dense(expert, x.dtype))  # [N, D]
        slot = int(self.slots[expert])
        gate, up = F.linear(x, self.gate.dense(slot, x.dtype)), F.linear(x, self.up.dense(slot, x.dtype))  # [N, I] each
        return F.linear(F.silu(gate) * up, self.down.dense(slot, x.dtype))  # [N, D]


class QuantHeadProjection(_GraphModule):
    """localv3.model.attention.HeadProjection over block-quantised weights: x [H, N, in] ->
    [H, N, out] with one ggml matrix product batched over the heads (MLA's absorbed W_UK, W_UV)."""

    def __init__(self, weight: torch.Tensor, block_type: BlockType, device="cpu"):
        """weight [H, out, in] (float)."""
        super().__init__()
        heads, out_features, in_features = weight.shape
        self.heads, self.out_features, self.in_features = heads, out_features, in_features
        self.matrices = QuantMatrices(block_type, heads, out_features, in_features, device)
        blocks = quantize_to(weight.reshape(heads * out_features, in_features), block_type).data  # [H*out, row bytes]
        self.matrices.data.copy_(blocks.view(heads, out_features, -1))

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.heads, self.out_features, self.in_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu" and (y := products.matmul(self.matrices.data, self.matrices.block_type, self.in_features, x)) is not None:
            return y.to(x.dtype)  # [H, N, out]
        if not _uses_ggml(x.device):
            return torch.bmm(x, self.dense_weight(x.dtype).transpose(1, 2))
        return self._compute(("per head", x.shape[1]), self.matrices.data, x=x).to(x.dtype, copy=True)  # [H, N, out]

    def every_head(self, x: torch.Tensor) -> torch.Tensor:
        """Every head's map of the same inputs, as one matrix of H * out rows: x [N, in] -> [N, H * out]."""
        every_row = self.matrices.data.view(-1, self.matrices.data.shape[-1])  # [H * out, row bytes]
        if x.device.type == "cpu" and (y := products.matmul(every_row, self.matrices.block_type, self.in_features, x)) is not None:
            return y.to(x.dtype)
        if not _uses_ggml(x.device):
            return F.linear(x, self.dense_weight(x.dtype).reshape(-1, self.in_features))
        return self._compute(("every head", x.shape[0]), self.matrices.data, x=x).to(x.dtype, copy=True)

    def transposed_rows(self, dtype: torch.dtype) -> torch.Tensor:
        """[H * in, out], dequantised: row h*in + i is weight[h, :, i] (on the CPU in one pass of
        localv3's kernels where they take the block type: V3's W_UK in 15 ms, not 49)."""
        if self.matrices.data.device.type == "cpu":
            rows = products.dequantize_transposed(self.matrices.data, self.matrices.block_type, self.in_features)
            if rows is not None:
                return rows.to(dtype)
        return self.dense_weight(dtype).transpose(1, 2).reshape(-1, self.out_features)

    def _build(self, key: tuple[str, int]) -> _Staged:
        layout, tokens = key
        graph = ggml.Graph()
        if layout == "per head":  # x [H, N, in] -> [H, N, out]
            x = torch.empty(self.heads, tokens, self.in_features, dtype=ACTIVATIONS)
            out = torch.empty(self.heads, tokens, self.out_features, dtype=ACTIVATIONS)
            weights = self.matrices.ggml_tensor(graph)  # [in, out, H]
        else:  # x [N, in] -> [N, H * out]
            x = torch.empty(tokens, self.in_features, dtype=ACTIVATIONS)
            out = torch.empty(tokens, self.heads * self.out_features, dtype=ACTIVATIONS)
            weights = graph.tensor_from(self.matrices.data, self.matrices.block_type.ggml_type, (self.in_features, self.heads * self.out_features))
        product = graph.mul_mat(weights, graph.tensor_from(x))
        graph.finish([(product, out)])
        return _Staged(graph, {"x": x}, out)

    def dense_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """[H, out, in] dequantised."""
        return dequantize_rows(self.matrices.data, self.matrices.block_type, self.in_features).to(dtype)


def _moved(weight: QuantizedWeight, device) -> QuantizedWeight:
    return QuantizedWeight(weight.data.to(device), weight.block_type, weight.in_features)
