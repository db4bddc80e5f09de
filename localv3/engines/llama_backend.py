"""The parts of llama.cpp (through llama-cpp-python's ctypes bindings) that localv3 uses beside
the engine: backend start-up with its log captured, tensor buffer-type overrides, and
`llama_model_quantize`.
"""

from __future__ import annotations

import ctypes
import functools
import os
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import llama_cpp
import psutil

from localv3.errors import LocalV3Error

GGML_BACKEND_DEVICE_TYPE_CPU = 0
GGML_LOG_LEVEL_ERROR = 4
# llama.cpp's --cpu-moe: the routed expert tensors of every layer
CPU_MOE_PATTERN = r"\.ffn_(up|down|gate|gate_up)_(ch|)exps"

QUANTIZE_FTYPES = {
    "q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0,
    "q4_k_m": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M,
}


class LlamaCppError(LocalV3Error):
    pass


class _Log:
    """llama.cpp's log lines, kept (not printed): the last ones explain a failure, and a
    capture collects every line of one step (a model load)."""

    def __init__(self, size: int = 200):
        self.lines: deque[tuple[int, str]] = deque(maxlen=size)
        self.captured: list[str] | None = None
        self.callback = llama_cpp.llama_log_callback(self._receive)  # keep a reference: C holds the pointer

    def _receive(self, level, text, user_data) -> None:
        line = text.decode("utf-8", errors="replace")
        self.lines.append((level, line))
        if self.captured is not None:
            self.captured.append(line)

    @contextmanager
    def capture(self) -> Iterator[list[str]]:
        self.captured = captured = []
        try:
            yield captured
        finally:
            self.captured = None

    def last_error(self) -> str:
        errors = [line.strip() for level, line in self.lines if level == GGML_LOG_LEVEL_ERROR and line.strip()]
        return errors[-1] if errors else ""


LOG = _Log()


@functools.cache
def init_backend() -> None:
    """Start llama.cpp once per process, its log going to LOG (verbose logging also slows decoding)."""
    llama_cpp.llama_log_set(LOG.callback, None)
    llama_cpp.llama_backend_init()


def physical_cores() -> int:
    return psutil.cpu_count(logical=False) or os.cpu_count() or 1


class BufferTypeOverride(ctypes.Structure):
    """llama.cpp's `struct llama_model_tensor_buft_override { const char *pattern; ggml_backend_buffer_type_t buft; }`."""

    _fields_ = [("pattern", ctypes.c_char_p), ("buft", ctypes.c_void_p)]


def override_array(patterns_to_buft: dict[str, int]) -> ctypes.Array:
    """A NULL-terminated array for llama_model_params.tensor_buft_overrides (keep it alive while loading)."""
    entries = [BufferTypeOverride(pattern.encode(), buft) for pattern, buft in patterns_to_buft.items()]
    entries.append(BufferTypeOverride(None, None))
    return (BufferTypeOverride * len(entries))(*entries)


def _ggml_library(name: str) -> ctypes.CDLL:
    """A ggml library as llama.cpp loaded it: the `.so.0` copy (its DT_NEEDED name). Another copy
    would be a second instance, whose pointers llama.cpp does not recognise."""
    init_backend()
    return ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / f"{name}.so.0"))


@functools.cache
def cpu_has_amx() -> bool:
    """Whether this llama.cpp build uses AMX kernels (ggml_cpu_has_amx_int8)."""
    return bool(_ggml_library("libggml-cpu").ggml_cpu_has_amx_int8())


@functools.cache
def cpu_buffer_type() -> int:
    """The CPU buffer type through ggml's backend registry."""
    ggml = _ggml_library("libggml")
    ggml.ggml_backend_dev_by_type.restype = ctypes.c_void_p
    ggml.ggml_backend_dev_by_type.argtypes = [ctypes.c_int]
    ggml.ggml_backend_dev_buffer_type.restype = ctypes.c_void_p
    ggml.ggml_backend_dev_buffer_type.argtypes = [ctypes.c_void_p]
    device = ggml.ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_CPU)
    if not device:
        raise LlamaCppError("llama.cpp has no CPU backend device")
    return ggml.ggml_backend_dev_buffer_type(device)


def quantize_file(source: Path, target: Path, gguf_type: str, threads: int | None = None) -> None:
    """llama_model_quantize: an F32/F16 GGUF -> `gguf_type` (q8_0, q4_k_m). Tensors whose rows
    do not fit the type's blocks fall back to a type llama.cpp picks."""
    init_backend()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = QUANTIZE_FTYPES[gguf_type]
    params.nthread = threads or physical_cores()
    status = llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), ctypes.byref(params))
    if status != 0:
        raise LlamaCppError(f"llama.cpp could not quantize {source} to {gguf_type}: {LOG.last_error() or f'status {status}'}")
