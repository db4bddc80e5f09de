"""Hardware: units as people write them, named profiles, stated overrides, detection and its cache."""

from __future__ import annotations

import json
import types

import pytest
import torch

from offload import hardware as hw_module
from offload.kernel_probe import CpuKernels
from offload.hardware import Achievable, HardwareError, StatedHardware, detect_hardware, gpu_rates, hardware_from_profile
from offload.profiles import ProfileError, load_profiles
from offload.units import UnitError, format_flops, format_rate, parse_bytes, parse_flops, parse_rate

GiB = 2**30


# ----- units ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text, expected",
    [
        ("24GiB", 24 * GiB),
        ("512G", 512 * GiB),  # a bare letter is binary, as `free -g` reads it
        ("96GB", 96 * 10**9),
        (" 24 GiB ", 24 * GiB),
        ("1.5T", int(1.5 * 2**40)),
        ("64k", 64 * 1024),
        ("123", 123),
        ("8gib", 8 * GiB),
        (0, 0),
        (4096, 4096),
    ],
)
def test_sizes_parse_as_people_write_them(text, expected):
    assert parse_bytes(text) == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        ("300GB/s", 300e9),
        ("25 GB/s", 25e9),
        ("1.5TB/s", 1.5e12),
        ("460.8GB", 460.8e9),
        ("2GiB/s", 2 * GiB),
        ("12.5 GB / s", 12.5e9),
        ("1e9", 1e9),
    ],
)
def test_rates_parse_decimal_as_hardware_is_specified(text, expected):
    assert parse_rate(text) == pytest.approx(expected)


@pytest.mark.parametrize("text, expected", [("165TFLOPS", 165e12), ("71 TFLOP/s", 71e12), ("2.3T", 2.3e12), ("800GFLOPS", 8e11)])
def test_flop_rates_parse(text, expected):
    assert parse_flops(text) == pytest.approx(expected)


@pytest.mark.parametrize("text", ["24GX", "lots", "", "GiB", "-5GB", "24 G iB", "1.2.3G"])
def test_bad_sizes_name_the_input_and_show_an_example(text):
    with pytest.raises(UnitError) as error:
        parse_bytes(text)
    message = str(error.value)
    assert repr(text) in message and "24GiB" in message


def test_a_rate_is_not_a_size_and_nonsense_is_not_a_rate():
    with pytest.raises(UnitError, match="is a rate, not a size"):
        parse_bytes("300GB/s")
    with pytest.raises(UnitError, match="300GB/s"):
        parse_rate("fast")
    with pytest.raises(UnitError, match="FLOP rate"):
        parse_flops("165TB")


def test_formatting_rates_and_flops():
    assert format_rate(460.8e9) == "461 GB/s"
    assert format_rate(25e9) == "25.0 GB/s"
    assert format_rate(1.008e12) == "1.01 TB/s"
    assert format_flops(165e12) == "165 TFLOP/s"


# ----- profiles ------------------------------------------------------------------------------
def test_every_profile_loads_with_sane_figures():
    profiles = load_profiles()
    assert {"rtx4090-epyc-12ch", "rtx3090-ddr4-dual", "rtx4090-xeon-8ch", "rtx4060ti-desktop", "cpu-only"} <= set(
        profiles.machines
    )
    for name in profiles.machines:
        hw = hardware_from_profile(name)
        assert hw.ram_bytes >= 64 * GiB and hw.cpu_bw > 40e9 and hw.cpu_flops > 1e12 and hw.disk_bw > 1e9
        if hw.has_gpu:
            assert hw.gpu_mem_bytes >= 16 * GiB and hw.gpu_bw > 200e9 and hw.gpu_flops > 40e12 and hw.pcie_bw >= 12e9


def test_the_epyc_profile_carries_the_public_figures():
    hw = hardware_from_profile("rtx4090-epyc-12ch")
    assert hw.gpu_name == "NVIDIA GeForce RTX 4090"
    assert hw.gpu_mem_bytes == hw.gpu_free_bytes == 24 * GiB
    assert hw.gpu_bw == pytest.approx(1008e9) and hw.cpu_bw == pytest.approx(460.8e9)
    assert hw.physical_cores == 96 and hw.ram_bytes == 768 * GiB and hw.pcie_bw == pytest.approx(25e9)
    assert hw.effective("cpu_bw") == pytest.approx(460.8e9 * Achievable().cpu_bw)  # peak and fraction kept apart


def test_cpu_only_profile_has_no_gpu():
    hw = hardware_from_profile("cpu-only")
    assert not hw.has_gpu and hw.gpu_mem_bytes == 0 and "no GPU" in hw.describe()


def test_unknown_profile_lists_the_known_ones():
    with pytest.raises(ProfileError, match="rtx4090-epyc-12ch"):
        hardware_from_profile("rtx9090-dream")


def test_profiles_know_gpus_by_the_name_torch_reports():
    assert load_profiles().gpu_named("NVIDIA GeForce RTX 3090").key == "rtx3090"
    assert load_profiles().gpu_named("Some Other GPU") is None


# ----- stated figures ------------------------------------------------------------------------
def test_stated_figures_replace_profile_figures():
    stated = StatedHardware.from_text(gpu_mem="16GiB", ram="256GiB", cpu_bw="300GB/s", pcie="50GB/s", cores=32)
    hw = stated.apply(hardware_from_profile("rtx4090-epyc-12ch"))
    assert hw.gpu_mem_bytes == hw.gpu_free_bytes == 16 * GiB
    assert hw.ram_bytes == hw.ram_available_bytes == 256 * GiB
    assert hw.cpu_bw == 300e9 and hw.pcie_bw == 50e9 and hw.physical_cores == 32
    assert hw.source == "profile rtx4090-epyc-12ch + stated"


def test_stating_nothing_changes_nothing():
    base = hardware_from_profile("rtx3090-ddr4-dual")
    assert StatedHardware().apply(base) is base


def test_gpu_mem_zero_removes_the_gpu():
    hw = StatedHardware(gpu_mem=0).apply(hardware_from_profile("rtx4090-epyc-12ch"))
    assert not hw.has_gpu


def test_a_gpu_stated_on_a_machine_without_one_gets_assumed_rates_said_so():
    hw = StatedHardware(gpu_mem=8 * GiB).apply(hardware_from_profile("cpu-only"))
    assert hw.has_gpu and hw.gpu_mem_bytes == 8 * GiB and hw.gpu_bw > 0 and hw.pcie_bw > 0
    assert "assumed" in hw.basis["gpu_bw"] and "assumed" in hw.basis["pcie_bw"]
    stated_bw = StatedHardware(gpu_mem=8 * GiB, gpu_bw=288e9).apply(hardware_from_profile("cpu-only"))
    assert stated_bw.gpu_bw == 288e9 and "gpu_bw" not in stated_bw.basis


def test_gpu_bandwidth_without_a_gpu_is_refused():
    with pytest.raises(HardwareError, match="--gpu-mem"):
        StatedHardware(gpu_bw=1e12).apply(hardware_from_profile("cpu-only"))


def test_bad_stated_values_are_refused():
    with pytest.raises(UnitError):
        StatedHardware.from_text(ram="lots")
    with pytest.raises(HardwareError, match="--cores 0"):
        StatedHardware.from_text(cores=0)


# ----- detection -----------------------------------------------------------------------------
@pytest.fixture
def home(tmp_path, monkeypatch):
    """An empty home: detection measures again (the kernel probe's figures made up, as the
    bandwidth's are where a test fakes measure_cpu; the probe has a test of its own)."""
    monkeypatch.setenv("LOCALV3_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(hw_module, "measure_cpu_kernels", lambda cpu_bw: MEASURED_KERNELS)
    return tmp_path / "home"


def test_detection_measures_once_then_reads_the_cache(home, monkeypatch):
    calls = []

    def fake_measure():
        calls.append(1)
        return 20e9, 100e9

    monkeypatch.setattr(hw_module, "measure_cpu", fake_measure)
    first = detect_hardware()
    second = detect_hardware()
    assert len(calls) == 1
    assert first.cpu_bw == second.cpu_bw == 20e9 and first.cpu_flops == 100e9
    assert first.achievable.cpu_bw == 1.0  # a measured figure is already achievable
    assert "measured" in second.basis["cpu_bw"] and str(home) in second.basis["cpu_bw"]
    assert first.physical_cores >= 1 and first.ram_bytes > 0 and 0 < first.ram_available_bytes <= first.ram_bytes
    assert first.numa_nodes >= 1 and first.disk_free_bytes and first.cpu_name
    if not torch.cuda.is_available():
        assert not first.has_gpu


def test_a_cache_from_another_machine_is_measured_again(home, monkeypatch):
    home.mkdir(parents=True)
    (home / "hardware.json").write_text(json.dumps({"cpu_name": "elsewhere", "cpu_bw": 1.0}))
    monkeypatch.setattr(hw_module, "measure_cpu", lambda: (30e9, 200e9))
    assert detect_hardware().cpu_bw == 30e9
    assert json.loads((home / "hardware.json").read_text())["cpu_bw"] == 30e9


MEASURED_KERNELS = CpuKernels({"q4": 0.6, "q8": 0.7}, {"q4": 80e9, "q8": 60e9}, {"q4": 70e9, "q8": 50e9}, 3e-6, 20e-6)


def test_detected_kernel_rates_are_measured_once_cached_and_dropped_for_stated_memory(home, monkeypatch):
    calls = []
    monkeypatch.setattr(hw_module, "measure_cpu", lambda: (20e9, 100e9))
    monkeypatch.setattr(hw_module, "measure_cpu_kernels", lambda cpu_bw: calls.append(cpu_bw) or MEASURED_KERNELS)
    first, second = detect_hardware(), detect_hardware()
    assert calls == [20e9] and first.kernels == second.kernels == MEASURED_KERNELS
    assert first.kernels.read_rate("q4", 20e9) == 12e9 and first.kernels.read_rate("fp32", 20e9) == 20e9
    assert first.kernels.flop_rate("q4", 1e9) == 80e9 and first.kernels.flop_rate("q4", 1e9, experts=True) == 70e9
    assert "q4 60%" in first.basis["cpu_kernels"]
    stated = StatedHardware(cpu_bw=400e9).apply(first)  # another machine's memory: assumed kernels
    assert stated.kernels.read_fraction == {"q4": 0.65, "q8": 0.7}


def test_kernel_probe_measures_every_scheme(monkeypatch):
    from offload import kernel_probe

    monkeypatch.setattr(kernel_probe, "READ_SET_BYTES", 8 * 2**20)
    monkeypatch.setattr(kernel_probe, "PREFILL_TOKENS", 4)
    kernels = kernel_probe.measure_cpu_kernels(20e9, repeats=1)
    assert set(kernels.read_fraction) == set(kernels.flops) == set(kernels.expert_flops) == {"q4", "q8"}
    assert all(v > 0 for v in [*kernels.read_fraction.values(), *kernels.flops.values(), *kernels.expert_flops.values()])
    assert 0 < kernels.op_seconds < 1e-3 and 0 < kernels.graph_seconds < 1e-1
    assert CpuKernels.from_dict(kernels.to_dict()) == kernels


def test_gpu_detection_through_torch_cuda(home, monkeypatch):
    """The CUDA path, with torch.cuda answering as an RTX 4090 would."""
    props = types.SimpleNamespace(name="NVIDIA GeForce RTX 4090", memory_clock_rate=10501000, memory_bus_width=384)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: props)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda index: (23 * GiB, 24 * GiB))
    monkeypatch.setattr(hw_module, "measure_cpu", lambda: (20e9, 100e9))
    monkeypatch.setattr(hw_module, "measure_pcie", lambda: 24e9)
    hw = detect_hardware()
    assert hw.has_gpu and hw.gpu_name == "NVIDIA GeForce RTX 4090"
    assert hw.gpu_mem_bytes == 24 * GiB and hw.gpu_free_bytes == 23 * GiB
    assert hw.gpu_bw == pytest.approx(1008.096e9) and hw.gpu_flops == pytest.approx(165e12)
    assert hw.pcie_bw == 24e9 and "measured" in hw.basis["pcie_bw"]


def test_an_unknown_gpu_without_memory_facts_gets_assumed_rates():
    basis = {}
    rates = gpu_rates(types.SimpleNamespace(name="Future GPU 9000"), basis)
    default = load_profiles().default_gpu
    assert rates == {"bandwidth": default.bandwidth, "flops": default.flops}
    assert "assumed" in basis["gpu_bw"] and "assumed" in basis["gpu_flops"]


def test_the_cpu_probe_measures_something_plausible():
    read_bw, flops = hw_module.measure_cpu(buffer_bytes=32 * 2**20, repeats=1)
    assert 1e8 < read_bw < 1e13 and 1e8 < flops < 1e15


@pytest.mark.gpu
def test_detection_on_a_real_gpu(home):
    hw = detect_hardware()
    assert hw.has_gpu and hw.gpu_mem_bytes >= hw.gpu_free_bytes > 0 and hw.gpu_bw > 1e11
    assert hw.pcie_bw > 1e9
