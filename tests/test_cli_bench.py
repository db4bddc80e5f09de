"""`localv3 bench`: pp/tg records, the llama-bench-style table, JSON, engines, MTP rows, errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from fixtures_cli import ScriptedEngine, scripted_loader
from mtp_drafts import greedy_draft_counts
from threads import one_thread
from typer.testing import CliRunner

from cli import app
from localv3.measure import BenchError, BenchRecord, BenchSettings, PeakMemory, fit_to_context, weights_info
from localv3.commands.bench import markdown_table
from localv3.engine_choice import default_engine
from localv3.commands.json_output import rounded
from localv3.errors import LocalV3Error

runner = CliRunner()
REPO = Path(__file__).resolve().parents[1]
TINY_DIR = REPO / "localv3" / "assets" / "tiny"
SMALL = ["-p", "8", "-n", "4", "-r", "2"]


def bench(*args: str):
    return runner.invoke(app, ["bench", *args])


def table_column(table: str, column: str) -> list[str]:
    """The cells of one column of a markdown table, below its header and rule."""
    header, _, *rows = table.splitlines()
    index = [cell.strip() for cell in header.split("|")].index(column)
    return [row.split("|")[index].strip() for row in rows]


def opened_engines(monkeypatch) -> list:
    """Every engine the bench command opens, loaded for real."""
    from localv3 import engine_choice

    real, opened = engine_choice.open_engine, []

    def open_engine(*args, **kwargs):
        opened.append(real(*args, **kwargs))
        return opened[-1]

    monkeypatch.setattr("localv3.engine_choice.open_engine", open_engine)
    return opened


@pytest.fixture(scope="module")
def quantized_chat_model(chat_model_dir, tmp_path_factory):
    """The chat fixture model as `localv3 quantize` writes it: q4 routed experts, q8 dense parts."""
    from localv3.quantize import QuantizeSettings, quantize_checkpoint

    info = {"model": "chat-model", "path": str(chat_model_dir), "revision": None}
    out = tmp_path_factory.mktemp("quantized") / "chat-model-q4"
    return quantize_checkpoint(chat_model_dir, out, QuantizeSettings("q4", "q8"), info).path


def write_gguf(path: Path) -> Path:
    import gguf

    writer = gguf.GGUFWriter(str(path), "deepseek2")
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.add_tensor("output.weight", np.zeros((3, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_json_records_for_pp_and_tg(chat_model_dir):
    result = bench(str(chat_model_dir), *SMALL, "--json")
    assert result.exit_code == 0, result.output
    records = json.loads(result.stdout)
    assert [(r["model"], r["engine"], r["test"]) for r in records] == [
        (str(chat_model_dir), "native", "pp8"),
        (str(chat_model_dir), "native", "tg4"),
    ]
    pp, tg = records
    for record in records:
        assert record["tok_s_mean"] > 0 and record["tok_s_std"] >= 0 and len(record["tok_s_samples"]) == 2
        assert record["params"] > 0 and record["size_bytes"] > 0 and record["peak_rss_bytes"] > 0
        assert record["placement"].startswith("planned (gpu=cpu): 0/") and record["mtp"] is False
        assert record["placement"].endswith("; float32")  # fp32 checkpoint on a CPU-only machine
    assert pp["n_prompt"] == 8 and pp["ttft_s_mean"] > 0 and pp["tpot_s_mean"] is None
    assert tg["n_gen"] == 4 and tg["tpot_s_mean"] > 0 and tg["ttft_s_mean"] is None
    assert "warm-up" in result.stderr  # progress goes to stderr, the data alone to stdout


def test_table_like_llama_bench(chat_model_dir):
    result = bench(str(chat_model_dir), "-p", "4", "-n", "0", "-r", "1")
    assert result.exit_code == 0, result.output
    header, rule, *rows = result.stdout.splitlines()
    for column in (
        "model",
        "size",
        "params",
        "engine",
        "placement",
        "test",
        "t/s",
        "TTFT",
        "TPOT",
        "peak RSS",
        "peak VRAM",
    ):
        assert f" {column} " in header
    assert rule.startswith("| ---") and ": |" in rule
    assert len(rows) == 1 and " pp4 " in rows[0] and " ± " in rows[0] and chat_model_dir.name in rows[0]


def test_several_models(chat_model_dir, tmp_path):
    from localv3.synthetic import TINY_V3, write_checkpoint

    other = write_checkpoint(tmp_path / "other", TINY_V3)  # bench needs no tokenizer
    result = bench(str(chat_model_dir), str(other), "-p", "4", "-n", "2", "-r", "1", "--json")
    assert result.exit_code == 0, result.output
    assert [(Path(r["model"]).name, r["test"]) for r in json.loads(result.stdout)] == [
        (chat_model_dir.name, "pp4"),
        (chat_model_dir.name, "tg2"),
        ("other", "pp4"),
        ("other", "tg2"),
    ]


def test_mtp_rows_report_acceptance_and_speedup(monkeypatch, chat_model_dir):
    engine = scripted_loader(
        monkeypatch, chat_model_dir, ["a", "b", "c", "d"], speculation={"acceptance": 0.6, "tokens_per_step": 1.6, "experts_read_per_step": 9.5}
    )
    result = bench(str(chat_model_dir), *SMALL, "--mtp", "--json")
    assert result.exit_code == 0, result.output
    records = json.loads(result.stdout)
    assert [(r["test"], r["mtp"]) for r in records] == [("pp8", False), ("tg4", False), ("tg4-mtp", True)]
    assert records[2]["mtp_acceptance"] == 0.6 and records[2]["mtp_speedup"] == pytest.approx(1.0)
    assert records[2]["experts_read_per_step"] == 9.5 and records[2]["mtp_tokens_per_step"] == 1.6
    speculative = [call["speculative"] for call in engine.calls]
    assert True in speculative and set(speculative) == {False, True}  # the baseline never speculates
    table = bench(str(chat_model_dir), *SMALL, "--mtp")
    assert " tg4-mtp " in table.stdout and " 60% " in table.stdout
    assert "tok/step" in table.stdout and " 1.60 " in table.stdout and " 9.5 " in table.stdout


def test_tests_shrink_to_the_context_with_a_note():
    notes = []
    fitted = fit_to_context(BenchSettings(n_prompt=512, n_gen=128), 512, notes.append)
    assert (fitted.n_prompt, fitted.n_gen) == (511, 128)
    assert notes == ["the context holds 512 tokens: measuring pp511 / tg128 instead of pp512 / tg128"]
    assert fit_to_context(BenchSettings(n_prompt=64, n_gen=16), 512, notes.append) == BenchSettings(64, 16)
    assert len(notes) == 1


def test_mtp_row_of_the_native_engine(monkeypatch):
    """On the bundled tiny model, whose trained MTP head drafts tokens the model keeps: the row's
    acceptance is the share of drafts that one pass over the greedy answer confirms."""
    from localv3 import measure as bench_module

    prompts, real_random_tokens = [], bench_module.random_tokens
    monkeypatch.setattr(bench_module, "random_tokens", lambda *args: prompts.append(real_random_tokens(*args)) or prompts[-1])
    opened = opened_engines(monkeypatch)
    result = bench(str(TINY_DIR), "-p", "0", "-n", "16", "-r", "1", "--mtp", "--json")
    assert result.exit_code == 0, result.output
    plain, speculative = json.loads(result.stdout)
    assert (plain["mtp"], speculative["mtp"]) == (False, True)
    (engine,), prompt = opened, prompts[-1]  # the MTP row's one repetition: the last prompt drawn
    tokens = engine.generate(prompt, 16, stop_token_ids=[], speculative=False)
    accepted, drafted = greedy_draft_counts(engine.model, prompt, tokens)
    assert accepted > 0, "no draft kept: the check below cannot tell a right count from zero"  # measured: 1 of 14
    assert plain["mtp_acceptance"] is None and speculative["mtp_acceptance"] == pytest.approx(accepted / drafted, rel=1e-3)
    assert speculative["mtp_tokens_per_step"] == pytest.approx((drafted + accepted) / drafted, rel=1e-3)
    assert speculative["mtp_speedup"] > 0 and speculative["experts_read_per_step"] > 0


def test_mtp_row_skipped_when_the_engine_does_not_speculate(monkeypatch, chat_model_dir):
    scripted_loader(monkeypatch, chat_model_dir, ["a", "b"])
    result = bench(str(chat_model_dir), "-p", "0", "-n", "2", "-r", "1", "--mtp", "--json")
    assert result.exit_code == 0, result.output
    assert [r["mtp"] for r in json.loads(result.stdout)] == [False]
    assert "did not speculate" in result.stderr


def test_planner_prediction_beside_the_measurement(monkeypatch, chat_model_dir, tmp_path):
    monkeypatch.setenv("LOCALV3_HOME", str(tmp_path))  # the hardware probe's cache
    result = bench(str(chat_model_dir), "-p", "4", "-n", "2", "-r", "1", "--predict", "--json")
    assert result.exit_code == 0, result.output
    assert all(r["predicted_tok_s"] > 0 for r in json.loads(result.stdout))
    plain = json.loads(bench(str(chat_model_dir), "-p", "4", "-n", "0", "-r", "1", "--json").stdout)
    assert plain[0]["predicted_tok_s"] is None


def test_prediction_is_the_loaded_plans_on_the_stored_schemes(monkeypatch, quantized_chat_model):
    from localv3.config import ModelConfig
    from localv3.quantized import read_manifest
    from localv3.offload.runtime import stored_quantization

    opened = opened_engines(monkeypatch)
    result = bench(str(quantized_chat_model), "-p", "4", "-n", "2", "-r", "1", "--predict", "--json")
    assert result.exit_code == 0, result.output
    pp, tg = json.loads(result.stdout)
    (engine,) = opened
    stored = stored_quantization(read_manifest(quantized_chat_model), ModelConfig.from_file(quantized_chat_model))
    assert engine.plan.quantization == stored
    for record in (pp, tg):
        assert record["quantization"] == {"experts": "q4", "dense": "q8", "embeddings": "bf16"}
        assert "(q4); dense q8" in record["placement"]
    assert pp["predicted_tok_s"] == rounded(engine.plan.predicted.prefill_tok_s)
    assert tg["predicted_tok_s"] == rounded(engine.plan.predicted.decode_tok_s)


def test_every_thread_count_runs_every_test(chat_model_dir):
    with one_thread():  # bench leaves torch at the last thread count
        result = bench(str(chat_model_dir), "-p", "4", "-n", "2", "-r", "1", "--threads", "1,2", "--json")
        table = bench(str(chat_model_dir), "-p", "4", "-n", "0", "-r", "1", "-t", "2,1")
    assert result.exit_code == 0, result.output
    assert [(r["threads"], r["test"]) for r in json.loads(result.stdout)] == [(1, "pp4"), (1, "tg2"), (2, "pp4"), (2, "tg2")]
    assert "[native, 2 threads]: warm-up" in result.stderr
    assert table.exit_code == 0, table.output
    assert table_column(table.stdout, "threads") == ["2", "1"]
    assert table_column(table.stdout, "test") == ["pp4", "pp4"]


def test_default_threads_are_the_engines(chat_model_dir):
    from localv3.config import ModelConfig
    from localv3.offload.runtime import default_cpu_threads

    with one_thread():
        result = bench(str(chat_model_dir), "-p", "4", "-n", "0", "-r", "1", "--json")
    assert result.exit_code == 0, result.output
    (record,) = json.loads(result.stdout)
    assert record["threads"] == default_cpu_threads(ModelConfig.from_file(chat_model_dir))


@pytest.mark.parametrize("value", ["0", "-1", "1.5", "two", "1,,2", "2,0", ""])
def test_bad_thread_counts(chat_model_dir, value):
    result = bench(str(chat_model_dir), *SMALL, f"--threads={value}")
    assert result.exit_code == 1 and isinstance(result.exception, BenchError), result.output
    message = str(result.exception)
    assert message.startswith(f"--threads {value!r}: thread counts are positive integers") and "\n" not in message
    assert "loading" not in result.stderr


def test_bad_thread_count_is_one_line_on_stderr(chat_model_dir):
    command = [sys.executable, str(REPO / "cli.py"), "bench", str(chat_model_dir), "-t", "0"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr == "error: --threads '0': thread counts are positive integers, e.g. -t 1,2 (not '0')\n"


def test_llama_cpp_engine_uses_the_models_gguf(monkeypatch, chat_model_dir, tmp_path):
    gguf_dir = tmp_path / "with-gguf"
    gguf_dir.mkdir()
    write_gguf(gguf_dir / "model-Q8_0.gguf")
    scripted = ScriptedEngine(chat_model_dir, ["x", "y"])
    opened = []

    def open_engine(model, engine, **kwargs):
        opened.append((model, engine))
        return scripted

    monkeypatch.setattr("localv3.engine_choice.open_engine", open_engine)
    result = bench(str(gguf_dir), *SMALL, "--engine", "llama.cpp", "--json")
    assert result.exit_code == 0, result.output
    assert opened == [(str(gguf_dir), "llama.cpp")]
    assert {(r["params"], r["size_bytes"]) for r in json.loads(result.stdout)} == {
        (56, (gguf_dir / "model-Q8_0.gguf").stat().st_size)
    }


def test_each_model_gets_its_default_engine_when_none_is_named(monkeypatch, chat_model_dir, tmp_path):
    """A .gguf file goes to llama.cpp and a checkpoint to the native engine, as localv3.load
    picks them; --engine names one for all."""
    gguf_file = write_gguf(tmp_path / "model-Q8_0.gguf")
    scripted = ScriptedEngine(chat_model_dir, ["x", "y"] * 4)
    opened = []

    def open_engine(model, engine, **kwargs):
        opened.append((model, engine))
        return scripted

    monkeypatch.setattr("localv3.engine_choice.open_engine", open_engine)
    monkeypatch.setattr("localv3.commands.extras.require_llama_cpp", lambda what: None)
    assert bench(str(gguf_file), str(chat_model_dir), *SMALL, "--json").exit_code == 0
    assert opened == [(str(gguf_file), "llama.cpp"), (str(chat_model_dir), "native")]
    assert [default_engine(m) for m, _ in opened] == [e for _, e in opened]
    opened.clear()
    assert bench(str(gguf_file), *SMALL, "--engine", "native", "--json").exit_code == 0
    assert opened == [(str(gguf_file), "native")]


def test_native_and_llama_cpp_side_by_side(chat_model_with_gguf):
    result = bench(str(chat_model_with_gguf), "-p", "8", "-n", "4", "-r", "1", "--engine", "native,llama.cpp", "--json")
    assert result.exit_code == 0, result.output
    records = json.loads(result.stdout)
    assert [(r["engine"], r["test"]) for r in records] == [
        ("native", "pp8"),
        ("native", "tg4"),
        ("llama.cpp", "pp8"),
        ("llama.cpp", "tg4"),
    ]
    assert all(r["tok_s_mean"] > 0 for r in records)
    assert records[2]["size_bytes"] == (chat_model_with_gguf / "chat-model-f32.gguf").stat().st_size
    assert records[2]["quantization"] is None and records[0]["quantization"]["experts"] == "bf16"  # as stored


def test_llama_cpp_engine_loads_once_per_thread_count(chat_model_with_gguf):
    result = bench(str(chat_model_with_gguf), "-p", "4", "-n", "2", "-r", "1", "--engine", "llama.cpp", "-t", "1,2", "--json")
    assert result.exit_code == 0, result.output
    records = json.loads(result.stdout)
    assert [(r["threads"], r["test"]) for r in records] == [(1, "pp4"), (1, "tg2"), (2, "pp4"), (2, "tg2")]
    assert [r["placement"].endswith(f", {r['threads']} threads") for r in records] == [True] * 4
    assert all(r["predicted_tok_s"] is None for r in records)


def test_model_without_gguf_fails_before_measuring(chat_model_dir):
    result = bench(str(chat_model_dir), *SMALL, "--engine", "llama.cpp")
    assert result.exit_code == 1
    assert isinstance(result.exception, LocalV3Error) and "no GGUF file" in str(result.exception)
    assert "warm-up" not in result.stderr


def test_an_engine_that_cannot_run_is_skipped_with_its_reason(chat_model_dir):
    """native,llama.cpp on a model without a GGUF: the native rows, and one line on why llama.cpp has none."""
    result = bench(str(chat_model_dir), *SMALL, "--engine", "native,llama.cpp", "--json")
    assert result.exit_code == 0, result.output
    assert [(r["engine"], r["test"]) for r in json.loads(result.stdout)] == [("native", "pp8"), ("native", "tg4")]
    skipped = [line for line in result.stderr.splitlines() if line.startswith("skipped ")]
    assert len(skipped) == 1 and f"{chat_model_dir} [llama.cpp]: " in skipped[0] and "no GGUF file" in skipped[0]


def test_llama_cpp_engine_without_llama_cpp_python_is_skipped(monkeypatch, chat_model_with_gguf):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # `import llama_cpp` fails as when it is not installed
    result = bench(str(chat_model_with_gguf), "-p", "4", "-n", "0", "-r", "1", "--engine", "native,llama.cpp", "--json")
    assert result.exit_code == 0, result.output
    assert [r["engine"] for r in json.loads(result.stdout)] == ["native"]
    assert "skipped" in result.stderr and "pip install 'localv3[llama]'" in result.stderr
    alone = bench(str(chat_model_with_gguf), "-p", "4", "-n", "0", "-r", "1", "--engine", "llama.cpp")
    assert alone.exit_code == 1 and "llama-cpp-python: pip install 'localv3[llama]'" in str(alone.exception)


def test_native_engine_refuses_a_gguf_without_the_model_s_metadata(tmp_path):
    result = bench(str(write_gguf(tmp_path / "m.gguf")), *SMALL, "--engine", "native")
    assert result.exit_code == 1 and "GGUF metadata lacks deepseek2.embedding_length" in str(result.exception)


@pytest.mark.parametrize(
    "args, message",
    [(["--engine", "vllm"], "unknown engine vllm"), (["-p", "0", "-n", "0"], "nothing to measure")],
)
def test_bad_options(chat_model_dir, args, message):
    result = bench(str(chat_model_dir), *args)
    assert result.exit_code == 1 and message in str(result.exception)


def test_weights_info_counts_parameters_without_fp8_scales(tmp_path):
    from localv3.synthetic import TINY_V3, write_checkpoint

    plain = weights_info(write_checkpoint(tmp_path / "bf16", TINY_V3))
    fp8 = weights_info(write_checkpoint(tmp_path / "fp8", TINY_V3, fp8=True))
    assert plain.params == fp8.params and fp8.size_bytes < plain.size_bytes


def test_peak_rss_is_measured():
    memory = PeakMemory()
    memory.reset()
    assert memory.rss_bytes() > 10 << 20


def test_markdown_table_aligns_columns():
    record = BenchRecord(
        "m",
        "native",
        "tg128",
        12.5,
        0.25,
        [12.0, 13.0],
        0,
        128,
        2,
        3 << 30,
        671_000_000_000,
        "gpu dense, cpu experts",
        4,
        tpot_s_mean=0.08,
    )
    table = markdown_table([record])
    header, rule, row = table.splitlines()
    assert len(header) == len(rule) == len(row)
    assert "| predicted |" in header
    assert [cell.strip() for cell in header.split("|")][5:8] == ["placement", "threads", "test"]
    assert table_column(table, "threads") == ["4"]
    assert "| 3.00 GiB |" in row and "| 671.00 B |" in row and "| 12.50 ± 0.25 |" in row and "80.0ms" in row
