"""A new user's first commands: what a lone argument means, listing models, version and usage
errors, start-up without torch, Ctrl-C, pipes, closed stdout, bytes that are not UTF-8,
--system and --json records, bench rows and metadata, quantize's GGUF checks."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from cli_entry import LOCALV3, one_error_line, run_main
from fixtures_cli import ScriptedEngine
from typer.testing import CliRunner

from cli import app
from localv3.commands.json_output import rounded
from localv3.commands.options import DEFAULT_MODEL, model_and_prompt
from localv3.errors import ModelNotFoundError
from localv3.registry import load_registry

runner = CliRunner()
REPO = Path(__file__).resolve().parents[1]
EXCEPTION_NAME = re.compile(r"\b[A-Z][A-Za-z]*(Error|Exception|Option|Parameter|Usage)\b:")


def opened_models(monkeypatch, model_dir: Path, pieces: list[str], engine_class=ScriptedEngine) -> tuple[ScriptedEngine, list]:
    """Every command opens one scripted engine; the list records the model spec each open asked for."""
    engine, opened = engine_class(model_dir, pieces), []

    def open_engine(model, *args, **kwargs):
        opened.append(model)
        return engine

    monkeypatch.setattr("localv3.engine_choice.open_engine", open_engine)
    return engine, opened


@pytest.fixture
def empty_home(monkeypatch, tmp_path):
    """A fresh install: nothing downloaded, nothing quantized."""
    monkeypatch.setenv("LOCALV3_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    return tmp_path


# ----- a lone argument: model or prompt -------------------------------------------------------


@pytest.mark.parametrize(
    "arguments, expected",
    [
        (("tiny", None), ("tiny", None)),
        (("What is 37 + 48?", None), (DEFAULT_MODEL, "What is 37 + 48?")),
        (("2+3", None), (DEFAULT_MODEL, "2+3")),
        (("Hi!", None), (DEFAULT_MODEL, "Hi!")),
        (("deepseek-v3", None), ("deepseek-v3", None)),  # a models.toml name, even when not pulled
        (("someone/some-model", None), ("someone/some-model", None)),  # a hub repo id
        (("not a model", "the prompt"), ("not a model", "the prompt")),  # two arguments: as given
    ],
)
def test_what_a_lone_argument_means(empty_home, arguments, expected):
    assert model_and_prompt("run", *arguments) == expected


def test_a_model_directory_is_the_model(chat_model_dir):
    assert model_and_prompt("run", str(chat_model_dir), None) == (str(chat_model_dir), None)


def test_a_word_that_names_no_model_is_an_unknown_model_with_a_hint(empty_home):
    with pytest.raises(ModelNotFoundError, match=r"unknown model 'hello'.*localv3 chat tiny hello$"):
        model_and_prompt("chat", "hello", None)


def test_run_with_only_a_question_asks_the_default_model(monkeypatch, chat_model_dir):
    engine, opened = opened_models(monkeypatch, chat_model_dir, ["85"])
    result = runner.invoke(app, ["run", "What is 37 + 48?"])
    assert result.exit_code == 0, result.output
    assert opened == [DEFAULT_MODEL] and result.stdout == "85\n"
    assert "<｜User｜>What is 37 + 48?<｜Assistant｜>" in engine.prompt_text()


def test_run_with_only_a_question_answers_with_tiny():
    """End to end with the bundled model: an answer on stdout, nothing on stderr."""
    result = runner.invoke(app, ["run", "What is 37 + 48?", "-n", "8"])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() and result.stderr == ""


def test_chat_with_a_first_message_answers_it_then_reads_on(monkeypatch, chat_model_dir):
    engine, opened = opened_models(monkeypatch, chat_model_dir, ["5"])
    result = runner.invoke(app, ["chat", "What is 2 + 3?"], input="And 1 + 1?\n")
    assert result.exit_code == 0, result.output
    assert opened == [DEFAULT_MODEL]
    assert result.stdout.startswith(">>> What is 2 + 3?\n5\n")
    assert len(engine.prompts) == 2 and "<｜User｜>And 1 + 1?<｜Assistant｜>" in engine.prompt_text(1)


def test_run_at_a_terminal_without_a_prompt_says_how(monkeypatch, capsys):
    code, out, err = run_main(monkeypatch, capsys, ["run", "tiny"], stdin=None)
    line = one_error_line(err)
    assert code == 1 and out == ""
    assert 'localv3 run tiny "What is 2 + 3?"' in line and "localv3 chat tiny" in line


# ----- listing what can be run and pulled -----------------------------------------------------


def test_ls_on_a_fresh_install_lists_the_bundled_model(empty_home):
    result = runner.invoke(app, ["ls", "--json"])
    assert result.exit_code == 0, result.output
    (tiny,) = json.loads(result.stdout)
    assert (tiny["name"], tiny["source"], tiny["complete"]) == ("tiny", "bundled", True)
    assert Path(tiny["path"], "config.json").is_file() and tiny["size_bytes"] > 1_000_000
    assert "`localv3 ls --all`" in result.stderr
    table = runner.invoke(app, ["ls"]).stdout.splitlines()
    assert table[0].split() == ["NAME", "SIZE", "QUANT", "PATH"] and table[1].startswith("tiny ")


def test_ls_all_lists_every_models_toml_entry_with_its_status(empty_home):
    quantized = empty_home / "home" / "models" / "mine-q4"
    quantized.mkdir(parents=True)
    (quantized / "localv3_manifest.json").write_text(json.dumps({"experts": "q4", "dense": "q8"}))
    result = runner.invoke(app, ["ls", "--all", "--json"])
    assert result.exit_code == 0, result.output
    rows = {row["name"]: row for row in json.loads(result.stdout)}
    entries = load_registry().entries
    assert set(entries) | {"mine-q4"} == set(rows)
    assert rows["tiny"]["status"] == "bundled"
    assert rows["deepseek-v3"]["status"] == "not pulled" and rows["deepseek-v3"]["params_total_b"] == 671
    assert rows["mine-q4"]["status"] == "on disk" and rows["mine-q4"]["paths"] == [str(quantized)]
    table = runner.invoke(app, ["ls", "-a"]).stdout.splitlines()
    assert table[0].split() == ["NAME", "STATUS", "PARAMS", "PRECISION", "DESCRIPTION"]
    assert any(line.startswith("deepseek-v3 ") and " not pulled " in line for line in table)


def test_rm_of_the_bundled_model_says_why_not(monkeypatch, capsys, empty_home):
    code, _, err = run_main(monkeypatch, capsys, ["rm", "tiny", "--yes"])
    assert code == 1 and "bundled with localv3" in one_error_line(err)


# ----- version, help, usage errors ------------------------------------------------------------


def test_version(monkeypatch, capsys):
    from importlib.metadata import version

    code, out, err = run_main(monkeypatch, capsys, ["--version"])
    assert (code, out, err) == (0, f"localv3 {version('localv3')}\n", "")


def test_bare_localv3_prints_help_and_succeeds(monkeypatch, capsys):
    code, out, err = run_main(monkeypatch, capsys, [])
    assert code == 0 and err == ""
    assert "Usage: localv3" in out and "run" in out and "--version" in out


@pytest.mark.parametrize(
    "args, names",
    [
        (["run", "tiny", "hi", "-n", "0"], "'--max-tokens' / '-n'"),
        (["run", "tiny", "hi", "--top-p", "2"], "'--top-p'"),
        (["bench", "-p", "x"], "'--n-prompt' / '-p'"),
        (["run", "--bogus"], "--bogus"),
        (["ls", "--everything"], "--everything"),
        (["rm"], "'model'"),
        (["nosuchcommand"], "'nosuchcommand'"),
    ],
)
def test_usage_errors_name_the_option_and_exit_2(monkeypatch, capsys, args, names):
    code, out, err = run_main(monkeypatch, capsys, args)
    line = one_error_line(err)
    assert code == 2 and out == ""
    assert names in line and "--help" in line
    assert not EXCEPTION_NAME.search(line), line


def test_an_unexpected_failure_is_one_line_without_a_class_name(monkeypatch, capsys):
    def broken(*args, **kwargs):
        raise ValueError("boom")

    monkeypatch.setattr("localv3.commands.ls.stored_models", broken)
    code, _, err = run_main(monkeypatch, capsys, ["ls"])
    assert code == 1 and one_error_line(err) == "error: boom (LOCALV3_DEBUG=1 prints where)"
    monkeypatch.setenv("LOCALV3_DEBUG", "1")
    code, _, err = run_main(monkeypatch, capsys, ["ls"])
    assert code == 1 and "Traceback" in err and err.endswith("error: boom (LOCALV3_DEBUG=1 prints where)\n")


# ----- start-up: no torch for commands that do not compute -------------------------------------

NO_HEAVY_IMPORTS = """
import sys
sys.argv = ["localv3", *sys.argv[1:]]
import cli
try:
    cli.main()
except SystemExit as done:
    code = done.code
heavy = sorted(m for m in ("torch", "transformers", "llama_cpp") if m in sys.modules)
print(code, heavy, file=sys.stderr)
"""


@pytest.mark.parametrize(
    "args, code", [(["--help"], 0), (["ls"], 0), (["rm", "no-such-model", "--yes"], 1), (["pull", "tiny"], 0)]
)
def test_commands_that_do_not_compute_never_import_torch(empty_home, args, code):
    done = subprocess.run([sys.executable, "-c", NO_HEAVY_IMPORTS, *args], capture_output=True, text=True, cwd=REPO)
    assert done.stderr.splitlines()[-1] == f"{code} []", done.stderr


def test_importing_the_cli_imports_no_torch():
    check = "import cli, sys; assert not {'torch', 'transformers', 'llama_cpp'} & set(sys.modules)"
    subprocess.run([sys.executable, "-c", check], check=True, cwd=REPO)


# ----- signals, pipes, closed stdout, bytes that are not UTF-8 ---------------------------------


def test_ctrl_c_while_answering_prints_interrupted(chat_model_dir):
    args = [str(LOCALV3), "run", str(chat_model_dir), "Hello", "--temperature", "0", "-n", "100000", "--no-mtp"]
    child = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    try:
        assert child.stdout.read(1)  # the answer has started
        child.send_signal(signal.SIGINT)
        _, err = child.communicate(timeout=120)
    finally:
        child.kill()
    assert (child.returncode, err) == (130, b"interrupted\n")


def test_closed_stdout_is_one_line(chat_model_dir):
    done = subprocess.run(["bash", "-c", f"'{LOCALV3}' run '{chat_model_dir}' hi -n 2 >&-"], capture_output=True, text=True)
    assert done.returncode == 1
    assert "standard output is closed" in one_error_line(done.stderr)


def test_chat_with_stdin_closed_answers_its_message_and_ends(chat_model_dir):
    command = f"'{LOCALV3}' chat '{chat_model_dir}' 'Hello there' -n 3 --temperature 0 <&-"
    done = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(">>> Hello there\n") and "error" not in done.stderr


@pytest.mark.parametrize(
    "args, what",
    [
        ([b"\xff"], "PROMPT is not valid UTF-8 (byte 0xff at offset 0)"),
        ([b"ok \xe9t\xe9"], "PROMPT is not valid UTF-8 (byte 0xe9 at offset 3)"),
        ([b"hi", b"--system", b"caf\xe9"], "--system is not valid UTF-8 (byte 0xe9 at offset 3)"),
    ],
)
def test_prompt_bytes_that_are_not_utf8(chat_model_dir, args, what):
    command = [bytes(LOCALV3), b"run", bytes(chat_model_dir), *args]
    done = subprocess.run(command, capture_output=True, stdin=subprocess.DEVNULL)
    assert done.returncode == 1 and done.stdout == b""
    assert one_error_line(done.stderr.decode()) == f"error: {what}"


def test_chat_message_bytes_that_are_not_utf8(chat_model_dir):
    done = subprocess.run(
        [bytes(LOCALV3), b"chat", bytes(chat_model_dir), b"\xfe"], capture_output=True, stdin=subprocess.DEVNULL
    )
    assert done.returncode == 1
    assert one_error_line(done.stderr.decode()) == "error: MESSAGE is not valid UTF-8 (byte 0xfe at offset 0)"


# ----- run: --system, the --json record ----------------------------------------------------------


def test_run_system_message_goes_before_the_question(monkeypatch, chat_model_dir):
    engine, _ = opened_models(monkeypatch, chat_model_dir, ["ok"])
    result = runner.invoke(app, ["run", str(chat_model_dir), "Hi", "--system", "Be terse."])
    assert result.exit_code == 0, result.output
    assert "<｜begin▁of▁sentence｜>Be terse.<｜User｜>Hi<｜Assistant｜>" in engine.prompt_text()
    short = runner.invoke(app, ["run", str(chat_model_dir), "Hi", "-s", "Be terse."])
    assert short.exit_code == 0 and engine.prompts[-1] == engine.prompts[0]


def test_run_system_with_raw_is_refused(monkeypatch, capsys, chat_model_dir):
    code, _, err = run_main(monkeypatch, capsys, ["run", str(chat_model_dir), "Hi", "--raw", "--system", "x"])
    assert code == 1 and "--raw" in one_error_line(err)


def test_run_json_ends_with_a_done_record(monkeypatch, chat_model_dir):
    opened_models(monkeypatch, chat_model_dir, ["Hel", "lo", " there"])
    result = runner.invoke(app, ["run", str(chat_model_dir), "Hi", "--json"])
    *pieces, final = [json.loads(line) for line in result.stdout.splitlines()]
    assert [piece["text"] for piece in pieces] == ["Hel", "lo", " there"]
    assert (final["done"], final["model"], final["text"]) == (True, str(chat_model_dir), "Hello there")
    assert final["decode_tok_s"] == 20.0 and final["prompt_tok_s"] == rounded(final["prompt_tokens"] / 0.01)


@pytest.mark.parametrize(
    "value, expected",
    [(1 / 3, 0.3333), (48.1279, 48.13), (12345.678, 12350.0), (0.000123456, 0.0001235), (7, 7), ("x", "x")],
)
def test_json_floats_keep_four_significant_digits(value, expected):
    assert rounded({"a": [value]}) == {"a": [expected]}


# ----- bench: metadata, Ctrl-C ---------------------------------------------------------------------


def test_bench_json_carries_the_machine_version_and_time(chat_model_dir):
    from importlib.metadata import version

    result = runner.invoke(app, ["bench", str(chat_model_dir), "-p", "4", "-n", "2", "-r", "1", "--json"])
    assert result.exit_code == 0, result.output
    for record in json.loads(result.stdout):
        assert record["threads"] >= 1 and record["cpu"] and record["version"] == version("localv3")
        assert "gpu" in record and re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00", record["test_time"])


class InterruptedAfterPrefill(ScriptedEngine):
    """The warm-up and the prefill test run; Ctrl-C comes during the decode test (the second
    call with a one-token prompt: the first is the warm-up's)."""

    decode_calls = 0

    def stream_generate(self, token_ids, max_new_tokens=256, **settings):
        if len(token_ids) == 1:
            self.decode_calls += 1
            if self.decode_calls == 2:
                raise KeyboardInterrupt
        yield from super().stream_generate(token_ids, max_new_tokens, **settings)


def test_ctrl_c_in_bench_prints_the_rows_measured(monkeypatch, capsys, chat_model_dir):
    opened_models(monkeypatch, chat_model_dir, ["a", "b"], InterruptedAfterPrefill)
    code, out, err = run_main(monkeypatch, capsys, ["bench", str(chat_model_dir), "-p", "8", "-n", "4", "-r", "2", "--json"])
    assert code == 130 and err.endswith("interrupted\n")
    assert [record["test"] for record in json.loads(out)] == ["pp8"]


# ----- quantize: GGUF checks before any file is written ------------------------------------------


def test_gguf_without_llama_cpp_python_is_refused_before_writing(monkeypatch, capsys, chat_model_dir, tmp_path):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # `import llama_cpp` fails as when it is not installed
    target = tmp_path / "out"
    target.mkdir()
    code, out, err = run_main(monkeypatch, capsys, ["quantize", str(chat_model_dir), "--format", "gguf", "--out", str(target)])
    line = one_error_line(err)
    assert code == 1 and out == "" and list(target.iterdir()) == []
    assert "--type q4_k_m needs llama-cpp-python: pip install 'localv3[llama]'" in line and "f16" in line


def test_gguf_out_without_the_suffix_gets_it(monkeypatch, capsys, chat_model_dir, tmp_path):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # f16 needs no llama.cpp
    code, out, _ = run_main(
        monkeypatch, capsys, ["quantize", str(chat_model_dir), "--format", "gguf", "--type", "f16", "--out", str(tmp_path / "model")]
    )
    assert code == 0 and out == f"{tmp_path / 'model.gguf'}\n"
    assert (tmp_path / "model.gguf").read_bytes()[:4] == b"GGUF" and not (tmp_path / "model").exists()


def test_a_gguf_out_for_the_localv3_format_is_refused(monkeypatch, capsys, chat_model_dir, tmp_path):
    code, _, err = run_main(monkeypatch, capsys, ["quantize", str(chat_model_dir), "--out", str(tmp_path / "m.gguf")])
    assert code == 1 and "--format gguf" in one_error_line(err) and not (tmp_path / "m.gguf").exists()
