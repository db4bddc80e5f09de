"""Hardware: units as people write them, named profiles, stated overrides, detection and its cache."""

from __future__ import annotations

import json
import subprocess
import sys
import types
from dataclasses import replace

import pytest
import torch

from localv3.offload import hardware as hw_module
from localv3.offload.kernel_probe import CpuKernels
from localv3.offload.hardware import Achievable, HardwareError, detect_hardware, gpu_rates, hardware_from_profile
from localv3.offload.stated import StatedHardware, hardware_for, stated_machine
from localv3.offload.profiles import ProfileError, load_profiles
from localv3.offload.units import UnitError, format_flops, format_rate, parse_bytes, parse_flops, parse_rate

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
        ("123B", 123),
        ("8gib", 8 * GiB),
        ("0", 0),  # zero needs no unit
        (0, 0),
        (4096, 4096),  # a number from code is bytes
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
        ("1e9B/s", 1e9),
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


@pytest.mark.parametrize("parse", [parse_bytes, parse_rate, parse_flops])
@pytest.mark.parametrize("text", ["24", "1e9", "460.8", "25/s"])
def test_written_figures_need_a_unit(parse, text):
    """`--gpu-mem 24` is not 24 bytes: a unit must be written (zero excepted)."""
    with pytest.raises(UnitError, match="no unit"):
        parse(text)


@pytest.mark.parametrize("parse", [parse_bytes, parse_rate, parse_flops])
@pytest.mark.parametrize("text", ["1e300T", "1e99999999G", "9" * 400 + "T", 1e300, 10**400])
def test_absurd_figures_are_refused_not_overflowed(parse, text):
    with pytest.raises(UnitError, match="too large"):
        parse(text)


@pytest.mark.parametrize("parse", [parse_bytes, parse_rate, parse_flops])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -1, "nan", "inf", "-5G"])
def test_nan_infinite_and_negative_figures_are_refused(parse, value):
    with pytest.raises(UnitError):
        parse(value)


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


def test_stated_cores_scale_the_cpu_flops_at_the_per_core_rate():
    epyc = hardware_from_profile("rtx4090-epyc-12ch")  # 96 cores, 7.4 TFLOP/s
    hw = StatedHardware(cores=32).apply(epyc)
    assert hw.physical_cores == 32 and hw.cpu_flops == pytest.approx(7.4e12 * 32 / 96)
    assert "32 cores at 77.1 GFLOP/s each" in hw.basis["cpu_flops"] and "state --cpu-flops" in hw.basis["cpu_flops"]
    both = StatedHardware(cores=32, cpu_flops=3e12).apply(epyc)
    assert both.cpu_flops == 3e12 and "cpu_flops" not in both.basis


def test_option_texts_are_read_and_their_errors_name_the_option():
    stated = StatedHardware.from_text(cpu_flops="7.4TFLOPS", gpu_mem="24GiB", cores=8)
    assert (stated.cpu_flops, stated.gpu_mem, stated.cores) == (7.4e12, 24 * GiB, 8)
    with pytest.raises(UnitError, match=r"^--gpu-mem: '24' has no unit"):
        StatedHardware.from_text(gpu_mem="24")
    with pytest.raises(UnitError, match=r"^--cpu-flops: '1e300T' is too large"):
        StatedHardware.from_text(cpu_flops="1e300T")


@pytest.mark.parametrize("field", ["ram", "cpu_bw", "cpu_flops", "gpu_bw", "pcie"])
def test_zero_rates_and_memory_are_refused(field):
    with pytest.raises(HardwareError, match=f"--{field.replace('_', '-')} must be above zero"):
        StatedHardware(**{field: 0})


def test_absurd_core_counts_are_refused():
    with pytest.raises(HardwareError, match="--cores 1000000000"):
        StatedHardware(cores=10**9)


@pytest.fixture
def no_detection(monkeypatch):
    """Detecting or measuring this machine fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("a plan for stated hardware looked at this machine")

    for name in ("detect_hardware", "measure_cpu", "measure_cpu_kernels", "measure_pcie"):
        monkeypatch.setattr(hw_module, name, refuse)
    monkeypatch.setattr("localv3.offload.stated.detect_hardware", refuse)


@pytest.mark.parametrize(
    "stated, machine",
    [
        ({"ram": 128 * GiB}, "rtx4090-ddr5-dual"),
        ({"ram": 512 * GiB}, "rtx4090-epyc-12ch"),
        ({"cores": 32}, "rtx4090-epyc-12ch"),
        ({"cpu_bw": 90e9, "gpu_mem": 0}, "rtx4090-ddr5-dual"),
        ({"ram": 4 * 2**40}, "rtx4090-epyc-12ch"),  # beyond every class: the largest
    ],
)
def test_stated_hardware_is_planned_on_the_class_that_covers_it(no_detection, stated, machine):
    hw = hardware_for(None, StatedHardware(**stated))
    profile = hardware_from_profile(machine)
    assert hw.source == f"stated; the rest as profile {machine}"
    stated_by = {"cpu_bw": "cpu_bw", "physical_cores": "cores", "ram_bytes": "ram", "cpu_flops": "cores"}
    for figure in ("cpu_bw", "cpu_flops", "physical_cores", "ram_bytes", "disk_bw"):
        if stated_by.get(figure) not in stated:
            assert getattr(hw, figure) == getattr(profile, figure), figure
    assert hw.cpu_kernels is None and hw.kernels.read_fraction == {"q4": 0.65, "q8": 0.7}


def test_every_figure_not_stated_is_said_to_be_assumed(no_detection):
    hw = stated_machine(StatedHardware(ram=512 * GiB))
    assert "ram" not in hw.basis and hw.ram_bytes == 512 * GiB
    options = {"gpu": "--gpu-mem", "gpu_bw": "--gpu-bw", "pcie_bw": "--pcie", "cpu_bw": "--cpu-bw", "cores": "--cores", "cpu_flops": "--cpu-flops"}
    for figure, option in options.items():
        assert hw.basis[figure].startswith("assumed") and f"(state {option}" in hw.basis[figure], figure
    assert {"gpu_flops", "cpu_kernels", "disk_bw"} <= hw.basis.keys()
    assert hw.cpu_name == "stated CPU" and hw.gpu_name == "assumed NVIDIA GeForce RTX 4090"
    everything = StatedHardware(gpu_mem=24 * GiB, ram=512 * GiB, cpu_bw=460e9, cpu_flops=3e12, gpu_bw=1e12, pcie=25e9, cores=32)
    assert set(stated_machine(everything).basis) == {"gpu_flops", "cpu_kernels", "disk_bw"}


def test_without_stated_cpu_bandwidth_the_header_shows_the_class_not_this_machine(no_detection):
    hw = hardware_for(None, StatedHardware(ram=512 * GiB, gpu_mem=24 * GiB))
    assert "461 GB/s" in hw.describe() and "512.00 GiB RAM" in hw.describe()


def test_a_profile_with_stated_figures_and_this_machine_when_nothing_is_stated(monkeypatch):
    assert hardware_for("cpu-only", StatedHardware(ram=64 * GiB)).source == "profile cpu-only + stated"
    monkeypatch.setattr("localv3.offload.stated.detect_hardware", lambda: "detected")
    assert hardware_for(None, StatedHardware()) == "detected"


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
    assert first.cpu_name
    if not torch.cuda.is_available():
        assert not first.has_gpu


def test_a_cache_from_another_machine_is_measured_again(home, monkeypatch):
    home.mkdir(parents=True)
    (home / "hardware.json").write_text(json.dumps({"cpu_name": "elsewhere", "cpu_bw": 1.0}))
    monkeypatch.setattr(hw_module, "measure_cpu", lambda: (30e9, 200e9))
    assert detect_hardware().cpu_bw == 30e9
    assert json.loads((home / "hardware.json").read_text())["cpu_bw"] == 30e9


@pytest.mark.parametrize(
    "corrupt",
    [
        {"cpu_bw": 0},
        {"cpu_bw": -5e9},
        {"cpu_bw": "fast"},
        {"cpu_flops": float("nan")},
        {"cpu_flops": None},
        {"cpu_bw": True},
        {"measured_at": 7},
        {"cpu_kernels": {"read_fraction": {"q4": 0}, "flops": {}, "expert_flops": {}, "op_seconds": 1e-6, "graph_seconds": 1e-5}},
        {"cpu_kernels": {"read_fraction": {}, "flops": {"q4": "x"}, "expert_flops": {}, "op_seconds": 1e-6, "graph_seconds": 1e-5}},
        {"cpu_kernels": {"read_fraction": {}, "flops": {}, "expert_flops": {}, "op_seconds": -1, "graph_seconds": 1e-5}},
    ],
)
def test_a_corrupt_cached_value_is_measured_again(home, monkeypatch, corrupt):
    monkeypatch.setattr(hw_module, "measure_cpu", lambda: (20e9, 100e9))
    detect_hardware()
    cache = home / "hardware.json"
    cache.write_text(json.dumps({**json.loads(cache.read_text()), **corrupt}))
    monkeypatch.setattr(hw_module, "measure_cpu", lambda: (30e9, 200e9))
    hw = detect_hardware()
    assert hw.cpu_bw > 0 and hw.cpu_flops > 0 and hw.kernels.read_rate("q4", hw.cpu_bw) > 0
    if "cpu_kernels" not in corrupt:
        assert hw.cpu_bw == 30e9 and json.loads(cache.read_text())["cpu_bw"] == 30e9


@pytest.mark.parametrize("missing", ["cpu_bw", "cpu_flops", "pcie_bw", "measured_at"])
def test_a_cache_missing_a_figure_is_measured_again(home, monkeypatch, missing):
    monkeypatch.setattr(hw_module, "measure_cpu", lambda: (20e9, 100e9))
    detect_hardware()
    cache = home / "hardware.json"
    cache.write_text(json.dumps({k: v for k, v in json.loads(cache.read_text()).items() if k != missing}))
    monkeypatch.setattr(hw_module, "measure_cpu", lambda: (30e9, 200e9))
    assert detect_hardware().cpu_bw == 30e9


MEASURED_KERNELS = CpuKernels(
    {"q4": 0.6, "q8": 0.7}, {"q4": 80e9, "q8": 60e9}, {"q4": 70e9, "q8": 50e9}, 3e-6, 20e-6, decode_kernels="localv3 build-a"
)


def test_detected_kernel_rates_are_measured_once_cached_and_dropped_for_stated_memory(home, monkeypatch):
    calls = []
    monkeypatch.setattr(hw_module, "measure_cpu", lambda: (20e9, 100e9))
    monkeypatch.setattr(hw_module, "decode_kernels", lambda: "localv3 build-a")
    monkeypatch.setattr(hw_module, "measure_cpu_kernels", lambda cpu_bw: calls.append(cpu_bw) or MEASURED_KERNELS)
    first, second = detect_hardware(), detect_hardware()
    assert calls == [20e9] and first.kernels == second.kernels == MEASURED_KERNELS
    assert first.kernels.read_rate("q4", 20e9) == 12e9 and first.kernels.read_rate("fp32", 20e9) == 20e9
    assert first.kernels.flop_rate("q4", 1e9) == 80e9 and first.kernels.flop_rate("q4", 1e9, experts=True) == 70e9
    assert "q4 60%" in first.basis["cpu_kernels"]
    stated = StatedHardware(cpu_bw=400e9).apply(first)  # another machine's memory: assumed kernels
    assert stated.kernels.read_fraction == {"q4": 0.65, "q8": 0.7}


def test_kernel_rates_of_other_decode_kernels_are_measured_again(home, monkeypatch):
    """A cache measured with ggml's decode kernels (or another build of ours) is re-measured once
    the kernels change; the machine's bandwidth and FLOP/s are kept."""
    measured = []
    monkeypatch.setattr(hw_module, "measure_cpu", lambda: (20e9, 100e9))

    def measure(cpu_bw: float) -> CpuKernels:
        measured.append(hw_module.decode_kernels())
        return replace(MEASURED_KERNELS, decode_kernels=hw_module.decode_kernels())

    monkeypatch.setattr(hw_module, "measure_cpu_kernels", measure)
    for kernels in ("ggml", "ggml", "localv3 build-b", "localv3 build-b"):
        monkeypatch.setattr(hw_module, "decode_kernels", lambda kernels=kernels: kernels)
        assert detect_hardware().kernels.decode_kernels == kernels
    assert measured == ["ggml", "localv3 build-b"]


def test_prefill_rates_are_interpolated_between_the_two_measured_sizes():
    """Dense products measured at 64 and 256 rows, experts at 16 and 64 rows each: halfway in
    log(rows) gets the mean rate, and beyond either size that size's rate."""
    kernels = CpuKernels({}, {"q4": 100e9}, {"q4": 40e9}, 0.0, 0.0, {"q4": 300e9}, {"q4": 80e9})
    dense = [kernels.flop_rate("q4", 1e9, rows=rows) for rows in (1, 64, 128, 256, 4096)]
    assert dense == pytest.approx([100e9, 100e9, 200e9, 300e9, 300e9])
    experts = [kernels.flop_rate("q4", 1e9, experts=True, rows=rows) for rows in (4, 16, 32, 64, 512)]
    assert experts == pytest.approx([40e9, 40e9, 60e9, 80e9, 80e9])
    assert kernels.flop_rate("q4", 1e9) == 100e9 and kernels.flop_rate("fp32", 1e9, rows=128) == 1e9
    older = {k: v for k, v in kernels.to_dict().items() if not k.startswith("large_")}  # a cache from before
    assert CpuKernels.from_dict(older).flop_rate("q4", 1e9, rows=256) == 100e9


def test_kernel_probe_measures_every_scheme(monkeypatch):
    from localv3.offload import kernel_probe

    monkeypatch.setattr(kernel_probe, "READ_SET_BYTES", 8 * 2**20)
    monkeypatch.setattr(kernel_probe, "DENSE_BATCHES", (4, 8))
    monkeypatch.setattr(kernel_probe, "EXPERT_BATCHES", (2, 4))
    kernels = kernel_probe.measure_cpu_kernels(20e9, repeats=1)
    rates = (kernels.flops, kernels.expert_flops, kernels.large_flops, kernels.large_expert_flops)
    assert set(kernels.read_fraction) == {"q4", "q8"} and all(set(r) == {"q4", "q8"} for r in rates)
    assert all(v > 0 for v in [*kernels.read_fraction.values(), *(v for r in rates for v in r.values())])
    assert 0 < kernels.op_seconds < 1e-3 and 0 < kernels.graph_seconds < 1e-1
    assert CpuKernels.from_dict(kernels.to_dict()) == kernels


def test_gpu_detection_through_torch_cuda(home, monkeypatch, tmp_path):
    """The CUDA path, with torch.cuda answering as an RTX 4090 would."""
    props = types.SimpleNamespace(name="NVIDIA GeForce RTX 4090", memory_clock_rate=10501000, memory_bus_width=384)
    monkeypatch.setattr(hw_module, "GPU_DEVICE_NODES", (str(tmp_path),))  # a driver's device node exists
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


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="device nodes are how Linux shows a GPU")
def test_without_a_gpu_driver_detection_does_not_import_torch(tmp_path):
    probe = (
        "import sys; import localv3.offload.hardware as h; h.GPU_DEVICE_NODES = (sys.argv[1],); "
        "assert h._detect_gpu({}) is None; assert 'torch' not in sys.modules, 'torch imported'"
    )
    done = subprocess.run([sys.executable, "-c", probe, str(tmp_path / "no-such-node")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_an_unknown_gpu_without_memory_facts_gets_assumed_rates():
    basis = {}
    rates = gpu_rates(types.SimpleNamespace(name="Future GPU 9000"), basis)
    default = load_profiles().default_gpu
    assert rates == {"bandwidth": default.bandwidth, "flops": default.flops}
    assert "assumed" in basis["gpu_bw"] and "assumed" in basis["gpu_flops"]


def test_the_cpu_probe_is_bytes_and_flops_over_the_time_it_measures(monkeypatch):
    """The probe's rates are the bytes its product reads and the FLOPs its matrix product does,
    over the times best_time reports (here made up: 0.25 s and 0.5 s)."""
    results, seconds = [], iter([0.25, 0.5])
    monkeypatch.setattr(hw_module, "best_time", lambda work, repeats: results.append(work()) or next(seconds))
    read_bw, flops = hw_module.measure_cpu(buffer_bytes=32 * 2**20, repeats=1)
    rows = 32 * 2**20 // (4 * 4096)  # fp32 rows of 4096
    product, square = results
    assert product.shape == (rows,) and torch.equal(product, torch.full((rows,), 4096.0))  # ones . ones: every weight read
    assert square.shape == (1024, 1024)
    assert read_bw == rows * 4096 * 4 / 0.25 == 32 * 2**20 / 0.25
    assert flops == 2 * 1024**3 / 0.5


@pytest.mark.gpu
def test_detection_on_a_real_gpu(home):
    hw = detect_hardware()
    assert hw.has_gpu and hw.gpu_mem_bytes >= hw.gpu_free_bytes > 0 and hw.gpu_bw > 1e11
    assert hw.pcie_bw > 1e9
