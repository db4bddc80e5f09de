"""ggml's CPU kernels through its public C API (ctypes over the libggml that llama-cpp-python
ships), for matrices stored in ggml block types (Q8_0, Q4_K, ...).

Why ggml: its quantised dot products (activations quantised to 8 bits, integer SIMD dot
products, its own thread pool) read block-quantised weights near memory bandwidth, where
torch's CPU weight-only kernels are compute-bound (docs/ARCHITECTURE.md, the CPU kernels).

How it is used: a `Graph` is built once for fixed shapes. Its weight, input and output tensors
point at torch tensors' memory (`ggml_backend_cpu_buffer_from_ptr` + `ggml_backend_tensor_alloc`),
so nothing is copied in or out; the intermediate tensors get memory from ggml's graph
allocator; `compute()` runs it on one persistent thread pool. Callers fill the bound input
tensors, call `compute()`, and read the bound outputs.

Only the public headers' functions and structs are used (ggml.h, ggml-cpu.h, ggml-backend.h,
ggml-alloc.h); the `.so.0` copies are the ones llama.cpp itself loads, so this is the same
ggml instance as the llama.cpp engine's.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.util
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from localv3.errors import LocalV3Error

MAX_THREADS = 512  # GGML_MAX_N_THREADS
GRAPH_NODES = 64  # the graphs here are a handful of ops


class GgmlError(LocalV3Error):
    """ggml is missing or failed."""


# ggml_type values (ggml.h) of the torch tensors bound to graphs; block types: formats.table
F32, F16, I32, BF16 = 0, 1, 26, 30
TORCH_TYPES = {torch.float32: F32, torch.float16: F16, torch.bfloat16: BF16, torch.int32: I32}


class _InitParams(ctypes.Structure):  # struct ggml_init_params, passed by value
    _fields_ = [("mem_size", ctypes.c_size_t), ("mem_buffer", ctypes.c_void_p), ("no_alloc", ctypes.c_bool)]


class _CPlan(ctypes.Structure):  # struct ggml_cplan (ggml-cpu.h)
    _fields_ = [
        ("work_size", ctypes.c_size_t),
        ("work_data", ctypes.c_void_p),
        ("n_threads", ctypes.c_int),
        ("threadpool", ctypes.c_void_p),
        ("abort_callback", ctypes.c_void_p),
        ("abort_callback_data", ctypes.c_void_p),
        ("use_ref", ctypes.c_bool),
    ]


class _ThreadpoolParams(ctypes.Structure):  # struct ggml_threadpool_params (ggml.h)
    _fields_ = [
        ("cpumask", ctypes.c_bool * MAX_THREADS),
        ("n_threads", ctypes.c_int),
        ("prio", ctypes.c_int),
        ("poll", ctypes.c_uint32),
        ("strict_cpu", ctypes.c_bool),
        ("paused", ctypes.c_bool),
    ]


class _TypeTraits(ctypes.Structure):  # struct ggml_type_traits (ggml.h)
    _fields_ = [
        ("type_name", ctypes.c_char_p),
        ("blck_size", ctypes.c_int64),
        ("blck_size_interleave", ctypes.c_int64),
        ("type_size", ctypes.c_size_t),
        ("is_quantized", ctypes.c_bool),
        ("to_float", ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)),
        ("from_float_ref", ctypes.c_void_p),
    ]


P, I64, SIZE = ctypes.c_void_p, ctypes.c_int64, ctypes.c_size_t
_SIGNATURES = {  # name -> (library, result, arguments)
    "ggml_init": ("base", P, [_InitParams]),
    "ggml_free": ("base", None, [P]),
    "ggml_tensor_overhead": ("base", SIZE, []),
    "ggml_graph_overhead_custom": ("base", SIZE, [SIZE, ctypes.c_bool]),
    "ggml_new_tensor_1d": ("base", P, [P, ctypes.c_int, I64]),
    "ggml_new_tensor_2d": ("base", P, [P, ctypes.c_int, I64, I64]),
    "ggml_new_tensor_3d": ("base", P, [P, ctypes.c_int, I64, I64, I64]),
    "ggml_mul_mat": ("base", P, [P, P, P]),
    "ggml_mul_mat_id": ("base", P, [P, P, P, P]),
    "ggml_swiglu": ("base", P, [P, P]),
    "ggml_swiglu_split": ("base", P, [P, P, P]),
    "ggml_get_type_traits": ("base", ctypes.POINTER(_TypeTraits), [ctypes.c_int]),
    "ggml_new_graph_custom": ("base", P, [P, SIZE, ctypes.c_bool]),
    "ggml_build_forward_expand": ("base", None, [P, P]),
    "ggml_nbytes": ("base", SIZE, [P]),
    "ggml_row_size": ("base", SIZE, [ctypes.c_int, I64]),
    "ggml_quantize_chunk": ("base", SIZE, [ctypes.c_int, P, P, I64, I64, I64, P]),
    "ggml_backend_cpu_buffer_type": ("base", P, []),
    "ggml_backend_cpu_buffer_from_ptr": ("base", P, [P, SIZE]),
    "ggml_backend_buffer_free": ("base", None, [P]),
    "ggml_backend_tensor_alloc": ("base", ctypes.c_int, [P, P, P]),
    "ggml_gallocr_new": ("base", P, [P]),
    "ggml_gallocr_free": ("base", None, [P]),
    "ggml_gallocr_alloc_graph": ("base", ctypes.c_bool, [P, P]),
    "ggml_gallocr_get_buffer_size": ("base", SIZE, [P, ctypes.c_int]),
    "ggml_threadpool_params_default": ("base", _ThreadpoolParams, [ctypes.c_int]),
    "ggml_cpu_init": ("cpu", None, []),
    "ggml_threadpool_new": ("cpu", P, [ctypes.POINTER(_ThreadpoolParams)]),
    "ggml_threadpool_free": ("cpu", None, [P]),
    "ggml_graph_plan": ("cpu", _CPlan, [P, ctypes.c_int, P]),
    "ggml_graph_compute": ("cpu", ctypes.c_int, [P, ctypes.POINTER(_CPlan)]),
}


class _Library:
    """The ggml functions used here, typed; attribute access returns the C function."""

    def __init__(self, lib_dir: Path):
        self.dir = lib_dir
        libs = {
            name: ctypes.CDLL(str(lib_dir / f"lib{soname}.so.0"), mode=ctypes.RTLD_GLOBAL)
            for name, soname in (("base", "ggml-base"), ("cpu", "ggml-cpu"))
        }
        for name, (which, result, arguments) in _SIGNATURES.items():
            function = getattr(libs[which], name)
            function.restype, function.argtypes = result, arguments
            setattr(self, name, function)
        self.ggml_cpu_init()


def library_dir() -> Path | None:
    """Where llama-cpp-python keeps its ggml libraries (found without importing llama_cpp)."""
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        return None
    lib_dir = Path(next(iter(spec.submodule_search_locations))) / "lib"
    return lib_dir if (lib_dir / "libggml-cpu.so.0").is_file() else None


@functools.cache
def lib() -> _Library:
    lib_dir = library_dir()
    if lib_dir is None:
        raise GgmlError("ggml's CPU kernels need llama-cpp-python (pip install llama-cpp-python)")
    try:
        return _Library(lib_dir)
    except (OSError, AttributeError) as exc:
        raise GgmlError(f"cannot use the ggml libraries in {lib_dir}: {exc}") from None


def available() -> bool:
    try:
        lib()
    except GgmlError:
        return False
    return True


# ----- thread pool ---------------------------------------------------------------------------
# How long ggml's workers spin before sleeping (0-100; llama.cpp's default). Measured on the
# V3-width slice, 2 cores, three alternating runs each: prefill of 64 tokens 1.12 s (poll 50)
# vs 1.42 s (poll 0), median; decode steps alike (within the machine's noise).
POLL = 50


class _Pool:
    """One persistent ggml thread pool, re-made when the thread count changes."""

    def __init__(self):
        self.handle = None
        self.threads = 0

    def get(self, threads: int):
        if threads != self.threads:
            if self.handle:
                lib().ggml_threadpool_free(self.handle)
            params = lib().ggml_threadpool_params_default(threads)
            params.poll = POLL
            self.handle = lib().ggml_threadpool_new(ctypes.byref(params))
            if not self.handle:
                raise GgmlError(f"ggml could not start a thread pool of {threads} threads")
            self.threads = threads
        return self.handle


_POOL = _Pool()


def compute_threads() -> int:
    """ggml computes with as many threads as torch is set to use."""
    return max(1, torch.get_num_threads())


# ----- graphs ----------------------------------------------------------------------------------
class Graph:
    """One ggml graph over fixed shapes; tensors created by `bind` point at torch memory.

    Build it with `new_tensor`/`bind`/the op helpers, finish it with `finish(outputs)`, then
    call `compute()` as often as needed. The torch tensors bound to it must outlive it (it
    keeps references).
    """

    def __init__(self, max_tensors: int = GRAPH_NODES):
        self.lib = lib()
        size = self.lib.ggml_tensor_overhead() * max_tensors + self.lib.ggml_graph_overhead_custom(GRAPH_NODES, False)
        self.ctx = self.lib.ggml_init(_InitParams(size, None, True))  # metadata only; no data
        if not self.ctx:
            raise GgmlError("ggml_init failed")
        self._buffers: list[int] = []  # backend buffers wrapping torch memory
        self._kept: list[torch.Tensor] = []
        self._allocator = None
        self._graph = None
        self._plan: _CPlan | None = None
        self._work: torch.Tensor | None = None
        self.held_bytes = 0  # intermediates and bound outputs: what keeping the graph costs

    # tensors
    def new_tensor(self, ggml_type: int, *ne: int) -> int:
        """A tensor of shape ne (ggml order: ne[0] is the contiguous dimension), no data yet."""
        create = {1: self.lib.ggml_new_tensor_1d, 2: self.lib.ggml_new_tensor_2d, 3: self.lib.ggml_new_tensor_3d}[len(ne)]
        tensor = create(self.ctx, ggml_type, *ne)
        if not tensor:
            raise GgmlError("ggml could not create a tensor (context full)")
        return tensor

    def bind(self, tensor: int, memory: torch.Tensor) -> int:
        """Point `tensor`'s data at `memory` (a contiguous CPU torch tensor of its byte size)."""
        nbytes = self.lib.ggml_nbytes(tensor)
        if not memory.is_contiguous() or memory.device.type != "cpu" or memory.nbytes < nbytes:
            raise GgmlError(f"cannot bind {memory.nbytes} bytes of {memory.device} memory to a {nbytes}-byte ggml tensor")
        pointer = memory.data_ptr()
        buffer = self.lib.ggml_backend_cpu_buffer_from_ptr(pointer, nbytes)
        self._buffers.append(buffer)
        self._kept.append(memory)
        if self.lib.ggml_backend_tensor_alloc(buffer, tensor, pointer) != 0:
            raise GgmlError("ggml_backend_tensor_alloc failed")
        return tensor

    def tensor_from(self, memory: torch.Tensor, ggml_type: int | None = None, ne: tuple[int, ...] | None = None) -> int:
        """A tensor over `memory`: by default of its torch dtype and reversed shape."""
        ggml_type = TORCH_TYPES[memory.dtype] if ggml_type is None else ggml_type
        ne = tuple(reversed(memory.shape)) if ne is None else ne
        return self.bind(self.new_tensor(ggml_type, *ne), memory)

    # ops
    def mul_mat(self, weight: int, x: int) -> int:
        return self.lib.ggml_mul_mat(self.ctx, weight, x)

    def mul_mat_id(self, weights: int, x: int, ids: int) -> int:
        return self.lib.ggml_mul_mat_id(self.ctx, weights, x, ids)

    def swiglu(self, x: int) -> int:
        """silu(first half of ne[0]) * second half."""
        return self.lib.ggml_swiglu(self.ctx, x)

    def swiglu_split(self, gate: int, up: int) -> int:
        """silu(gate) * up."""
        return self.lib.ggml_swiglu_split(self.ctx, gate, up)

    # running
    def finish(self, outputs: list[tuple[int, torch.Tensor]]) -> None:
        """Bind each output to its torch tensor, then allocate the intermediates."""
        for tensor, memory in outputs:
            self.bind(tensor, memory)
        self._graph = self.lib.ggml_new_graph_custom(self.ctx, GRAPH_NODES, False)
        for tensor, _ in outputs:
            self.lib.ggml_build_forward_expand(self._graph, tensor)
        self._allocator = self.lib.ggml_gallocr_new(self.lib.ggml_backend_cpu_buffer_type())
        if not self.lib.ggml_gallocr_alloc_graph(self._allocator, self._graph):
            raise GgmlError("ggml could not allocate the graph's intermediate tensors")
        self.held_bytes = self.lib.ggml_gallocr_get_buffer_size(self._allocator, 0) + sum(m.nbytes for _, m in outputs)

    def compute(self, threads: int | None = None) -> None:
        threads = threads or compute_threads()
        pool = _POOL.get(threads)
        if self._plan is None or self._plan.n_threads != threads:
            plan = self.lib.ggml_graph_plan(self._graph, threads, pool)
            if plan.work_size:
                self._work = torch.empty(plan.work_size, dtype=torch.uint8)
                plan.work_data = self._work.data_ptr()
            self._plan = plan
        status = self.lib.ggml_graph_compute(self._graph, ctypes.byref(self._plan))
        if status != 0:
            raise GgmlError(f"ggml_graph_compute failed (status {status})")

    def __del__(self):
        lib_ = getattr(self, "lib", None)
        if lib_ is None:
            return
        if self._allocator:
            lib_.ggml_gallocr_free(self._allocator)
        for buffer in self._buffers:
            lib_.ggml_backend_buffer_free(buffer)
        if self.ctx:
            lib_.ggml_free(self.ctx)


class _Budget:
    """Bytes held by cached graphs, all modules together."""

    def __init__(self, limit: int):
        self.limit = limit
        self.used = 0


# A prefill chunk's graph holds its intermediates and output (~340 MB for a DeepSeek-V3 expert
# layer at 512 tokens): kept for every layer of a big model they would add up to tens of GB,
# while rebuilding one per call costs fresh memory and page faults (prefill of 64 tokens on the
# V3-width slice: 44.9 tok/s cached vs 38.7 rebuilt). So graphs are kept while all of them
# together hold at most this much; beyond it, a graph is built for its call and dropped.
BUDGET = _Budget(limit=1 << 30)


class GraphCache:
    """Built graphs of one module keyed by token count (or (tokens, k)), built on first use and
    kept, a handful per module, within the shared BUDGET (decode graphs are a few KB)."""

    def __init__(self, build: Callable[[object], object], held_bytes: Callable[[object], int], size: int = 8):
        self.build = build
        self.held_bytes = held_bytes
        self.size = size
        self.graphs: dict[object, object] = {}
        self._bytes: dict[object, int] = {}
        self.budget = BUDGET

    def clear(self) -> None:
        for key in list(self.graphs):
            self._drop(key)

    def get(self, key):
        if key in self.graphs:
            self.graphs[key] = self.graphs.pop(key)  # most recent last
            return self.graphs[key]
        entry = self.build(key)
        nbytes = self.held_bytes(entry)
        if self.budget.used + nbytes > self.budget.limit:
            return entry  # for this call only
        if len(self.graphs) >= self.size:
            self._drop(next(iter(self.graphs)))
        self.graphs[key], self._bytes[key] = entry, nbytes
        self.budget.used += nbytes
        return entry

    def _drop(self, key) -> None:
        del self.graphs[key]
        self.budget.used -= self._bytes.pop(key)

    def __del__(self):
        if hasattr(self, "budget"):
            self.budget.used -= sum(self._bytes.values())


# ----- quantisation through ggml ----------------------------------------------------------------
def row_bytes(ggml_type: int, n: int) -> int:
    return lib().ggml_row_size(ggml_type, n)


def quantize_rows(values: torch.Tensor, ggml_type: int, threads: int | None = None) -> torch.Tensor:
    """fp32-able [rows, n] -> uint8 [rows, row_bytes] in ggml's block layout (its reference
    quantiser, no importance matrix), rows split over `threads` (default: torch's) threads:
    the C call releases the GIL, and Q4_K's search for scales costs ~0.2 us per weight."""
    rows, n = values.shape
    source = values.float().contiguous()
    out = torch.empty(rows, row_bytes(ggml_type, n), dtype=torch.uint8)
    threads = max(1, min(threads or compute_threads(), rows))
    bounds = [rows * i // threads for i in range(threads + 1)]

    def quantize(first: int, last: int) -> None:
        written = lib().ggml_quantize_chunk(ggml_type, source.data_ptr(), out.data_ptr(), first * n, last - first, n, None)
        if written != out[first:last].numel():
            raise GgmlError(f"ggml_quantize_chunk wrote {written} bytes, expected {out[first:last].numel()}")

    if threads == 1:
        quantize(0, rows)
    else:
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(quantize, bounds[:-1], bounds[1:]))
    return out


def dequantize_rows(blocks: torch.Tensor, ggml_type: int, n: int) -> torch.Tensor:
    """uint8 [rows, row_bytes] in `ggml_type`'s block layout -> fp32 [rows, n], by ggml's own
    dequantiser (any block type it knows)."""
    traits = lib().ggml_get_type_traits(ggml_type).contents
    if not traits.to_float:
        raise GgmlError(f"ggml has no dequantiser for type {ggml_type}")
    source = blocks.contiguous()
    if source.shape[-1] != row_bytes(ggml_type, n):
        raise GgmlError(f"rows of {source.shape[-1]} bytes are not {n} values of ggml type {traits.type_name.decode()}")
    out = torch.empty(*source.shape[:-1], n, dtype=torch.float32)
    traits.to_float(source.data_ptr(), out.data_ptr(), out.numel())
    return out
