"""Compiling localv3's CPU kernels (quant_products.c, quant_panels.c) for this machine, once, and loading it.

The library is built with the host C compiler (`$CC`, else `cc`) and `-march=native`, so it
uses the widest SIMD the CPU has (AVX-512BW, else AVX2), and is kept under
`$LOCALV3_HOME/kernels/` keyed by the source, the compiler and the CPU: later runs load it in
milliseconds. Where it cannot be built (no compiler, no AVX2, another architecture) the
reason is printed once, saved beside the cache so later runs do not retry, and localv3 keeps
ggml's kernels. `LOCALV3_CPU_KERNELS=ggml` turns these kernels off (A/B measurements).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
from pathlib import Path

from localv3.files import warn

SOURCES = tuple(Path(__file__).with_name(name) for name in ("quant_products.c", "quant_panels.c"))
HEADERS = (Path(__file__).with_name("quant_blocks.h"),)
FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC")
SWITCH = "LOCALV3_CPU_KERNELS"  # "ggml": do not use these kernels

P, I, L, SIZE = ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_size_t
_SIGNATURES = {  # name -> (result, arguments)
    "lv3_supports": (I, [I]),
    "lv3_avx512": (I, []),
    "lv3_panel_takes": (I, [I]),
    "lv3_matmul": (I, [I, P, SIZE, L, I, P, SIZE, I, P, SIZE, I, I]),
    "lv3_swiglu_experts": (I, [I, P, P, SIZE, I, P, SIZE, I, I, P, I, P, P, I, P, I]),
    "lv3_dequantize_transposed": (I, [I, P, L, L, I, P, I]),
}


class KernelLibrary:
    """The compiled kernels, typed: attribute access returns the C function."""

    def __init__(self, path: Path):
        self.path = path
        handle = ctypes.CDLL(str(path))
        for name, (result, arguments) in _SIGNATURES.items():
            function = getattr(handle, name)
            function.restype, function.argtypes = result, arguments
            setattr(self, name, function)


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def _cpu_identity() -> str:
    """What -march=native depends on: the CPU's model and feature flags."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.machine() + platform.processor()
    wanted = [line for line in lines if line.startswith(("model name", "flags"))]
    return "\n".join(dict.fromkeys(wanted)) or platform.machine()


def cache_key(compiler: str, flags: tuple[str, ...] = FLAGS) -> str:
    digest = hashlib.sha256()
    for source in (*SOURCES, *HEADERS):
        digest.update(source.read_bytes())
    for part in (compiler, " ".join(flags), _cpu_identity()):
        digest.update(part.encode())
    return digest.hexdigest()[:16]


def compile_library(directory: Path, flags: tuple[str, ...] = FLAGS) -> Path:
    """Build the library into `directory` (whole or not at all); raises OSError or
    subprocess.CalledProcessError (its stderr says why)."""
    compiler = _compiler()
    if compiler is None:
        raise OSError("no C compiler (cc) on PATH")
    target = directory / f"quant_products-{cache_key(compiler, flags)}.so"
    if target.is_file():
        return target
    directory.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
    try:
        subprocess.run([compiler, *flags, *map(str, SOURCES), "-o", str(partial), "-lm"], check=True, capture_output=True, text=True, timeout=120)
        partial.replace(target)
    finally:
        partial.unlink(missing_ok=True)
    return target


def _failure_reason(exc: Exception) -> str:
    if isinstance(exc, subprocess.CalledProcessError):
        errors = [line for line in (exc.stderr or "").splitlines() if "error" in line]
        return errors[0].strip() if errors else f"the compiler exited with status {exc.returncode}"
    if isinstance(exc, subprocess.TimeoutExpired):
        return "the compiler took over 2 minutes"
    return str(exc)


def decode_kernels() -> str:
    """Which kernels run decode-sized products here: this build of ours, or ggml's (what the
    hardware probe's cached kernel rates were measured with)."""
    kernels = library()
    return f"localv3 {kernels.path.stem}" if kernels else "ggml"


@functools.cache
def library() -> KernelLibrary | None:
    """The kernels for this machine, built on first use; None where they cannot be (ggml's then)."""
    if os.environ.get(SWITCH, "").lower() == "ggml":
        return None
    from localv3.registry import localv3_home

    directory = localv3_home() / "kernels"
    compiler = _compiler()
    failed = directory / f"failed-{cache_key(compiler or 'none')}.txt"
    if failed.is_file():
        return None
    try:
        return KernelLibrary(compile_library(directory))
    except (OSError, subprocess.SubprocessError) as exc:
        reason = _failure_reason(exc)
        warn(f"localv3's CPU kernels could not be built ({reason}); ggml's kernels are used instead")
        try:
            directory.mkdir(parents=True, exist_ok=True)
            failed.write_text(reason + "\n")
        except OSError:
            pass
        return None
