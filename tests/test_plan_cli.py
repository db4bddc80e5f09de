"""`localv3 plan`: tables on stdout, hardware notes on stderr, --json as data, one-line errors."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

import cli
from cli import app

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
    for heading in ("placement", "devices", "KV cache", "predicted", "routed experts", "attention (MLA)", "bottleneck"):
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
    assert plan_json(MOONLIGHT, "--profile", "cpu-only")["kv_cache"]["context"] == 8192


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
        (["--gpu-mem", "24GX"], "'24GX' is not a size"),
        (["--profile", "nope"], "unknown hardware profile 'nope'"),
        (["--experts", "q3"], "unknown quantisation 'q3'"),
        (["--ram", "64GiB", "--no-disk"], "does not fit"),
        (["--context", "1000000"], "longer than deepseek-v3 supports"),
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
