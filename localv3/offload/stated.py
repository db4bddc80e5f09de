"""Hardware the user states (`--gpu-mem 24GiB --ram 512GiB --cpu-bw 460GB/s ...`).

A plan for stated hardware is a plan for that hardware. With `--profile`, the stated figures
replace the profile's. Without one they describe a machine of their own: every figure not
stated (CPU FLOP/s, GPU rates, PCIe, kernel efficiency, disk) is that of the hardware class
covering the stated ones (profiles.toml's `classes`), listed in `Hardware.basis` as assumed,
and never this machine's measurements. `--cores` scales the CPU's FLOP/s at its per-core rate
unless `--cpu-flops` is stated too. Stated bandwidths and FLOP/s are peaks, like the profiles'.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from localv3.render import format_bytes
from localv3.offload.hardware import Achievable, Hardware, HardwareError, detect_hardware, hardware_from_profile
from localv3.offload.kernel_probe import describe_assumed
from localv3.offload.profiles import MachineProfile, load_profiles
from localv3.offload.units import UnitError, format_flops, format_rate, parse_bytes, parse_flops, parse_rate

MAX_CORES = 1 << 16
OPTIONS = {
    "gpu_mem": "--gpu-mem",
    "ram": "--ram",
    "cpu_bw": "--cpu-bw",
    "cpu_flops": "--cpu-flops",
    "gpu_bw": "--gpu-bw",
    "pcie": "--pcie",
    "cores": "--cores",
}
PARSERS = {
    "gpu_mem": parse_bytes,
    "ram": parse_bytes,
    "cpu_bw": parse_rate,
    "cpu_flops": parse_flops,
    "gpu_bw": parse_rate,
    "pcie": parse_rate,
}
BASIS_KEY = {"gpu_mem": "gpu", "ram": "ram", "cpu_bw": "cpu_bw", "cpu_flops": "cpu_flops", "gpu_bw": "gpu_bw", "pcie": "pcie_bw", "cores": "cores"}


@dataclass(frozen=True)
class StatedHardware:
    gpu_mem: int | None = None  # bytes; 0: no GPU
    ram: int | None = None
    cpu_bw: float | None = None  # peak bytes/s
    cpu_flops: float | None = None  # peak FLOP/s
    gpu_bw: float | None = None
    pcie: float | None = None
    cores: int | None = None

    def __post_init__(self) -> None:
        for name in ("ram", "cpu_bw", "cpu_flops", "gpu_bw", "pcie"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise HardwareError(f"{OPTIONS[name]} must be above zero")
        if self.cores is not None and not 1 <= self.cores <= MAX_CORES:
            raise HardwareError(f"--cores {self.cores}: a machine has from 1 to {MAX_CORES:,} cores")

    @classmethod
    def from_text(cls, cores: int | None = None, **texts: str | None) -> StatedHardware:
        """Figures as written on the command line (`gpu_mem="24GiB"`); an unreadable one is a
        UnitError naming its option."""
        values: dict[str, Any] = {}
        for name, text in texts.items():
            if text is None:
                continue
            try:
                values[name] = PARSERS[name](text)
            except UnitError as error:
                raise UnitError(f"{OPTIONS[name]}: {error}") from None
        return cls(cores=cores, **values)

    @property
    def anything(self) -> bool:
        return any(value is not None for value in dataclasses.astuple(self))

    @property
    def states_cpu(self) -> bool:
        return any(value is not None for value in (self.cpu_bw, self.cpu_flops, self.cores))

    def apply(self, hw: Hardware) -> Hardware:
        """`hw` with the stated figures in place; the basis of each stated figure goes."""
        if not self.anything:
            return hw
        basis = dict(hw.basis)
        changes: dict[str, Any] = {}
        if self.gpu_mem is not None:
            changes.update(_stated_gpu(hw, self.gpu_mem, basis))
        if self.gpu_bw is not None:
            if not changes.get("gpu_name", hw.gpu_name):
                raise HardwareError("--gpu-bw was given but the machine has no GPU: state --gpu-mem too")
            changes["gpu_bw"] = self.gpu_bw
        if self.pcie is not None:
            changes["pcie_bw"] = self.pcie
        if self.ram is not None:
            changes.update(ram_bytes=self.ram, ram_available_bytes=self.ram)
        if self.states_cpu:
            changes.update(_stated_cpu(self, hw, basis))
        stated_keys = {BASIS_KEY[name] for name, value in dataclasses.asdict(self).items() if value is not None}
        basis = {figure: how for figure, how in basis.items() if figure not in stated_keys}
        return dataclasses.replace(hw, **changes, source=f"{hw.source} + stated", basis=basis)


def _stated_cpu(stated: StatedHardware, hw: Hardware, basis: dict[str, str]) -> dict[str, Any]:
    """Another machine's CPU: its kernels are assumed, not ours; stated figures are peaks."""
    changes: dict[str, Any] = {"cpu_kernels": None}
    basis["cpu_kernels"] = describe_assumed()
    achievable = hw.achievable
    if stated.cpu_bw is not None:
        changes["cpu_bw"] = stated.cpu_bw
        achievable = dataclasses.replace(achievable, cpu_bw=Achievable.cpu_bw)
    if stated.cores is not None:
        changes["physical_cores"] = stated.cores
    if stated.cpu_flops is not None:
        changes["cpu_flops"] = stated.cpu_flops
        achievable = dataclasses.replace(achievable, cpu_flops=Achievable.cpu_flops)
    elif stated.cores is not None:
        per_core = hw.cpu_flops / hw.physical_cores
        changes["cpu_flops"] = per_core * stated.cores
        basis["cpu_flops"] = (
            f"assumed {format_flops(changes['cpu_flops'])}: {stated.cores} cores at {format_flops(per_core)} "
            f"each, as {hw.cpu_name} (state --cpu-flops)"
        )
    return {**changes, "achievable": achievable}


def _stated_gpu(hw: Hardware, gpu_mem: int, basis: dict[str, str]) -> dict[str, Any]:
    """--gpu-mem 0 removes the GPU; a GPU stated on a machine without one gets the default
    GPU's rates until they are stated too."""
    if gpu_mem == 0:
        for figure in ("gpu_bw", "gpu_flops", "pcie_bw"):
            basis.pop(figure, None)
        return {"gpu_name": None, "gpu_mem_bytes": 0, "gpu_free_bytes": 0, "gpu_bw": 0.0, "gpu_flops": 0.0, "pcie_bw": 0.0}
    changes: dict[str, Any] = {"gpu_mem_bytes": gpu_mem, "gpu_free_bytes": gpu_mem}
    if not hw.has_gpu:
        profiles = load_profiles()
        default = profiles.default_gpu
        changes.update(gpu_name=f"GPU with {format_bytes(gpu_mem)}", gpu_bw=default.bandwidth, gpu_flops=default.flops)
        basis["gpu_bw"] = f"assumed {format_rate(default.bandwidth)} ({default.name}) (state --gpu-bw)"
        basis["gpu_flops"] = f"assumed {format_flops(default.flops)} ({default.name})"
        if not hw.pcie_bw:
            changes["pcie_bw"] = profiles.default_pcie_bw
            basis["pcie_bw"] = f"assumed {format_rate(profiles.default_pcie_bw)} (PCIe 4.0 x16) (state --pcie)"
    return changes


def stated_machine(stated: StatedHardware) -> Hardware:
    """The machine the stated figures describe, the rest from the class that covers them."""
    machine = load_profiles().class_for(stated.ram, stated.cores, stated.cpu_bw)
    base = hardware_from_profile(machine.name)
    base = dataclasses.replace(base, basis=_class_basis(machine), source=f"stated; the rest as profile {machine.name}")
    hw = stated.apply(base)
    gpu_name = None
    if hw.has_gpu:
        gpu_name = "stated GPU" if stated.gpu_mem is not None else f"assumed {hw.gpu_name}"
    cpu_name = "stated CPU" if stated.states_cpu or stated.ram is not None else f"assumed {hw.cpu_name}"
    return dataclasses.replace(hw, source=base.source, gpu_name=gpu_name, cpu_name=cpu_name)


def _class_basis(machine: MachineProfile) -> dict[str, str]:
    """Every figure of a class machine, as assumed, with the option that states it."""
    cpu = machine.cpu
    basis = {}
    if machine.gpu is not None:
        gpu = machine.gpu
        basis["gpu"] = f"assumed {gpu.name}, {format_bytes(gpu.memory_bytes)} (state --gpu-mem; 0: no GPU)"
        basis["gpu_bw"] = f"assumed {format_rate(gpu.bandwidth)} ({gpu.name}) (state --gpu-bw)"
        basis["gpu_flops"] = f"assumed {format_flops(gpu.flops)} ({gpu.name})"
        basis["pcie_bw"] = f"assumed {format_rate(machine.pcie_bw)} (state --pcie)"
    basis["ram"] = f"assumed {format_bytes(machine.ram_bytes)} (state --ram)"
    basis["cpu_bw"] = f"assumed {format_rate(cpu.bandwidth)} peak ({cpu.name}) (state --cpu-bw)"
    basis["cores"] = f"assumed {cpu.cores} (state --cores)"
    basis["cpu_flops"] = f"assumed {format_flops(cpu.flops)} ({cpu.name}) (state --cpu-flops)"
    basis["cpu_kernels"] = describe_assumed()
    basis["disk_bw"] = f"assumed {format_rate(machine.disk_bw)} (an NVMe SSD)"
    return basis


def hardware_for(profile: str | None, stated: StatedHardware) -> Hardware:
    """What a plan is for: the named profile with the stated figures in place, else the stated
    machine, else this machine as detected (measured)."""
    if profile:
        return stated.apply(hardware_from_profile(profile))
    if stated.anything:
        return stated_machine(stated)
    return detect_hardware()
