"""`localv3 run`: stdin/PROMPT, stdout-only answers, --json lines, sampling flags, errors, pipes."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest
from cli_entry import LOCALV3, one_error_line, run_main
from fixtures_cli import scripted_loader
from typer.testing import CliRunner

from cli import app

runner = CliRunner()
FINAL_KEYS = {
    "done", "model", "text", "prompt_tokens", "completion_tokens", "prompt_tok_s", "decode_tok_s", "ttft_s", "finish_reason"
}


# ----- the real model: stdout holds the answer and nothing else -------------------------------


def test_prompt_argument_answers_on_stdout_only(chat_model_dir):
    result = runner.invoke(app, ["run", str(chat_model_dir), "Hello", "--temperature", "0", "--max-tokens", "6"])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() and result.stdout.endswith("\n")
    assert result.stderr == ""


def test_json_lines_pieces_then_stats(chat_model_dir):
    args = ["run", str(chat_model_dir), "Hello", "--temperature", "0", "--max-tokens", "6"]
    plain = runner.invoke(app, args)
    result = runner.invoke(app, [*args, "--json"])
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in result.stdout.splitlines()]
    *pieces, final = records
    assert pieces and all(set(p) == {"text"} for p in pieces)
    assert FINAL_KEYS <= set(final)
    assert final["completion_tokens"] == 6 and final["finish_reason"] == "length"
    assert final["prompt_tokens"] > 0 and final["ttft_s"] > 0 and final["prompt_tok_s"] > 0
    assert "".join(p["text"] for p in pieces) + "\n" == plain.stdout  # greedy: the same answer


def test_mtp_flags_switch_speculation(chat_model_dir):
    args = ["run", str(chat_model_dir), "Hello", "--temperature", "0", "--max-tokens", "6", "--json"]
    with_mtp = json.loads(runner.invoke(app, [*args, "--mtp"]).stdout.splitlines()[-1])
    without = json.loads(runner.invoke(app, [*args, "--no-mtp"]).stdout.splitlines()[-1])
    assert 0.0 <= with_mtp["mtp_acceptance"] <= 1.0  # the fixture model has an MTP layer
    assert set(without) == FINAL_KEYS


def test_llama_cpp_engine_answers_like_the_native_one(chat_model_with_gguf):
    args = ["run", str(chat_model_with_gguf), "Hello", "--temperature", "0", "--max-tokens", "8"]
    native = runner.invoke(app, [*args, "--no-mtp"])
    llama = runner.invoke(app, [*args, "--engine", "llama.cpp"])
    assert llama.exit_code == 0, llama.output
    assert llama.stdout == native.stdout and llama.stdout.strip()


def test_seed_makes_sampling_repeatable(chat_model_dir):
    args = [
        "run",
        str(chat_model_dir),
        "Hi",
        "--temperature",
        "1.0",
        "--top-k",
        "40",
        "--top-p",
        "0.9",
        "-n",
        "12",
        "--no-mtp",
    ]
    first = runner.invoke(app, [*args, "--seed", "7"])
    again = runner.invoke(app, [*args, "--seed", "7"])
    assert first.exit_code == 0, first.output
    assert first.stdout == again.stdout


def test_verbose_prints_ollama_style_timings_to_stderr(chat_model_dir):
    result = runner.invoke(
        app, ["run", str(chat_model_dir), "Hi", "--temperature", "0", "-n", "4", "--verbose", "--json"]
    )
    assert result.exit_code == 0, result.output
    for label in (
        "total duration:",
        "load duration:",
        "prompt eval count:",
        "prompt eval rate:",
        "eval count:",
        "eval rate:",
    ):
        assert label in result.stderr
    assert all(json.loads(line) for line in result.stdout.splitlines())  # timings never reach stdout


def test_context_too_small_for_the_prompt(monkeypatch, capsys, chat_model_dir):
    code, out, err = run_main(monkeypatch, capsys, ["run", str(chat_model_dir), "Hello there " * 20, "--ctx", "16"])
    assert code == 1 and out == ""
    assert "--ctx" in one_error_line(err)


def test_context_ends_the_answer(chat_model_dir):
    result = runner.invoke(
        app, ["run", str(chat_model_dir), "Hi", "--temperature", "0", "--ctx", "24", "--json", "--no-mtp"]
    )
    final = json.loads(result.stdout.splitlines()[-1])
    assert final["finish_reason"] == "context"
    assert final["prompt_tokens"] + final["completion_tokens"] == 24


# ----- what reaches the engine (scripted engine) --------------------------------------------


def test_stdin_goes_before_the_prompt(monkeypatch, chat_model_dir):
    engine = scripted_loader(monkeypatch, chat_model_dir, ["ok"])
    result = runner.invoke(app, ["run", str(chat_model_dir), "Summarise."], input="The document.\n")
    assert result.exit_code == 0, result.output
    assert result.stdout == "ok\n"
    assert "<｜User｜>The document.\n\nSummarise.<｜Assistant｜>" in engine.prompt_text()


def test_stdin_alone_is_the_prompt(monkeypatch, chat_model_dir):
    engine = scripted_loader(monkeypatch, chat_model_dir, ["ok"])
    result = runner.invoke(app, ["run", str(chat_model_dir)], input="Only stdin\n")
    assert result.exit_code == 0, result.output
    assert "<｜User｜>Only stdin<｜Assistant｜>" in engine.prompt_text()


def test_raw_skips_the_chat_template(monkeypatch, chat_model_dir):
    engine = scripted_loader(monkeypatch, chat_model_dir, ["ok"])
    result = runner.invoke(app, ["run", str(chat_model_dir), "plain text", "--raw"])
    assert result.exit_code == 0, result.output
    assert engine.prompts[-1] == engine.tokenizer.encode("plain text")


def test_sampling_flags_reach_the_engine(monkeypatch, chat_model_dir):
    engine = scripted_loader(monkeypatch, chat_model_dir, ["ok"])
    args = [
        "run",
        str(chat_model_dir),
        "Hi",
        "--temperature",
        "0.3",
        "--top-k",
        "5",
        "--top-p",
        "0.5",
        "--seed",
        "3",
        "--max-tokens",
        "9",
    ]
    runner.invoke(app, args)
    runner.invoke(app, [*args, "--mtp"])
    runner.invoke(app, [*args, "--no-mtp"])
    first = engine.calls[0]
    assert (first["temperature"], first["top_k"], first["top_p"], first["seed"], first["max_new_tokens"]) == (
        0.3,
        5,
        0.5,
        3,
        9,
    )
    assert [call["speculative"] for call in engine.calls] == [None, True, False]


def test_sampling_defaults_are_the_models_own(monkeypatch, chat_model_dir, tmp_path):
    model_dir = tmp_path / "greedy-model"
    shutil.copytree(chat_model_dir, model_dir)
    (model_dir / "generation_config.json").write_text('{"do_sample": false}')
    engine = scripted_loader(monkeypatch, model_dir, ["a"])
    runner.invoke(app, ["run", str(model_dir), "Hi"])
    runner.invoke(app, ["run", str(model_dir), "Hi", "--temp", "0.7", "--top-k", "3"])
    (model_dir / "generation_config.json").unlink()  # none: DeepSeek-V3's 0.6 / 0.95
    runner.invoke(app, ["run", str(model_dir), "Hi"])
    settings = [(c["temperature"], c["top_p"], c["top_k"]) for c in engine.calls]
    assert settings == [(0.0, 0.95, 0), (0.7, 0.95, 3), (0.6, 0.95, 0)]


SPECULATION = {"acceptance": 0.75, "tokens_per_step": 1.75, "experts_read_per_step": 12.5}
MTP_KEYS = {"mtp_acceptance", "mtp_tokens_per_step", "mtp_experts_read_per_step"}


def test_json_final_record_carries_mtp_figures(monkeypatch, chat_model_dir):
    scripted_loader(monkeypatch, chat_model_dir, ["a", "b"], speculation=SPECULATION)
    result = runner.invoke(app, ["run", str(chat_model_dir), "Hi", "--json"])
    final = json.loads(result.stdout.splitlines()[-1])
    assert set(final) == FINAL_KEYS | MTP_KEYS
    assert (final["mtp_acceptance"], final["mtp_tokens_per_step"], final["mtp_experts_read_per_step"]) == (0.75, 1.75, 12.5)


def test_verbose_reports_mtp_figures_and_the_measured_speedup(monkeypatch, chat_model_dir):
    engine = scripted_loader(monkeypatch, chat_model_dir, ["a", "b", "c"], speculation=SPECULATION, plain_decode_s=0.3)
    result = runner.invoke(app, ["run", str(chat_model_dir), "Hi", "--verbose", "--seed", "4"])
    assert result.stdout == "abc\n"
    assert "MTP acceptance:       75.0%" in result.stderr
    assert "MTP tokens per step:  1.75" in result.stderr
    assert "experts read / step:  12.5" in result.stderr
    # 2 tokens after the first in 0.1 s with MTP, in 0.3 s when the same prompt is decoded again without
    assert "MTP speed-up:         3.00x (without MTP: 6.67 tokens/s" in result.stderr
    first, again = engine.calls
    assert again["speculative"] is False and again["max_new_tokens"] == 3 and again["seed"] == first["seed"] == 4


def test_verbose_without_speculation_decodes_once(monkeypatch, chat_model_dir):
    engine = scripted_loader(monkeypatch, chat_model_dir, ["a"])
    result = runner.invoke(app, ["run", str(chat_model_dir), "Hi", "--verbose", "--no-mtp"])
    assert "eval rate:" in result.stderr and "MTP" not in result.stderr
    assert len(engine.calls) == 1


def test_answer_ending_in_newline_gets_no_extra_one(monkeypatch, chat_model_dir):
    scripted_loader(monkeypatch, chat_model_dir, ["line\n"])
    assert runner.invoke(app, ["run", str(chat_model_dir), "Hi"]).stdout == "line\n"


# ----- errors: one line on stderr, exit 1 ----------------------------------------------------


def test_invalid_utf8_on_stdin(monkeypatch, capsys, chat_model_dir):
    code, out, err = run_main(monkeypatch, capsys, ["run", str(chat_model_dir), "Hi"], stdin=b"ok \xff\xfe bytes")
    assert code == 1 and out == ""
    assert "stdin is not valid UTF-8 (byte 0xff at offset 3)" in one_error_line(err)


@pytest.mark.parametrize("args, stdin", [([], b""), (["   "], b""), ([], b"  \n\n")])
def test_empty_prompt(monkeypatch, capsys, chat_model_dir, args, stdin):
    code, out, err = run_main(monkeypatch, capsys, ["run", str(chat_model_dir), *args], stdin=stdin)
    assert code == 1 and out == ""
    assert "the prompt is empty" in one_error_line(err)


def test_model_without_tokenizer(monkeypatch, capsys, tmp_path):
    from localv3.synthetic import TINY_V3, write_checkpoint

    write_checkpoint(tmp_path, TINY_V3)
    code, _, err = run_main(monkeypatch, capsys, ["run", str(tmp_path), "Hi"])
    assert code == 1 and "no tokenizer.json" in one_error_line(err)


def test_llama_cpp_engine_needs_a_gguf(monkeypatch, capsys, chat_model_dir):
    code, _, err = run_main(monkeypatch, capsys, ["run", str(chat_model_dir), "Hi", "--engine", "llama.cpp"])
    assert code == 1 and "no GGUF file" in one_error_line(err)


def test_unknown_engine(monkeypatch, capsys, chat_model_dir):
    code, _, err = run_main(monkeypatch, capsys, ["run", str(chat_model_dir), "Hi", "--engine", "vllm"])
    assert code == 1 and "unknown engine" in one_error_line(err)


def test_closed_pipe_is_quiet(chat_model_dir):
    """The reader goes away after one byte: no message, and success (pipefail sees localv3's exit)."""
    shell = f"set -o pipefail; echo hi | '{LOCALV3}' run '{chat_model_dir}' --temperature 0 --max-tokens 60 | head -c 1"
    done = subprocess.run(["bash", "-c", shell], capture_output=True, text=True, timeout=120)
    assert len(done.stdout) == 1
    assert done.stderr == "" and done.returncode == 0, done.stderr


def test_an_unwritable_home_costs_warnings_not_the_answer(chat_model_dir, monkeypatch, capsys, tmp_path):
    """Caches (hardware probe, routing profile) are best-effort: a read-only or full
    LOCALV3_HOME gives one warning line each, the answer and exit 0."""
    from localv3 import files

    def read_only(path, text):
        raise OSError(30, "Read-only file system")

    monkeypatch.setenv("LOCALV3_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(files, "write_text_atomic", read_only)
    monkeypatch.setattr("localv3.offload.routing_stats.write_text_atomic", read_only)
    code, out, err = run_main(monkeypatch, capsys, ["run", str(chat_model_dir), "Hello", "--max-tokens", "4"])
    assert code == 0 and out.strip()
    warnings = err.strip().splitlines()
    assert len(warnings) == 2 and all(line.startswith("localv3: warning: could not save ") for line in warnings), err
    assert "Read-only file system" in warnings[0] and "routing profile" in warnings[1]
