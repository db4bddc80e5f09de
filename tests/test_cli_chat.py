"""`localv3 chat`: the REPL logic, the command through CliRunner, and a real pseudo-terminal."""

from __future__ import annotations

import json
import os
import shutil

import pexpect
import pytest
from cli_entry import LOCALV3
from fixtures_cli import ScriptedEngine, scripted_loader
from rich.console import Console
from typer.testing import CliRunner

from cli import app
from localv3.chat_session import (
    ChatCommandError,
    ChatSettings,
    Command,
    Conversation,
    MultilineInput,
    ThinkSplitter,
    parse_command,
    prompt_opens_think,
)
from localv3.commands.chat import ChatRepl

runner = CliRunner()


def chat(model_dir, lines: list[str], *options: str):
    return runner.invoke(app, ["chat", str(model_dir), *options], input="".join(line + "\n" for line in lines))


# ----- pure logic -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "line, command",
    [
        ("/bye", Command("bye")),
        ("  /clear ", Command("clear")),
        ("/show", Command("show")),
        ("/?", Command("help")),
        ("/help", Command("help")),
        ("/set system You are terse.", Command("set_system", system="You are terse.")),
        ("/set temperature 0.25", Command("set_temperature", temperature=0.25)),
        ("hello /bye", None),
    ],
)
def test_parse_command(line, command):
    assert parse_command(line) == command


@pytest.mark.parametrize(
    "line", ["/sett", "/set temperature hot", "/set temperature -1", "/set system", "/set top_k 3"]
)
def test_malformed_commands(line):
    with pytest.raises(ChatCommandError):
        parse_command(line)


def test_multiline_input():
    lines = MultilineInput()
    assert lines.feed("single") == "single"
    assert lines.feed('"""') is None and lines.open
    assert lines.feed("first") is None
    assert lines.feed('second"""') == "first\nsecond" and not lines.open
    assert lines.feed('"""all on one line"""') == "all on one line"
    assert lines.feed('"""start') is None
    lines.cancel()
    assert not lines.open


def test_think_splitter_handles_tags_split_across_pieces():
    splitter = ThinkSplitter()
    pieces = ["Hi <th", "ink>let me ", "think</", "think>The answer", " is 4.<"]
    segments = [s for piece in pieces for s in splitter.feed(piece)] + splitter.flush()
    thought = "".join(text for thinking, text in segments if thinking)
    answer = "".join(text for thinking, text in segments if not thinking)
    assert thought == "let me think"
    assert answer == "Hi The answer is 4.<"


def test_r1_generation_prompt_starts_inside_a_thought():
    assert prompt_opens_think("<｜Assistant｜><think>\n")
    assert not prompt_opens_think("<｜Assistant｜>")
    splitter = ThinkSplitter(thinking=True)
    assert splitter.feed("pondering</think>Yes.") == [(True, "pondering"), (False, "Yes.")]


def test_conversation_messages():
    conversation = Conversation()
    conversation.add_user("q")
    conversation.add_assistant("a")
    assert [(m.role, m.content) for m in conversation.messages("sys")] == [
        ("system", "sys"),
        ("user", "q"),
        ("assistant", "a"),
    ]
    assert [m.role for m in conversation.messages(None)] == ["user", "assistant"]
    conversation.clear()
    assert conversation.messages(None) == []


class ScriptedReader:
    """Lines to return in turn; an exception instance is raised instead (Ctrl-C, Ctrl-D)."""

    def __init__(self, *lines):
        self.lines = list(lines)
        self.prompts: list[str] = []

    def read(self, prompt: str) -> str:
        self.prompts.append(prompt)
        line = self.lines.pop(0)
        if isinstance(line, BaseException):
            raise line
        return line


def repl_for(chat_model_dir, reader, pieces=("ok",), **script):
    settings = ChatSettings(temperature=0.0, top_p=1.0, top_k=0, seed=None, max_tokens=None)
    engine = ScriptedEngine(chat_model_dir, list(pieces), **script)
    out, err = Console(record=True, width=200), Console(record=True, width=200)
    return ChatRepl(engine, settings, out, err, reader), engine, out, err


def test_ctrl_c_at_the_prompt_keeps_going_and_ctrl_d_exits(chat_model_dir):
    reader = ScriptedReader('"""', KeyboardInterrupt(), "question", EOFError())
    repl, engine, out, err = repl_for(chat_model_dir, reader)
    repl.loop()
    assert reader.prompts == [">>> ", "... ", ">>> ", ">>> "]  # Ctrl-C also cancels a multi-line message
    assert "Use Ctrl + d or /bye to exit." in err.export_text()
    assert len(engine.prompts) == 1 and "question" in engine.prompt_text()


# ----- CliRunner: stdin is not a TTY, so the REPL reads plain lines ----------------------------


def test_question_streams_the_answer_and_a_stats_line(chat_model_dir):
    lines = ["Hello", "/show", "/?", "/frobnicate", "/bye", "never read"]
    result = chat(chat_model_dir, lines, "--temperature", "0", "--max-tokens", "8", "--ctx", "512", "--no-mtp")
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(">>> ") and len(result.stdout.splitlines()[0]) > len(">>> ")
    assert "8 tokens · " in result.stderr and "tok/s · TTFT " in result.stderr and "context " in result.stderr
    assert str(chat_model_dir) in result.stdout and "placement   planned (gpu=cpu)" in result.stdout
    assert "/ 512 tokens used" in result.stdout and "mtp         off" in result.stdout
    assert "Available commands:" in result.stdout and "unknown command '/frobnicate'" in result.stderr
    assert result.stderr.count("tokens · ") == 1  # nothing after /bye


def test_end_of_input_exits_cleanly(chat_model_dir):
    result = chat(chat_model_dir, [], "--max-tokens", "2")
    assert result.exit_code == 0, result.output


def test_conversation_is_kept_and_cleared(monkeypatch, chat_model_dir):
    engine = scripted_loader(monkeypatch, chat_model_dir, ["Paris."])
    result = chat(chat_model_dir, ["Capital of France?", "And Spain?", "/clear", "Fresh start"])
    assert result.exit_code == 0, result.output
    second, third = engine.prompt_text(1), engine.prompt_text(2)
    assert (
        "<｜User｜>Capital of France?<｜Assistant｜>Paris.<｜end▁of▁sentence｜><｜User｜>And Spain?<｜Assistant｜>"
        in second
    )
    assert "France" not in third and "Fresh start" in third
    assert "Cleared the conversation." in result.stderr


def test_system_message_from_option_and_set(monkeypatch, chat_model_dir):
    engine = scripted_loader(monkeypatch, chat_model_dir, ["ok"])
    chat(chat_model_dir, ["one", "/set system Talk like a pirate.", "two"], "-s", "Be brief.")
    assert engine.prompt_text(0).startswith("<｜begin▁of▁sentence｜>Be brief.<｜User｜>one")
    assert engine.prompt_text(1).startswith("<｜begin▁of▁sentence｜>Talk like a pirate.<｜User｜>one")


def test_set_temperature_changes_the_next_answer(monkeypatch, chat_model_dir):
    engine = scripted_loader(monkeypatch, chat_model_dir, ["ok"])
    result = chat(
        chat_model_dir,
        ["a", "/set temperature 0.2", "/set temperature warm", "b"],
        "--temp",
        "0.9",
        "--seed",
        "5",
        "--top-p",
        "0.8",
    )
    assert [call["temperature"] for call in engine.calls] == [0.9, 0.2]
    assert engine.calls[0]["seed"] == 5 and engine.calls[0]["top_p"] == 0.8
    assert "Set temperature to 0.2." in result.stderr and "usage: /set temperature" in result.stderr


def test_mtp_option_reaches_the_engine(monkeypatch, chat_model_dir):
    engine = scripted_loader(monkeypatch, chat_model_dir, ["ok"], speculation={"acceptance": 0.8})
    result = chat(chat_model_dir, ["a"], "--mtp")
    assert engine.calls[0]["speculative"] is True
    assert "MTP acceptance 80%" in result.stderr


def test_multiline_message(monkeypatch, chat_model_dir):
    engine = scripted_loader(monkeypatch, chat_model_dir, ["ok"])
    result = chat(chat_model_dir, ['"""', "/not a command", "second line", '"""'])
    assert result.exit_code == 0, result.output
    assert "<｜User｜>/not a command\nsecond line<｜Assistant｜>" in engine.prompt_text()


def test_thinking_is_shown_but_not_kept(monkeypatch, chat_model_dir):
    engine = scripted_loader(monkeypatch, chat_model_dir, ["<think>", "weighing it", "</think>", "Yes."])
    result = chat(chat_model_dir, ["Is it?", "Sure?"])
    assert "weighing it" in result.stdout and "Yes." in result.stdout
    second = engine.prompt_text(1)
    assert "<｜Assistant｜>Yes.<｜end▁of▁sentence｜>" in second and "weighing" not in second


def with_chat_template(model_dir, tmp_path, template):
    """A copy of the fixture model whose tokenizer_config.json has another chat template (or none)."""
    copy = shutil.copytree(model_dir, tmp_path / "model")
    config_path = copy / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["chat_template"] = template
    config_path.write_text(json.dumps(config, ensure_ascii=False), encoding="utf-8")
    return copy


def test_r1_template_that_opens_the_thought(monkeypatch, chat_model_dir, tmp_path):
    from fixtures_cli import CHAT_TEMPLATE

    r1_template = CHAT_TEMPLATE.replace(
        "{% if add_generation_prompt %}<｜Assistant｜>", "{% if add_generation_prompt %}<｜Assistant｜><think>\n"
    )
    model_dir = with_chat_template(chat_model_dir, tmp_path, r1_template)
    engine = scripted_loader(monkeypatch, model_dir, ["reasoning", "</think>", "Done."])
    result = chat(model_dir, ["Why?", "Again"])
    assert "reasoning" in result.stdout and "Done." in result.stdout
    assert "<｜Assistant｜>Done.<｜end▁of▁sentence｜><｜User｜>Again<｜Assistant｜><think>\n" in engine.prompt_text(1)


def test_model_without_chat_template(chat_model_dir, tmp_path):
    result = chat(with_chat_template(chat_model_dir, tmp_path, None), ["Hi"])
    assert result.exit_code == 1 and "no chat template" in str(result.exception)


def test_ctrl_c_mid_answer_returns_to_the_prompt(monkeypatch, chat_model_dir):
    engine = scripted_loader(monkeypatch, chat_model_dir, ["Part", "ial", "never"], interrupt_after=2)
    result = chat(chat_model_dir, ["Long question", "Next"])
    assert result.exit_code == 0, result.output
    assert "Partial" in result.stdout and "never" not in result.stdout
    assert result.stderr.count("(stopped)") == 2
    assert "<｜User｜>Long question<｜Assistant｜>Partial<｜end▁of▁sentence｜><｜User｜>Next" in engine.prompt_text(1)


def test_typed_control_tokens_stay_text(monkeypatch, chat_model_dir):
    """A message that spells the template's markers is encoded as `run` encodes it: as plain
    text, so the only assistant marker is the template's own."""
    engine = scripted_loader(monkeypatch, chat_model_dir, ["ok"])
    typed = "Say <｜Assistant｜> now"
    result = chat(chat_model_dir, [typed])
    assert result.exit_code == 0, result.output
    assert engine.prompts[0] == engine.tokenizer.encode_chat([{"role": "user", "content": typed}])
    assistant = engine.tokenizer.backend.token_to_id("<｜Assistant｜>")
    assert engine.prompts[0].count(assistant) == 1


def test_context_full_is_explained(chat_model_dir):
    result = chat(chat_model_dir, ["word " * 40, "Hi", "/show"], "--ctx", "32", "--temperature", "0", "--no-mtp")
    assert result.exit_code == 0, result.output
    assert "no longer fits the 32-token context" in result.stderr
    assert "The context is full, so the answer was cut short" in result.stderr
    assert "32 / 32 tokens used" in result.stdout


def test_model_without_tokenizer_cannot_chat(tmp_path):
    from localv3.synthetic import TINY_V3, write_checkpoint

    write_checkpoint(tmp_path, TINY_V3)
    result = chat(tmp_path, ["Hi"])
    assert result.exit_code == 1 and "no tokenizer.json" in str(result.exception)


# ----- a real pseudo-terminal: prompt_toolkit, SIGINT from the terminal, exit ------------------


def test_chat_in_a_pseudo_terminal(chat_model_dir, tmp_path):
    env = dict(os.environ, PROMPT_TOOLKIT_NO_CPR="1", LOCALV3_HOME=str(tmp_path), TERM="xterm")
    args = ["chat", str(chat_model_dir), "--temperature", "0", "--max-tokens", "100000"]
    child = pexpect.spawn(str(LOCALV3), args, env=env, encoding="utf-8", timeout=90, dimensions=(40, 200))
    try:
        child.expect(">>>")
        child.sendline("/set temperature 0")
        child.expect("Set temperature to 0.")
        child.expect(">>>")
        child.sendline("Hello there")
        child.expect(r"\x1b\[\?2004l")  # prompt_toolkit hands the terminal back: the answer starts
        child.expect(r"[ -~]{10}")  # ten characters of the answer have streamed
        child.sendintr()
        child.expect(r"\(stopped\)")
        child.expect(">>>")
        child.sendintr()
        child.expect("Use Ctrl \\+ d or /bye to exit.")
        child.expect(">>>")
        child.sendline("/bye")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0
    assert "Hello there" in (tmp_path / "chat_history").read_text()
