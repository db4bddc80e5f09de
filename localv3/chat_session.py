"""The logic of `localv3 chat`, free of terminals and models: the conversation, the settings
that /set changes, /command parsing, `\"\"\"` multi-line input and DeepSeek-R1 `<think>` handling."""

from __future__ import annotations

from dataclasses import dataclass, field

from localv3.tokenizer import ChatMessage

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
MULTILINE_QUOTE = '"""'

HELP_TEXT = """\
Available commands:
  /set system <text>       Set the system message
  /set temperature <t>     Set the sampling temperature (0 = greedy)
  /show                    Show the model, its placement, the context used and the settings
  /clear                   Forget the conversation
  /bye                     Exit
  /?, /help                Show this help

Use \"\"\" to begin and end a multi-line message.
Ctrl-C stops an answer; Ctrl-D exits."""


class ChatCommandError(Exception):
    """A malformed /command; the message is shown and the REPL goes on."""


@dataclass
class ChatSettings:
    temperature: float
    top_p: float
    top_k: int
    seed: int | None
    max_tokens: int | None
    system: str | None = None
    speculative: bool | None = None  # MTP on/off; None lets the engine decide


@dataclass
class Conversation:
    """The turns so far; assistant turns hold the answer only, never the thinking."""

    turns: list[ChatMessage] = field(default_factory=list)

    def messages(self, system: str | None) -> list[ChatMessage]:
        head = [ChatMessage("system", system)] if system else []
        return head + self.turns

    def add_user(self, text: str) -> None:
        self.turns.append(ChatMessage("user", text))

    def add_assistant(self, answer: str) -> None:
        self.turns.append(ChatMessage("assistant", answer))

    def drop_last(self) -> None:
        self.turns.pop()

    def clear(self) -> None:
        self.turns.clear()


@dataclass(frozen=True)
class Command:
    """A parsed /command: name is one of bye, clear, show, help, set_system, set_temperature."""

    name: str
    system: str | None = None
    temperature: float | None = None


def parse_command(line: str) -> Command | None:
    """The command a line holds, None when it is a message; ChatCommandError when malformed."""
    stripped = line.strip()
    if not stripped.startswith("/"):
        return None
    word, _, rest = stripped.partition(" ")
    rest = rest.strip()
    simple = {"/bye": "bye", "/exit": "bye", "/clear": "clear", "/show": "show", "/?": "help", "/help": "help"}
    if word in simple:
        return Command(simple[word])
    if word == "/set":
        return _parse_set(rest)
    raise ChatCommandError(f"unknown command {word!r}; type /? for help")


def _parse_set(rest: str) -> Command:
    key, _, value = rest.partition(" ")
    value = value.strip()
    if key == "system":
        if not value:
            raise ChatCommandError("usage: /set system <text>")
        return Command("set_system", system=value)
    if key == "temperature":
        try:
            temperature = float(value)
        except ValueError:
            raise ChatCommandError("usage: /set temperature <number >= 0>") from None
        if not temperature >= 0:
            raise ChatCommandError("usage: /set temperature <number >= 0>")
        return Command("set_temperature", temperature=temperature)
    raise ChatCommandError("usage: /set system <text> | /set temperature <number>")


class MultilineInput:
    """Collects a message typed between two \"\"\" marks; single lines pass straight through."""

    def __init__(self) -> None:
        self.lines: list[str] | None = None

    @property
    def open(self) -> bool:
        return self.lines is not None

    def feed(self, line: str) -> str | None:
        """The complete message once there is one, else None (more lines wanted)."""
        if self.lines is None:
            if not line.lstrip().startswith(MULTILINE_QUOTE):
                return line
            line = line.lstrip()[len(MULTILINE_QUOTE) :]
            self.lines = []
            if not line.strip():
                return None
        if line.rstrip().endswith(MULTILINE_QUOTE):
            last = line.rstrip()[: -len(MULTILINE_QUOTE)]
            if last:
                self.lines.append(last)
            message, self.lines = "\n".join(self.lines), None
            return message
        self.lines.append(line)
        return None

    def is_multiline(self, line: str) -> bool:
        """Whether `line` opens or continues a multi-line message (whose text is never a /command)."""
        return self.open or line.lstrip().startswith(MULTILINE_QUOTE)

    def cancel(self) -> None:
        self.lines = None


def prompt_opens_think(rendered_prompt: str) -> bool:
    """R1 templates end the generation prompt with `<think>\\n`: the answer starts inside a thought."""
    return rendered_prompt.rstrip().endswith(THINK_OPEN)


class ThinkSplitter:
    """Splits streamed text into (thinking, text) segments at `<think>` / `</think>`.

    A piece may end in the middle of a tag; that tail is held back until the next piece
    shows whether it is one. The tags themselves are not returned.
    """

    def __init__(self, thinking: bool = False):
        self.thinking = thinking
        self.pending = ""

    def feed(self, piece: str) -> list[tuple[bool, str]]:
        self.pending += piece
        segments: list[tuple[bool, str]] = []
        while True:
            tag = THINK_CLOSE if self.thinking else THINK_OPEN
            at = self.pending.find(tag)
            if at < 0:
                break
            if at:
                segments.append((self.thinking, self.pending[:at]))
            self.pending = self.pending[at + len(tag) :]
            self.thinking = not self.thinking
        keep = _partial_tag_length(self.pending, THINK_CLOSE if self.thinking else THINK_OPEN)
        ready = self.pending[: len(self.pending) - keep]
        self.pending = self.pending[len(self.pending) - keep :]
        if ready:
            segments.append((self.thinking, ready))
        return segments

    def flush(self) -> list[tuple[bool, str]]:
        rest, self.pending = self.pending, ""
        return [(self.thinking, rest)] if rest else []


def _partial_tag_length(text: str, tag: str) -> int:
    """How many trailing characters of `text` could begin `tag`."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0
