"""The named hardware in profiles.toml: GPUs, CPUs with their memory systems, whole machines."""

from __future__ import annotations

import functools
import tomllib
from dataclasses import dataclass
from pathlib import Path

from localv3.errors import LocalV3Error
from localv3.offload.units import UnitError, parse_bytes, parse_flops, parse_rate

PROFILES_FILE = Path(__file__).with_name("profiles.toml")


class ProfileError(LocalV3Error):
    """An unknown profile name or a malformed profiles file."""


@dataclass(frozen=True)
class GpuSpec:
    key: str
    name: str
    memory_bytes: int
    bandwidth: float  # peak bytes/s
    flops: float  # peak FLOP/s


@dataclass(frozen=True)
class CpuSpec:
    key: str
    name: str
    cores: int
    bandwidth: float  # peak bytes/s of the memory system
    flops: float


@dataclass(frozen=True)
class MachineProfile:
    name: str
    description: str
    gpu: GpuSpec | None
    cpu: CpuSpec
    ram_bytes: int
    pcie_bw: float
    disk_bw: float


@dataclass(frozen=True)
class Profiles:
    gpus: dict[str, GpuSpec]
    cpus: dict[str, CpuSpec]
    machines: dict[str, MachineProfile]
    default_gpu: GpuSpec
    default_pcie_bw: float
    default_disk_bw: float
    classes: tuple[MachineProfile, ...]  # what stated figures are planned on, smallest first

    def machine(self, name: str) -> MachineProfile:
        try:
            return self.machines[name]
        except KeyError:
            raise ProfileError(f"unknown hardware profile {name!r}; known: {', '.join(self.machines)}") from None

    def class_for(self, ram_bytes: int | None, cores: int | None, cpu_bw: float | None) -> MachineProfile:
        """The first hardware class whose RAM, cores and CPU bandwidth cover the stated ones
        (None: not stated), else the largest."""
        wanted = ((ram_bytes, "ram_bytes"), (cores, "cores"), (cpu_bw, "bandwidth"))

        def covers(machine: MachineProfile) -> bool:
            have = {"ram_bytes": machine.ram_bytes, "cores": machine.cpu.cores, "bandwidth": machine.cpu.bandwidth}
            return all(value is None or value <= have[key] for value, key in wanted)

        return next((machine for machine in self.classes if covers(machine)), self.classes[-1])

    def gpu_named(self, device_name: str) -> GpuSpec | None:
        """The GPU whose marketing name is `device_name` (as torch.cuda reports it), if listed."""
        wanted = device_name.strip().lower()
        return next((gpu for gpu in self.gpus.values() if gpu.name.lower() == wanted), None)


@functools.cache
def load_profiles(path: Path = PROFILES_FILE) -> Profiles:
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
        gpus = {key: _gpu(key, entry) for key, entry in raw.get("gpu", {}).items()}
        cpus = {key: _cpu(key, entry) for key, entry in raw.get("cpu", {}).items()}
        machines = {key: _machine(key, entry, gpus, cpus) for key, entry in raw.get("profile", {}).items()}
        defaults = raw["defaults"]
        return Profiles(
            gpus=gpus,
            cpus=cpus,
            machines=machines,
            default_gpu=gpus[defaults["gpu"]],
            default_pcie_bw=parse_rate(defaults["pcie"]),
            default_disk_bw=parse_rate(defaults["disk"]),
            classes=_classes(defaults["classes"], machines),
        )
    except (OSError, tomllib.TOMLDecodeError, KeyError, TypeError, UnitError) as exc:
        raise ProfileError(f"{path}: malformed hardware profiles ({type(exc).__name__}: {exc})") from None


def _classes(names: list[str], machines: dict[str, MachineProfile]) -> tuple[MachineProfile, ...]:
    if not names:
        raise KeyError("defaults.classes names no machine")
    return tuple(machines[name] for name in names)


def _gpu(key: str, entry: dict) -> GpuSpec:
    return GpuSpec(
        key=key,
        name=entry["name"],
        memory_bytes=parse_bytes(entry["memory"]),
        bandwidth=parse_rate(entry["bandwidth"]),
        flops=parse_flops(entry["flops"]),
    )


def _cpu(key: str, entry: dict) -> CpuSpec:
    return CpuSpec(
        key=key,
        name=entry["name"],
        cores=int(entry["cores"]),
        bandwidth=parse_rate(entry["bandwidth"]),
        flops=parse_flops(entry["flops"]),
    )


def _machine(key: str, entry: dict, gpus: dict[str, GpuSpec], cpus: dict[str, CpuSpec]) -> MachineProfile:
    return MachineProfile(
        name=key,
        description=entry["description"],
        gpu=gpus[entry["gpu"]] if "gpu" in entry else None,
        cpu=cpus[entry["cpu"]],
        ram_bytes=parse_bytes(entry["ram"]),
        pcie_bw=parse_rate(entry.get("pcie", 0)),
        disk_bw=parse_rate(entry["disk"]),
    )
