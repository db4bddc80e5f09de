"""`localv3 plan`: tables on stdout, hardware notes on stderr, --json as data, one-line errors."""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

import cli
from cli import app
from localv3.engines import DEFAULT_MAX_CONTEXT
from localv3.errors import LocalV3Error
from localv3.offload.planner import Fix, PlanError

runner = CliRunner()
CONFIGS = Path(__file__).resolve().parents[1] / "localv3" / "assets" / "configs"
V3 = str(CONFIGS / "deepseek-v3.json")
MOONLIGHT = str(CONFIGS / "moonlight-16b-a3b-instruct.json")


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    """An empty LOCALV3_HOME and hub cache: nothing on this machine leaks in."""
    monkeypatch.setenv("LOCALV3_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)


def plan_json(*args: str) -> dict:
    result = runner.invoke(app, ["plan", *args, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_tables_on_stdout_hardware_on_stderr():
    result = runner.invoke(app, ["plan", V3, "--profile", "rtx4090-epyc-12ch", "--ram", "512GiB"])
    assert result.exit_code == 0, result.output
    for heading in ("placement", "memory by device", "KV cache", "predicted", "routed experts", "attention (MLA)", "bottleneck"):
        assert heading in result.stdout
    summary = result.stdout.strip().splitlines()[-1]
    assert summary.startswith("deepseek-v3: ") and "tok/s decode" in summary and "bound by" in summary
    assert result.stderr.startswith("hardware (profile rtx4090-epyc-12ch + stated): NVIDIA GeForce RTX 4090")


def test_json_is_the_plan_as_data_and_nothing_else_on_stdout():
    data = plan_json(V3, "--profile", "rtx4090-epyc-12ch", "--ram", "256GiB", "--context", "4096")
    assert data["model"] == "deepseek-v3" and data["kv_cache"]["context"] == 4096
    assert {d["name"] for d in data["devices"]} == {"gpu", "cpu", "disk"}
    assert data["predicted"]["bottleneck"] == "disk reads"
    assert data["quantization"] == {"experts": "q4", "dense": "q8", "embeddings": "bf16"}


def test_stated_hardware_flags_reach_the_plan():
    data = plan_json(
        MOONLIGHT, "--profile", "rtx4090-epyc-12ch", "--gpu-mem", "8GiB", "--ram", "32GiB",
        "--cpu-bw", "100GB/s", "--gpu-bw", "500GB/s", "--pcie", "12.5GB/s", "--cores", "8",
    )
    hw = data["hardware"]
    assert (hw["gpu_mem_bytes"], hw["ram_bytes"], hw["physical_cores"]) == (8 * 2**30, 32 * 2**30, 8)
    assert (hw["cpu_bw"], hw["gpu_bw"], hw["pcie_bw"]) == (100e9, 500e9, 12.5e9)
    devices = {g["device"] for g in data["groups"] if g["kind"] == "routed_expert"}
    assert devices == {"gpu", "cpu"}  # Moonlight in q4 offloads experts on 8 GiB


def test_overrides_and_quantisation_flags():
    data = plan_json(MOONLIGHT, "--profile", "rtx4090-epyc-12ch", "--n-cpu-moe", "10", "--experts", "q8", "--dense", "bf16")
    for g in data["groups"]:
        if g["kind"] == "routed_expert":
            assert g["device"] == ("cpu" if g["layer"] < 10 else "gpu")
    assert data["quantization"]["experts"] == "q8" and data["quantization"]["dense"] == "bf16"
    cpu_moe = plan_json(MOONLIGHT, "--profile", "rtx4090-epyc-12ch", "--cpu-moe")
    assert {g["device"] for g in cpu_moe["groups"] if g["kind"] == "routed_expert"} == {"cpu"}
    no_mtp = plan_json(V3, "--profile", "cpu-only", "--no-mtp", "--context", "2048")
    assert max(g["layer"] for g in no_mtp["groups"] if g["layer"] is not None) == 60


def test_a_model_directory_and_a_registry_name(tmp_path):
    model_dir = tmp_path / "my-moonlight"
    model_dir.mkdir()
    shutil.copy(MOONLIGHT, model_dir / "config.json")
    assert plan_json(str(model_dir), "--profile", "cpu-only")["model"] == "my-moonlight"
    assert plan_json(str(model_dir / "config.json"), "--profile", "cpu-only")["model"] == "my-moonlight"
    named = plan_json("deepseek-v3", "--profile", "rtx4090-epyc-12ch")  # shipped config, nothing downloaded
    assert named["model"] == "deepseek-v3" and len(named["groups"]) > 300


def test_the_default_context_is_capped_by_the_model():
    assert plan_json(MOONLIGHT, "--profile", "cpu-only")["kv_cache"]["context"] == DEFAULT_MAX_CONTEXT


def run_main(monkeypatch, capsys, args: list[str]) -> tuple[int, str, str]:
    """The real entry point, as the console script runs it: exit code, stdout, stderr."""
    monkeypatch.setattr(sys, "argv", ["localv3", *args])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
        raise SystemExit(0)
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


@pytest.mark.parametrize(
    "args, message",
    [
        (["--gpu-mem", "24GX"], "--gpu-mem: '24GX' is not a size"),
        (["--gpu-mem", "24"], "--gpu-mem: '24' has no unit; write e.g. 24GiB"),
        (["--ram", "512"], "--ram: '512' has no unit"),
        (["--cpu-bw", "460"], "--cpu-bw: '460' has no unit; write e.g. 300GB/s"),
        (["--cpu-flops", "7e12"], "--cpu-flops: '7e12' has no unit"),
        (["--gpu-mem", "1e300GiB"], "--gpu-mem: '1e300GiB' is too large for a size"),
        (["--ram", "nan"], "--ram: 'nan' is not a size"),
        (["--pcie", "inf"], "--pcie: 'inf' is not a bandwidth"),
        (["--ram", "-1GiB"], "--ram: '-1GiB' is not a size"),
        (["--cpu-bw", "0"], "--cpu-bw must be above zero"),
        (["--cores", "100000000"], "--cores 100000000"),
        (["--embeddings", "q4"], "unknown quantisation 'q4' for --embeddings; choose one of bf16, fp8"),
        (["--profile", "nope"], "unknown hardware profile 'nope'"),
        (["--experts", "q3"], "unknown quantisation 'q3'"),
        (["--ram", "64GiB", "--no-disk"], "does not fit"),
        (["--ram", "512GiB", "--no-disk", "--experts", "bf16"], "the smallest change that fits: --experts q4 (or "),
        (["--ram", "128GiB", "--no-disk"], "the smallest change that fits: experts spilling to disk (drop --no-disk)"),
        (["--context", "1000000"], "--context 1000000: longer than deepseek-v3 supports"),
        (["--context", "1000000"], "the smallest change that fits: --context 163840"),
        (["--cpu-moe", "--gpu-experts", "2"], "--cpu-moe and --gpu-experts contradict each other; give one"),
        (["--n-cpu-moe", "-2"], "--n-cpu-moe -2: must not be negative"),
    ],
)
def test_errors_reach_the_user_as_one_line(monkeypatch, capsys, args, message):
    base = ["--profile", "rtx4090-epyc-12ch"] if "--profile" not in args else []
    code, out, err = run_main(monkeypatch, capsys, ["plan", V3, *base, *args])
    assert code == 1 and out == ""
    lines = err.strip().splitlines()
    assert lines[-1].startswith("error: ") and message in lines[-1], err
    assert all(line.startswith(("hardware", "  ")) for line in lines[:-1])  # only the hardware notes before it


def test_a_localv3_checkpoint_is_planned_as_it_stores_its_weights(tmp_path):
    """What the engine will load (q8 experts, q4 dense here), unless other schemes are stated."""
    from localv3.quantize import QuantizeSettings, quantize_checkpoint
    from localv3.synthetic import write_checkpoint
    from model_configs import TINY_V3

    source = write_checkpoint(tmp_path / "src", {**TINY_V3, "q_lora_rank": 64})
    target = quantize_checkpoint(source, tmp_path / "q", QuantizeSettings(experts="q8", dense="q4"), {"model": "t"}).path
    assert plan_json(str(target))["quantization"] == {"experts": "q8", "dense": "q4", "embeddings": "bf16"}
    assert plan_json(str(target), "--experts", "q4")["quantization"]["experts"] == "q4"
    assert plan_json(str(source))["quantization"] == {"experts": "q4", "dense": "q8", "embeddings": "bf16"}


# ----- stated hardware -------------------------------------------------------------------------
PROFILE_FIGURES = ["--gpu-mem", "24GiB", "--ram", "512GiB", "--cpu-bw", "460GB/s", "--cores", "32", "--gpu-bw", "1008GB/s", "--pcie", "25GB/s"]


@pytest.fixture
def no_detection(monkeypatch):
    """A plan for stated hardware never measures or detects this machine."""

    def refuse(*args, **kwargs):
        raise AssertionError("this machine was looked at")

    monkeypatch.setattr("localv3.offload.stated.detect_hardware", refuse)
    monkeypatch.setattr("localv3.offload.hardware.measure_cpu", refuse)


def test_a_profiles_figures_stated_predict_what_the_profile_does(no_detection):
    by_figures = plan_json("deepseek-v3", *PROFILE_FIGURES)
    by_name = plan_json("deepseek-v3", "--profile", "rtx4090-epyc-12ch")
    assert by_figures["predicted"]["decode_tok_s"] == pytest.approx(by_name["predicted"]["decode_tok_s"], rel=0.03)
    assert by_figures["predicted"]["bottleneck"] == by_name["predicted"]["bottleneck"] == "CPU memory bandwidth"
    hw = by_figures["hardware"]
    assert hw["cpu_flops"] == pytest.approx(7.4e12 * 32 / 96) and hw["cpu_kernels"] is None


def test_figures_not_stated_are_listed_as_assumed_with_their_option(no_detection):
    result = runner.invoke(app, ["plan", "deepseek-v3", *PROFILE_FIGURES])
    assert result.exit_code == 0, result.output
    header, *basis = result.stderr.strip().splitlines()
    assert header.startswith("hardware (stated; the rest as profile rtx4090-epyc-12ch): stated GPU (24.00 GiB")
    assert "stated CPU (32 cores, 512.00 GiB RAM, 460 GB/s)" in header
    cpu_flops = next(line for line in basis if line.startswith("  cpu_flops: "))
    assert "assumed 2.47 TFLOP/s: 32 cores" in cpu_flops and "(state --cpu-flops)" in cpu_flops
    assert all(": assumed" in line for line in basis)
    stated = runner.invoke(app, ["plan", "deepseek-v3", *PROFILE_FIGURES, "--cpu-flops", "2.5TFLOPS"])
    assert "cpu_flops" not in stated.stderr and json.loads(
        runner.invoke(app, ["plan", "deepseek-v3", *PROFILE_FIGURES, "--cpu-flops", "2.5TFLOPS", "--json"]).stdout
    )["hardware"]["cpu_flops"] == 2.5e12


def test_stated_ram_without_bandwidth_shows_the_class_bandwidth(no_detection):
    result = runner.invoke(app, ["plan", "deepseek-v3", "--ram", "512GiB"])
    assert result.exit_code == 0, result.output
    header = result.stderr.splitlines()[0]
    assert "512.00 GiB RAM, 461 GB/s" in header
    assert any(line.startswith("  cpu_bw: assumed 461 GB/s") and "(state --cpu-bw)" in line for line in result.stderr.splitlines())


def test_more_cores_plan_a_faster_prefill(no_detection):
    few = plan_json("deepseek-v3", *PROFILE_FIGURES[:6], "--cores", "8")["predicted"]
    many = plan_json("deepseek-v3", *PROFILE_FIGURES[:6], "--cores", "96")["predicted"]
    assert many["prefill_tok_s"] > 1.5 * few["prefill_tok_s"]


# ----- the picture -----------------------------------------------------------------------------
def test_the_picture_shows_memory_bars_the_decode_split_and_what_would_change_it():
    data = plan_json(V3, "--profile", "rtx4090-epyc-12ch", "--ram", "512GiB")
    out = runner.invoke(app, ["plan", V3, "--profile", "rtx4090-epyc-12ch", "--ram", "512GiB"]).stdout
    lines = out.splitlines()
    start = lines.index("memory by device")
    gpu, cpu = lines[start + 1], lines[start + 2]
    assert gpu.startswith("  gpu  █") and "24.00 GiB: █ weights" in gpu and "▓ KV cache 279.00 MiB" in gpu  # 71,424 B per token (with MTP) x 4,096
    assert cpu.startswith("  cpu  █") and "512.00 GiB: █ weights" in cpu and "KV cache" not in cpu
    decode_ms = 1e3 / data["predicted"]["decode_tok_s"]
    assert lines[start + 3] == f"decode: {decode_ms:.1f} ms per token ({data['predicted']['decode_tok_s']:.2f} tok/s)"
    bar, legend = lines[start + 4], lines[start + 5]
    assert len(bar.strip()) == 48 and set(bar.strip()) <= set("█▓▒▚≡·")
    for part, ms in data["predicted"]["decode_ms_per_token_by_component"].items():
        assert f"{part} {ms:.1f} ms" in legend
    what = next(line for line in lines if line.startswith("what would change it: "))
    for alternative in data["what_would_change"]:
        assert f"{alternative['change']} -> {alternative['decode_tok_s']:.2f} tok/s" in what
    assert [a["change"] for a in data["what_would_change"]] == ["2x RAM bandwidth (922 GB/s)", "a 48.00 GiB GPU", "routed experts in q8"]


def test_the_picture_is_coloured_in_a_terminal_and_plain_with_no_color(monkeypatch):
    import io

    from rich.console import Console

    from localv3.commands.plan import render_plan
    from localv3.offload.alternatives import what_would_change
    from localv3.offload.hardware import hardware_from_profile
    from localv3.offload.planner import Policy, plan
    from localv3.offload.quant import Quantization
    from localv3.offload.shape import ModelShape
    from localv3.config import ModelConfig

    shape = ModelShape.from_config(ModelConfig.from_file(V3), "deepseek-v3")
    result = plan(shape, Quantization(), hardware_from_profile("rtx4090-epyc-12ch"), 8192)
    alternatives = what_would_change(result, shape, Policy())

    def rendered(**console) -> str:
        out = io.StringIO()
        render_plan(result, shape, alternatives, Console(file=out, width=200, **console))
        return out.getvalue()

    colour = re.compile(r"\x1b\[[0-9;]*(3[0-7]|9[0-7])m")  # a foreground colour (bold and italics aside)
    assert colour.search(rendered(force_terminal=True))
    monkeypatch.setenv("NO_COLOR", "1")
    plain = rendered(force_terminal=True)
    assert "█" in plain and not colour.search(plain)


def test_every_component_has_its_own_character():
    from localv3.commands.plan_picture import MEMORY_PARTS, TIME_PARTS
    from localv3.offload.roofline import COMPONENTS

    assert set(TIME_PARTS) == set(COMPONENTS)
    for parts in (TIME_PARTS, MEMORY_PARTS):
        assert len({character for character, _ in parts.values()}) == len(parts)


@pytest.mark.parametrize("seed", range(5))
def test_bar_cells_add_up_and_show_every_part(seed):
    import random

    from localv3.commands.plan_picture import _cells

    rng = random.Random(seed)
    values = [rng.choice([0.0, rng.random() * 1e-3, rng.random() * 100]) for _ in range(rng.randint(1, 6))]
    cells = _cells(values, 48)
    if sum(values) > 0:
        assert sum(cells) == 48
    assert all(c >= 1 for c, v in zip(cells, values) if v > 0) and all(c == 0 for c, v in zip(cells, values) if v == 0)


def test_plan_show_and_bench_report_one_parameter_count(tmp_path):
    from localv3.measure import weights_info
    from localv3.synthetic import write_checkpoint
    from model_configs import TINY_V3

    shown = json.loads(runner.invoke(app, ["show", "tiny", "--json"]).stdout)
    planned = plan_json("tiny", "--profile", "cpu-only")
    assert planned["parameters"] == {"total": shown["params_total"], "active": shown["params_active"]}
    tiny_dir = Path(shown["path"])
    assert weights_info(tiny_dir).params == shown["params_total"]  # the MTP layer's copies of the head not counted twice
    without_mtp = write_checkpoint(tmp_path / "no-mtp", {**TINY_V3, "num_nextn_predict_layers": 0})
    shown = json.loads(runner.invoke(app, ["show", str(without_mtp), "--json"]).stdout)
    assert weights_info(without_mtp).params == shown["params_total"] == plan_json(str(without_mtp))["parameters"]["total"]
    out = runner.invoke(app, ["plan", "tiny", "--profile", "cpu-only"]).stdout
    assert out.startswith("tiny (2.76 M parameters, 1.43 M active)")


@pytest.mark.parametrize(
    "fix, wording",
    [
        (Fix("context", 2048), "the smallest change that fits: --ctx 2048 (or 1.00 GiB more RAM)"),
        (Fix("experts", "q4"), "experts in q4 (`localv3 quantize MODEL --experts q4` writes that checkpoint)"),
        (Fix("allow_disk", True), "experts spilling to disk (`localv3 plan MODEL` shows the options)"),
    ],
)
def test_a_refusal_while_loading_is_worded_in_the_loading_commands_flags(monkeypatch, fix, wording):
    from localv3 import api
    from localv3.engine_choice import open_engine

    def refuse(*args, **kwargs):
        raise PlanError("tiny does not fit: the KV cache", fix=fix, more_ram=2**30)

    monkeypatch.setattr(api, "load", refuse)
    with pytest.raises(LocalV3Error) as error:
        open_engine("tiny", max_context=4096)
    assert not isinstance(error.value, PlanError)
    assert str(error.value).startswith("tiny does not fit: the KV cache; the smallest change that fits: ")
    assert wording in str(error.value)
