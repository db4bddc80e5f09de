"""The machine a plan is for: detected or taken from a named profile (localv3.offload.stated adds
what the user states).

Peak figures and the fraction of them that sustained work reaches are kept apart
(`Hardware.achievable`); a measured figure is already achievable, so its fraction is 1.
Detection measures CPU memory bandwidth and FLOP/s (and PCIe where a GPU exists) with a probe
of a few hundred milliseconds, cached as JSON in the localv3 home (`$LOCALV3_HOME`, else
`~/.localv3`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from localv3.errors import LocalV3Error
from localv3.files import cache_text
from localv3.render import format_bytes
from localv3.kernels.build import decode_kernels
from localv3.offload.kernel_probe import CpuKernels, assumed_kernels, best_time, describe_assumed, measure_cpu_kernels
from localv3.offload.profiles import load_profiles
from localv3.offload.units import format_flops, format_rate

CACHE_FILE_NAME = "hardware.json"


class HardwareError(LocalV3Error):
    """Stated hardware that contradicts itself."""


@dataclass(frozen=True)
class Achievable:
    """Fractions of peak that sustained decode-style reads and dense math reach."""

    gpu_bw: float = 0.85
    cpu_bw: float = 0.75
    pcie_bw: float = 1.0  # PCIe figures are practical per-direction rates already
    disk_bw: float = 0.6  # memory-mapped expert reads are less sequential than a benchmark
    gpu_flops: float = 0.6
    cpu_flops: float = 0.5


@dataclass(frozen=True)
class Hardware:
    source: str  # "detected", "profile NAME", "stated", joined with " + "
    gpu_name: str | None  # None: no GPU
    gpu_mem_bytes: int
    gpu_free_bytes: int
    gpu_bw: float  # peak bytes/s
    gpu_flops: float  # peak FLOP/s
    cpu_name: str
    physical_cores: int
    ram_bytes: int
    ram_available_bytes: int
    cpu_bw: float  # peak bytes/s of the memory system
    cpu_flops: float
    pcie_bw: float  # bytes/s per direction
    disk_bw: float
    achievable: Achievable = field(default_factory=Achievable)
    basis: dict[str, str] = field(default_factory=dict)  # figure -> how it was measured or assumed
    cpu_kernels: CpuKernels | None = None  # measured on this machine; None: assumed (kernel_probe)

    @property
    def kernels(self) -> CpuKernels:
        """What the CPU kernels reach: measured, else assumed from the CPU's FLOP/s."""
        return self.cpu_kernels or assumed_kernels(self.effective("cpu_flops"))

    @property
    def has_gpu(self) -> bool:
        return self.gpu_name is not None and self.gpu_mem_bytes > 0

    def effective(self, resource: str) -> float:
        """Achievable rate of `resource` (gpu_bw, cpu_bw, pcie_bw, disk_bw, gpu_flops, cpu_flops)."""
        return getattr(self, resource) * getattr(self.achievable, resource)

    def describe(self) -> str:
        cpu = (
            f"{self.cpu_name} ({self.physical_cores} cores, {format_bytes(self.ram_bytes)} RAM, "
            f"{format_rate(self.cpu_bw)})"
        )
        if not self.has_gpu:
            return f"{cpu}, no GPU"
        gpu = f"{self.gpu_name} ({format_bytes(self.gpu_mem_bytes)}, {format_rate(self.gpu_bw)})"
        return f"{gpu} + {cpu}, PCIe {format_rate(self.pcie_bw)}"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def hardware_from_profile(name: str) -> Hardware:
    machine = load_profiles().machine(name)
    gpu, cpu = machine.gpu, machine.cpu
    return Hardware(
        source=f"profile {name}",
        gpu_name=gpu.name if gpu else None,
        gpu_mem_bytes=gpu.memory_bytes if gpu else 0,
        gpu_free_bytes=gpu.memory_bytes if gpu else 0,
        gpu_bw=gpu.bandwidth if gpu else 0.0,
        gpu_flops=gpu.flops if gpu else 0.0,
        cpu_name=cpu.name,
        physical_cores=cpu.cores,
        ram_bytes=machine.ram_bytes,
        ram_available_bytes=machine.ram_bytes,
        cpu_bw=cpu.bandwidth,
        cpu_flops=cpu.flops,
        pcie_bw=machine.pcie_bw if gpu else 0.0,
        disk_bw=machine.disk_bw,
        basis={"cpu_kernels": describe_assumed()},
    )


# ----- detection ---------------------------------------------------------------------------
def detect_hardware() -> Hardware:
    """This machine: GPU 0 through torch.cuda, CPU and RAM through psutil, CPU (and PCIe)
    rates from the cached probe; the disk's rate is assumed."""
    profiles = load_profiles()
    basis: dict[str, str] = {}
    gpu = _detect_gpu(basis)
    cpu_name = _cpu_name()
    cores = psutil.cpu_count(logical=False) or os.cpu_count() or 1
    memory = psutil.virtual_memory()
    rates = _measured_rates(cpu_name, cores, memory.total, gpu["name"] if gpu else None, basis)
    basis["disk_bw"] = f"assumed {format_rate(profiles.default_disk_bw)} (NVMe PCIe 4.0 SSD)"
    measured = Achievable(cpu_bw=1.0, cpu_flops=1.0)  # PCIe figures are practical either way
    return Hardware(
        source="detected",
        gpu_name=gpu["name"] if gpu else None,
        gpu_mem_bytes=gpu["total"] if gpu else 0,
        gpu_free_bytes=gpu["free"] if gpu else 0,
        gpu_bw=gpu["bandwidth"] if gpu else 0.0,
        gpu_flops=gpu["flops"] if gpu else 0.0,
        cpu_name=cpu_name,
        physical_cores=cores,
        ram_bytes=memory.total,
        ram_available_bytes=memory.available,
        cpu_bw=rates["cpu_bw"],
        cpu_flops=rates["cpu_flops"],
        pcie_bw=rates["pcie_bw"] or 0.0,
        disk_bw=profiles.default_disk_bw,
        achievable=measured,
        basis=basis,
        cpu_kernels=CpuKernels.from_dict(rates["cpu_kernels"]),
    )


# a CUDA (or ROCm) device shows as one of these on Linux: NVIDIA's driver, WSL2's GPU, AMD's KFD
GPU_DEVICE_NODES = ("/dev/nvidiactl", "/dev/dxg", "/dev/kfd")


def _detect_gpu(basis: dict[str, str]) -> dict[str, Any] | None:
    if sys.platform.startswith("linux") and not any(os.path.exists(node) for node in GPU_DEVICE_NODES):
        return None  # no GPU driver: importing torch (seconds of start-up) could only say so
    import torch

    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(0)
    free, total = torch.cuda.mem_get_info(0)
    return {"name": props.name, "total": total, "free": free, **gpu_rates(props, basis)}


def gpu_rates(props: Any, basis: dict[str, str]) -> dict[str, float]:
    """Peak bandwidth and FLOP/s of a GPU from its torch.cuda properties: bandwidth from the
    memory clock and bus width where torch reports them, else the profile of a GPU of that name,
    else the default GPU's figures (noted as assumptions)."""
    profiles = load_profiles()
    known = profiles.gpu_named(props.name)
    fallback = known or profiles.default_gpu
    clock_khz = getattr(props, "memory_clock_rate", 0)
    bus_bits = getattr(props, "memory_bus_width", 0)
    if clock_khz and bus_bits:
        bandwidth = 2 * clock_khz * 1000 * bus_bits / 8  # double data rate
    else:
        bandwidth = fallback.bandwidth
        if not known:
            basis["gpu_bw"] = f"assumed {format_rate(bandwidth)} ({fallback.name}); state --gpu-bw"
    if not known:
        basis["gpu_flops"] = f"assumed that of a {fallback.name}"
    return {"bandwidth": bandwidth, "flops": fallback.flops}


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


# ----- the probe ---------------------------------------------------------------------------
def _measured_rates(cpu_name: str, cores: int, ram: int, gpu_name: str | None, basis: dict[str, str]) -> dict[str, Any]:
    """CPU bandwidth and FLOP/s (and PCIe with a GPU), from the cache when it describes this
    machine, else measured now and cached."""
    from localv3.registry import localv3_home

    machine = {"cpu_name": cpu_name, "physical_cores": cores, "ram_bytes": ram, "gpu_name": gpu_name}
    path = localv3_home() / CACHE_FILE_NAME
    cached = _read_cache(path) or {}
    if _usable_cache(cached, gpu_name) and all(cached.get(key) == value for key, value in machine.items()):
        rates = cached
        basis["cpu_bw"] = f"measured {format_rate(rates['cpu_bw'])} on {rates['measured_at']} ({path})"
        if not _valid_kernels(rates.get("cpu_kernels")) or rates["cpu_kernels"].get("decode_kernels") != decode_kernels():
            rates["cpu_kernels"] = measure_cpu_kernels(rates["cpu_bw"]).to_dict()
            _write_cache(path, rates)
    else:
        cpu_bw, cpu_flops = measure_cpu()
        rates = {
            **machine,
            "cpu_bw": cpu_bw,
            "cpu_flops": cpu_flops,
            "pcie_bw": measure_pcie() if gpu_name else None,
            "cpu_kernels": measure_cpu_kernels(cpu_bw).to_dict(),
            "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        _write_cache(path, rates)
        basis["cpu_bw"] = f"measured {format_rate(cpu_bw)} just now (cached in {path})"
    basis["cpu_flops"] = f"measured {format_flops(rates['cpu_flops'])} (fp32 matrix product)"
    kernels = rates["cpu_kernels"]
    if kernels["read_fraction"]:
        fractions = ", ".join(f"{scheme} {fraction:.0%}" for scheme, fraction in kernels["read_fraction"].items())
        basis["cpu_kernels"] = f"measured: block kernels read at {fractions} of it"
    if rates["pcie_bw"]:
        basis["pcie_bw"] = f"measured {format_rate(rates['pcie_bw'])} host-to-device"
    return rates


def measure_cpu(buffer_bytes: int = 512 * 2**20, repeats: int = 5) -> tuple[float, float]:
    """(read bytes/s, fp32 FLOP/s): a matrix-vector product over a weight matrix larger than
    any cache (what decoding does to every weight), and a 1024^3 matrix product; best of
    `repeats`, on torch's default threads."""
    import torch

    weights = torch.ones(buffer_bytes // (4 * 4096), 4096, dtype=torch.float32)
    vector = torch.ones(4096, dtype=torch.float32)
    read_seconds = best_time(lambda: torch.mv(weights, vector), repeats)
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    matmul_seconds = best_time(lambda: torch.mm(a, b), repeats)
    return weights.numel() * 4 / read_seconds, 2 * 1024**3 / matmul_seconds


def measure_pcie(buffer_bytes: int = 256 * 2**20, repeats: int = 3) -> float:
    """Host-to-device bytes/s of a pinned, non-blocking copy on GPU 0."""
    import torch

    host = torch.empty(buffer_bytes, dtype=torch.uint8, pin_memory=True)
    device = torch.empty(buffer_bytes, dtype=torch.uint8, device="cuda")

    def copy() -> None:
        device.copy_(host, non_blocking=True)
        torch.cuda.synchronize()

    return buffer_bytes / best_time(copy, repeats)


def _usable_cache(cached: dict[str, Any], gpu_name: str | None) -> bool:
    """Every measured figure present and a positive finite number (PCIe only with a GPU): a
    zero, negative, NaN or text value (a hand-edited or damaged file) is measured again."""
    rates = [cached.get("cpu_bw"), cached.get("cpu_flops")] + ([cached.get("pcie_bw")] if gpu_name else [])
    return isinstance(cached.get("measured_at"), str) and "pcie_bw" in cached and all(map(_positive_number, rates))


def _positive_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < math.inf


def _valid_kernels(data: Any) -> bool:
    try:
        CpuKernels.from_dict(data)
    except (TypeError, KeyError, ValueError, AttributeError):
        return False
    return True


def _read_cache(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _write_cache(path: Path, data: dict[str, Any]) -> None:
    """A read-only or full home only costs a new measurement next time."""
    cache_text(path, json.dumps(data, indent=2) + "\n", "the hardware probe")
