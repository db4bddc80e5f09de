"""`localv3 quantize` to the localv3 format: streaming conversion, the loaded quantised model's
numerics, atomic output, bounded memory, and one-line errors for bad input."""

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import localv3
from cli import app
from fixtures_cli import train_tokenizer
from localv3.checkpoint import CheckpointReader
from localv3.commands.progress_bar import stop_progress
from localv3.errors import CheckpointError, ModelNotFoundError
from localv3.formats.modules import QuantExpertBank, QuantFeedForward, QuantLinear
from localv3.quantize import (
    NotEnoughDiskError,
    OutputError,
    Progress,
    QuantizeError,
    QuantizeSettings,
    exclusive_target,
    quantize_checkpoint,
)
from localv3.quantized import MANIFEST_NAME, qweight_name, read_manifest
from localv3.synthetic import TINY_V3, write_checkpoint
from localv3.offload.quant import scheme
from threads import one_thread

runner = CliRunner()
REPO = Path(__file__).resolve().parents[1]
TINY_TRAINED = REPO / "localv3" / "assets" / "tiny"

# Every expert chosen for every token: no routing decision can flip, so the logit difference
# measures the quantisation error alone (with top-2 of 8, a near-tied router score flips an
# expert choice and moves a token's logits by ~1 whatever the precision).
ROUTE_ALL = {**TINY_V3, "q_lora_rank": 64, "n_routed_experts": 4, "num_experts_per_tok": 4, "n_group": 1, "topk_group": 1}
PROMPT = [0, 17, 42, 99, 3, 250, 7, 7, 123, 64, 200, 11, 5, 180, 33, 77]


def write_fp8_model(out: Path, config: dict, shards: int) -> Path:
    tokenizer = train_tokenizer()
    write_checkpoint(out, {**config, "vocab_size": max(config["vocab_size"], tokenizer.get_vocab_size())}, fp8=True, shards=shards)
    tokenizer.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": False}))
    return out


@pytest.fixture(scope="module")
def fp8_model(tmp_path_factory):
    return write_fp8_model(tmp_path_factory.mktemp("src") / "fp8-tiny", ROUTE_ALL, shards=4)


@pytest.fixture(scope="module")
def quantized(fp8_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    info = {"model": "fp8-tiny", "path": str(fp8_model), "revision": None}
    return {
        experts: quantize_checkpoint(fp8_model, out / f"fp8-tiny-{experts}", QuantizeSettings(experts, "q8"), info).path
        for experts in ("q8", "q4")
    }


def test_stored_bytes_are_the_planners_bytes(fp8_model, quantized):
    """The planner sizes each quantised tensor as `localv3 quantize` stores it (its blocks)."""
    source = CheckpointReader(fp8_model)
    for experts, out in quantized.items():
        manifest, reader = read_manifest(out), CheckpointReader(out)
        assert manifest.tensors
        for name in manifest.tensors:
            scheme_name = experts if ".experts." in name else "q8"
            rows, cols = reader.tensors[qweight_name(name)].shape[0], source.tensors[name].shape[1]
            assert scheme(scheme_name).matrix_bytes(rows, cols) == reader.tensors[qweight_name(name)].nbytes, (experts, name)


def fp8_shape(model_dir, name: str) -> tuple[int, ...]:
    return CheckpointReader(model_dir).tensors[name].shape


def test_output_layout_and_manifest(fp8_model, quantized):
    out = quantized["q4"]
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert (manifest["scheme"], manifest["experts"], manifest["dense"]) == ("localv3", "q4", "q8")
    assert manifest["source"]["dtype"] == "fp8" and manifest["source"]["path"] == str(fp8_model)
    formats = manifest["tensors"]
    assert formats["model.layers.1.mlp.experts.3.down_proj.weight"] == "q4_0"  # rows of 32: too short for Q4_K
    assert formats["model.layers.1.self_attn.kv_a_proj_with_mqa.weight"] == "q8_0"
    assert formats["model.layers.1.mlp.shared_experts.up_proj.weight"] == "q8_0"
    assert "model.layers.1.mlp.gate.weight" not in formats  # the router stays fp32
    assert manifest["dropped"] == ["model.layers.3.embed_tokens.weight", "model.layers.3.shared_head.head.weight"]
    # one output shard per input shard, an index covering every tensor, files copied
    assert len(list(out.glob("model-*.safetensors"))) == 4
    reader = CheckpointReader(out)
    assert reader.info("model.layers.1.mlp.experts.0.gate_proj.qweight").dtype == torch.uint8
    gate = reader.info("model.layers.1.mlp.experts.0.gate_proj.qweight")
    hidden, dim = fp8_shape(fp8_model, "model.layers.1.mlp.experts.0.gate_proj.weight")
    assert gate.shape == (hidden, dim // 32 * 18)  # Q4_0: 18 bytes per 32 weights
    assert reader.info("model.layers.1.mlp.gate.weight").dtype == torch.float32
    assert reader.info("model.layers.0.self_attn.q_a_proj.qweight").dtype == torch.uint8
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    assert (out / "tokenizer.json").read_bytes() == (fp8_model / "tokenizer.json").read_bytes()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]


@one_thread()
def test_quantized_models_load_with_logits_close(fp8_model, quantized):
    reference = localv3.load(fp8_model, device="cpu", dtype=torch.float32)
    expected = reference.logits(PROMPT)
    # measured: q8 0.10, q4 0.49 (logits up to ~4.8); the same model run in bf16 is off by 0.076
    tolerance = {"q8": 0.2, "q4": 1.0}
    for experts, out in quantized.items():
        engine = localv3.load(out, device="cpu", dtype=torch.float32)
        layer = engine.model.model.layers[1]
        assert [type(s.bank) for s in layer.mlp.experts.slices] == [QuantExpertBank]
        assert isinstance(layer.self_attn.q_a_proj, QuantLinear)
        assert isinstance(layer.mlp.experts.shared, QuantFeedForward)
        got = engine.logits(PROMPT)
        assert (got - expected).abs().max().item() < tolerance[experts], experts


@pytest.mark.skipif(not (TINY_TRAINED / "model.safetensors").is_file(), reason="the trained tiny model is not built")
@one_thread()
def test_trained_tiny_model_greedy_tokens_survive_quantization(tmp_path):
    reference = localv3.load(TINY_TRAINED, device="cpu", dtype=torch.float32)
    questions = ["What is 12 + 7?", "Reverse the words: apple river green"]
    prompts = [reference.tokenizer.encode_chat([{"role": "user", "content": q}]) for q in questions]
    info = {"model": "tiny", "path": str(TINY_TRAINED), "revision": None}
    # measured max logit differences (logits up to ~19): q8 0.18, q4 1.9
    for experts, tolerance in (("q8", 0.5), ("q4", 4.0)):
        out = quantize_checkpoint(TINY_TRAINED, tmp_path / experts, QuantizeSettings(experts, "q8"), info).path
        engine = localv3.load(out, device="cpu", dtype=torch.float32)
        for ids in prompts:
            assert engine.generate(ids, 12) == reference.generate(ids, 12), (experts, ids)
            assert (engine.logits(ids) - reference.logits(ids)).abs().max().item() < tolerance


def test_cli_writes_to_localv3_home(fp8_model, tmp_path, monkeypatch):
    monkeypatch.setenv("LOCALV3_HOME", str(tmp_path / "home"))
    result = runner.invoke(app, ["quantize", str(fp8_model), "--experts", "q8", "--dense", "bf16"])
    assert result.exit_code == 0, result.output
    target = tmp_path / "home" / "models" / "fp8-tiny-q8"
    assert result.stdout.strip() == str(target)
    assert "fp8-tiny:" in result.stderr and "(experts q8, dense bf16)" in result.stderr
    manifest = read_manifest(target)
    assert (manifest.experts, manifest.dense) == ("q8", "bf16")
    assert manifest.format_of("model.layers.1.self_attn.o_proj.weight") is None  # bf16, stored plainly
    # the same target again is refused, not overwritten
    again = runner.invoke(app, ["quantize", str(fp8_model), "--experts", "q8", "--dense", "bf16"])
    assert isinstance(again.exception, OutputError) and "already exists" in str(again.exception)


@pytest.mark.parametrize("spec", [".", "../fp8-tiny"])
def test_a_relative_directory_names_its_output_after_the_directory(fp8_model, tmp_path, monkeypatch, spec):
    """`quantize .` or `quantize ../x` writes NAME-q8 (not `-q8` or `..-q8`), which ls and rm handle."""
    monkeypatch.setenv("LOCALV3_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(fp8_model)  # both specs name the model directory from inside it
    result = runner.invoke(app, ["quantize", spec, "--experts", "q8", "--dense", "bf16"])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == str(tmp_path / "home" / "models" / "fp8-tiny-q8")
    listed = runner.invoke(app, ["ls", "--json"])
    assert "fp8-tiny-q8" in listed.stdout


def test_bad_input_is_one_line_and_nonzero(tmp_path):
    """Through the real entry point: the message is one line on stderr, the exit status 1."""
    env = {**os.environ, "LOCALV3_HOME": str(tmp_path)}
    result = subprocess.run(
        [sys.executable, "-c", "import cli; cli.main()", "quantize", "no-such-model-xyz"],
        capture_output=True, text=True, env=env, cwd=REPO,
    )
    assert result.returncode == 1
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: unknown model 'no-such-model-xyz'")


def _quantize_error(*args) -> BaseException:
    result = runner.invoke(app, ["quantize", *map(str, args)])
    assert result.exit_code != 0
    return result.exception


def test_truncated_shard(fp8_model, tmp_path):
    model = shutil.copytree(fp8_model, tmp_path / "m")
    shard = model / "model-00002-of-00004.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    error = _quantize_error(model, "--out", tmp_path / "out")
    assert isinstance(error, CheckpointError) and "model-00002-of-00004.safetensors: truncated" in str(error)
    assert not (tmp_path / "out").exists()


def test_wrong_dtype(fp8_model, tmp_path):
    model = shutil.copytree(fp8_model, tmp_path / "m")
    index = json.loads((model / "model.safetensors.index.json").read_text())["weight_map"]
    name = "model.layers.0.input_layernorm.weight"
    shard = model / index[name]
    tensors = load_file(str(shard))
    tensors[name] = tensors[name].to(torch.int32)
    save_file(tensors, str(shard))
    error = _quantize_error(model, "--out", tmp_path / "out")
    assert isinstance(error, CheckpointError) and f"tensor {name} is a torch.int32" in str(error)


def test_unknown_model_name():
    error = _quantize_error("no-such-model-xyz")
    assert isinstance(error, ModelNotFoundError) and "no-such-model-xyz" in str(error)


def test_output_not_writable(fp8_model, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    error = _quantize_error(fp8_model, "--out", blocker / "out")
    assert isinstance(error, OutputError) and "cannot write to" in str(error)


def test_without_ggml_block_quantisation_is_refused_up_front(fp8_model, tmp_path, monkeypatch):
    monkeypatch.setattr("localv3.formats.ggml.available", lambda: False)
    error = _quantize_error(fp8_model, "--out", tmp_path / "out")
    assert isinstance(error, QuantizeError) and "pip install 'localv3[llama]'" in str(error)
    assert list(tmp_path.iterdir()) == []


def test_not_enough_disk_is_refused_up_front(fp8_model, tmp_path, monkeypatch):
    monkeypatch.setattr("localv3.quantize.free_disk_bytes", lambda path: 1000)
    error = _quantize_error(fp8_model, "--out", tmp_path / "out")
    assert isinstance(error, NotEnoughDiskError) and "not enough disk space" in str(error)
    assert list(tmp_path.iterdir()) == []


def test_disk_full_while_writing_removes_the_partial_output(fp8_model, tmp_path, monkeypatch):
    calls = []

    def failing_pwrite(fd, data, position):
        calls.append(position)
        if len(calls) > 20:
            raise OSError(errno.ENOSPC, "No space left on device")
        return os.pwrite(fd, data, position)

    monkeypatch.setattr("localv3.stream_writer.os.pwrite", failing_pwrite)
    error = _quantize_error(fp8_model, "--out", tmp_path / "out")
    assert isinstance(error, NotEnoughDiskError) and "disk full while writing" in str(error)
    assert list(tmp_path.iterdir()) == []


def test_interruption_removes_the_work_directory(fp8_model, tmp_path):
    """Any exception (here Ctrl-C after a few tensors) leaves neither the target nor the work directory."""

    def interrupt_after_five(tensors, nbytes, seen=[]):
        seen.append(tensors)
        if sum(seen) >= 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        quantize_checkpoint(fp8_model, tmp_path / "out", QuantizeSettings(), {}, Progress(advance=interrupt_after_five))
    assert list(tmp_path.iterdir()) == []


# ----- subprocesses: the real entry point, signals, peak memory -----------------------------

# libgomp's threads spin while waiting; on a loaded 2-core machine every small torch op then
# waits for a time slice (measured: 27 s instead of 0.4 s for one conversion). Passive waiting
# changes only the speed.
SUBPROCESS_ENV = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}

# many small tensors (256 experts x 3 MoE layers): a conversion that takes seconds, so a
# signal sent when the work directory appears lands in the middle of it
MANY_TENSORS = {**TINY_V3, "num_hidden_layers": 4, "n_routed_experts": 256, "num_experts_per_tok": 8, "n_group": 8, "topk_group": 4}

MEDIUM = {
    **TINY_V3,
    "vocab_size": 512,
    "hidden_size": 256,
    "intermediate_size": 512,
    "moe_intermediate_size": 256,
    "n_routed_experts": 48,
    "num_experts_per_tok": 4,
    "n_group": 4,
    "topk_group": 2,
    "q_lora_rank": 128,
    "kv_lora_rank": 64,
    "num_nextn_predict_layers": 0,
}


def quantize_command(source: Path, out: Path) -> list[str]:
    return [sys.executable, "-c", "import cli; cli.main()", "quantize", str(source), "--out", str(out)]


@pytest.mark.slow
def test_ctrl_c_term_and_kill_leave_no_finished_looking_output(tmp_path):
    with one_thread():
        source = write_checkpoint(tmp_path / "src", MANY_TENSORS, fp8=True, shards=2)
    target = tmp_path / "out" / "many-q4"
    target.parent.mkdir()
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGKILL):
        process = subprocess.Popen(
            quantize_command(source, target), cwd=REPO, env=SUBPROCESS_ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        while not list(target.parent.glob(".many-q4.partial-*")) and process.poll() is None:
            time.sleep(0.005)
        assert process.poll() is None, "the conversion finished before it could be interrupted"
        process.send_signal(sig)
        _, stderr = process.communicate(timeout=120)
        assert not target.exists()
        if sig in (signal.SIGINT, signal.SIGTERM):  # no traceback, the work directory removed
            assert "Traceback" not in stderr
            assert process.returncode == (130 if sig == signal.SIGINT else 143)
            assert list(target.parent.iterdir()) == []
        else:  # killed: the work directory and the (released) lock file stay, hidden (`localv3 ls` skips dot names)
            assert sorted(p.name for p in target.parent.iterdir()) == [".many-q4.lock", f".many-q4.partial-{process.pid}"]
    # the next run removes the dead run's work directory and finishes
    subprocess.run(quantize_command(source, target), cwd=REPO, env=SUBPROCESS_ENV, check=True, capture_output=True)
    assert [p.name for p in target.parent.iterdir()] == ["many-q4"]


def test_a_quantize_to_a_target_another_one_is_writing_is_refused_at_once(fp8_model, tmp_path):
    target = tmp_path / "out"
    with exclusive_target(target):  # another writer holds it
        error = _quantize_error(fp8_model, "--out", target)
        assert isinstance(error, OutputError)
        assert str(error) == f"another quantize is writing {target}; wait for it to finish or choose another --out"
        assert [p.name for p in tmp_path.iterdir()] == [".out.lock"]  # nothing of the refused run
    assert list(tmp_path.iterdir()) == []
    with exclusive_target(target):  # released: the next writer takes it
        pass


def test_two_quantizes_racing_for_one_out_leave_one_output_and_one_clear_line(tmp_path):
    with one_thread():
        source = write_checkpoint(tmp_path / "src", MANY_TENSORS, fp8=True, shards=2)
    target = tmp_path / "out" / "many-q4"
    processes = [
        subprocess.Popen(
            quantize_command(source, target), cwd=REPO, env=SUBPROCESS_ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    results = sorted((p.wait(timeout=300), p.communicate()[1]) for p in processes)
    assert [code for code, _ in results] == [0, 1]
    loser = results[1][1].strip().splitlines()
    assert len(loser) == 1
    assert loser[0] in (
        f"error: another quantize is writing {target}; wait for it to finish or choose another --out",
        f"error: {target} already exists; remove it (`localv3 rm`) or choose another --out",
    )
    assert [p.name for p in target.parent.iterdir()] == ["many-q4"]
    assert (target / MANIFEST_NAME).is_file()


class HalfStartedDisplay:
    """What rich leaves when a signal lands inside Progress.start: stop() cannot undo it."""

    def stop(self) -> None:
        raise IndexError("pop from empty list")


def test_an_interrupt_is_not_replaced_by_a_failed_progress_teardown():
    stop_progress(HalfStartedDisplay(), KeyboardInterrupt)  # the interrupt goes on propagating
    with pytest.raises(IndexError):
        stop_progress(HalfStartedDisplay(), None)  # without one, the failure is a real error


def _peak_rss_bytes(command: list[str]) -> int:
    """The peak RSS of `command`, run under a fresh parent so no other child's peak mixes in."""
    wrapper = (
        "import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, capture_output=True); "
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
    )
    out = subprocess.run(
        [sys.executable, "-c", wrapper, *command], cwd=REPO, env=SUBPROCESS_ENV, check=True, capture_output=True, text=True
    )
    return int(out.stdout) * 1024


def test_peak_memory_does_not_grow_with_model_size(tmp_path):
    """Peak RSS stays below the import baseline + the largest input shard + 64 MiB, and twice
    the model (twice as many shards of the same size) does not raise it."""
    with one_thread():
        sources = {
            "small": write_checkpoint(tmp_path / "small", {**MEDIUM, "num_hidden_layers": 3}, fp8=True, shards=4),
            "large": write_checkpoint(tmp_path / "large", {**MEDIUM, "num_hidden_layers": 5}, fp8=True, shards=8),
        }
    baseline = _peak_rss_bytes([sys.executable, "-c", "import cli, localv3.quantize"])
    peaks = {name: _peak_rss_bytes(quantize_command(src, tmp_path / f"{name}-q4")) for name, src in sources.items()}
    sizes = {name: sum(p.stat().st_size for p in src.glob("*.safetensors")) for name, src in sources.items()}
    largest_shard = max(p.stat().st_size for p in sources["large"].glob("*.safetensors"))
    above = {name: (peak - baseline) / 2**20 for name, peak in peaks.items()}
    report = f"MiB above baseline {above}, largest shard {largest_shard / 2**20:.1f} MiB, sizes {sizes}"
    assert max(peaks.values()) - baseline < largest_shard + 64 * 2**20, report
    assert peaks["large"] - peaks["small"] < (sizes["large"] - sizes["small"]) / 4, report


def test_show_validates_a_quantized_checkpoint_and_counts_its_weights(fp8_model, quantized):
    source = json.loads(runner.invoke(app, ["show", str(fp8_model), "--json"]).stdout)
    for out in quantized.values():
        result = runner.invoke(app, ["show", str(out), "--json"])
        assert result.exit_code == 0, result.output
        summary = json.loads(result.stdout)
        assert summary["params_total"] == source["params_total"] and summary["dtypes"]["uint8"] > 0
