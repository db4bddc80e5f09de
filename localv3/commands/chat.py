"""`localv3 chat`: an Ollama-style `>>> ` REPL that streams answers as they are generated."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.text import Text

from localv3.chat_session import (
    HELP_TEXT,
    ChatCommandError,
    ChatSettings,
    Command,
    Conversation,
    MultilineInput,
    ThinkSplitter,
    parse_command,
    prompt_opens_think,
)
from localv3.commands.options import (
    DEFAULT_MODEL,
    Context,
    CudaGraphs,
    EngineName,
    MaxTokens,
    ModelArgument,
    Mtp,
    Seed,
    System,
    Temperature,
    TopK,
    TopP,
    check_cuda_graphs,
    model_and_prompt,
    resolve_sampling,
    typed_text,
)
from localv3.errors import ContextFullError, LocalV3Error
from localv3.render import stats_line

if TYPE_CHECKING:
    from localv3.engines.base import Engine
    from localv3.generate import GenerationStats

PROMPT = ">>> "
CONTINUATION_PROMPT = "... "


class LineReader:
    """Reads one line; raises EOFError on Ctrl-D (or a closed stdin) and KeyboardInterrupt on Ctrl-C."""

    def __init__(self) -> None:
        terminal = sys.stdin is not None and sys.stdin.isatty() and sys.stdout.isatty()
        self.session = _prompt_session() if terminal else None

    def read(self, prompt: str) -> str:
        if self.session is not None:
            return self.session.prompt(prompt)
        if sys.stdin is None:  # started with stdin closed (`<&-`): nothing will be typed
            raise EOFError
        return input(prompt)


def _prompt_session():
    """prompt_toolkit line editing, with history kept in $LOCALV3_HOME/chat_history when writable."""
    from prompt_toolkit import PromptSession
    from prompt_toolkit.history import FileHistory, InMemoryHistory

    from localv3.registry import localv3_home

    try:
        home = localv3_home()
        home.mkdir(parents=True, exist_ok=True)
        history = FileHistory(str(home / "chat_history"))
    except OSError:
        history = InMemoryHistory()
    return PromptSession(history=history)


@dataclass
class Answer:
    """What one turn produced: the answer text (thinking left out) and how it ended."""

    text: str = ""
    ends_line: bool = True
    token_count: int = 0
    stats: GenerationStats | None = None
    interrupted: bool = False


class ChatRepl:
    def __init__(self, engine: Engine, settings: ChatSettings, out: Console, err: Console, reader: LineReader):
        self.engine = engine
        self.settings = settings
        self.out = out
        self.err = err
        self.reader = reader
        self.conversation = Conversation()
        self.context_used = 0

    def loop(self, first_message: str | None = None) -> None:
        """Read and answer messages until /bye or end of input; `first_message` (given on the
        command line) is asked first, as if typed."""
        if first_message is not None and first_message.strip():
            self.out.print(Text(PROMPT + first_message))
            self.ask(first_message)
        multiline = MultilineInput()
        while True:
            try:
                line = self.reader.read(CONTINUATION_PROMPT if multiline.open else PROMPT)
            except KeyboardInterrupt:
                multiline.cancel()
                self.note("Use Ctrl + d or /bye to exit.")
                continue
            except EOFError:
                self.out.print()
                return
            typed_multiline = multiline.is_multiline(line)
            message = multiline.feed(line)
            if message is None:
                continue
            try:
                command = None if typed_multiline else parse_command(message)
            except ChatCommandError as exc:
                self.note(str(exc))
                continue
            if command is not None and command.name == "bye":
                return
            if command is not None:
                self.apply(command)
            elif message.strip():
                self.ask(message)

    def apply(self, command: Command) -> None:
        if command.name == "clear":
            self.conversation.clear()
            self.context_used = 0
            self.note("Cleared the conversation.")
        elif command.name == "set_system":
            self.settings.system = command.system
            self.note("Set the system message.")
        elif command.name == "set_temperature":
            self.settings.temperature = command.temperature
            self.note(f"Set temperature to {command.temperature:g}.")
        elif command.name == "show":
            self.out.print(self.show_text(), markup=False)
        elif command.name == "help":
            self.out.print(HELP_TEXT, markup=False)

    def show_text(self) -> str:
        config = self.engine.config
        experts = f", {config.n_routed_experts} routed experts" if config.n_routed_experts else ""
        rows = [
            ("model", f"{self.engine.path} ({config.model_type}, {config.num_hidden_layers} layers{experts})"),
            ("engine", self.engine.name),
            ("placement", self.engine.placement),
            ("context", f"{self.context_used} / {self.engine.max_context} tokens used"),
            ("system", self.settings.system or "(none)"),
            ("temperature", f"{self.settings.temperature:g}"),
            ("top_p", f"{self.settings.top_p:g}"),
            ("top_k", str(self.settings.top_k or "off")),
            ("seed", "random" if self.settings.seed is None else str(self.settings.seed)),
            ("mtp", {None: "engine decides", True: "on", False: "off"}[self.settings.speculative]),
        ]
        return "\n".join(f"  {name:<12}{value}" for name, value in rows)

    def ask(self, question: str) -> None:
        """One turn: the question in the template, the answer streamed, both kept in the conversation."""
        self.conversation.add_user(question)
        try:
            prompt_ids, answer = self.answer()
        except LocalV3Error as exc:  # a full context, a template that refuses the messages
            self.conversation.drop_last()
            self.note(str(exc))
            return
        if not answer.ends_line:
            self.out.print()
        self.conversation.add_assistant(answer.text)
        self.context_used = len(prompt_ids) + answer.token_count
        if answer.interrupted:
            self.note("(stopped)")
            return
        self.note(stats_line(answer.stats, self.context_used, self.engine.max_context))
        if answer.stats.finish_reason == "context":
            self.note(
                "The context is full, so the answer was cut short: /clear starts over, or restart with a larger --ctx."
            )

    def answer(self) -> tuple[list[int], Answer]:
        """Encode the conversation as `run` and `serve` do (typed text that spells a control token
        stays text), check it fits, and stream the answer (Ctrl-C ends it early)."""
        tokenizer = self.engine.tokenizer
        messages = self.conversation.messages(self.settings.system)
        rendered = tokenizer.render_chat(messages)
        prompt_ids = tokenizer.encode_chat(messages)
        if len(prompt_ids) >= self.engine.max_context:
            raise ContextFullError(
                f"The conversation ({len(prompt_ids)} tokens) no longer fits the {self.engine.max_context}-token "
                "context: /clear starts over, or restart with a larger --ctx."
            )
        answer = Answer()
        try:
            self.stream(prompt_ids, ThinkSplitter(thinking=prompt_opens_think(rendered)), answer)
        except KeyboardInterrupt:
            answer.interrupted = True
        return prompt_ids, answer

    def stream(self, prompt_ids: list[int], splitter: ThinkSplitter, answer: Answer) -> None:
        """Print the answer as it comes, thinking dimmed; fills `answer` as it goes."""
        settings = self.settings
        chunks = self.engine.stream_generate(
            prompt_ids,
            max_new_tokens=settings.max_tokens or self.engine.max_context,
            temperature=settings.temperature,
            top_k=settings.top_k,
            top_p=settings.top_p,
            seed=settings.seed,
            speculative=settings.speculative,
            reuse_cache=True,  # earlier turns stay in the latent cache: only the new turn is prefilled
        )
        for chunk in chunks:
            answer.token_count += len(chunk.token_ids)
            answer.stats = chunk.stats or answer.stats
            self.show(splitter.feed(chunk.text), answer)
        self.show(splitter.flush(), answer)

    def show(self, segments: list[tuple[bool, str]], answer: Answer) -> None:
        for thinking, text in segments:
            self.out.print(Text(text, style="dim" if thinking else ""), end="")
            answer.ends_line = text.endswith("\n")
            if not thinking:
                answer.text += text

    def note(self, text: str) -> None:
        self.err.print(Text(text, style="dim"))


def chat(
    model: ModelArgument = DEFAULT_MODEL,
    message: Annotated[
        str | None, typer.Argument(help="A first message, answered before the chat goes on.", show_default=False)
    ] = None,
    system: System = None,
    temperature: Temperature = None,
    top_k: TopK = None,
    top_p: TopP = None,
    seed: Seed = None,
    max_tokens: MaxTokens = None,
    mtp: Mtp = None,
    ctx: Context = None,
    engine: EngineName = None,
    cuda_graphs: CudaGraphs = False,
) -> None:
    """Chat with a model in the terminal (/? lists the commands)."""
    from localv3.engine_choice import default_engine, open_engine

    model, message = model_and_prompt("chat", model, typed_text(message, "MESSAGE"))
    system = typed_text(system, "--system")
    engine = engine or default_engine(model)
    if cuda_graphs:
        check_cuda_graphs([engine])
    err = Console(stderr=True, highlight=False, soft_wrap=True)
    with err.status(f"loading {model}"):
        loaded = open_engine(model, engine, max_context=ctx, with_mtp=mtp is not False, cuda_graphs=cuda_graphs)
    if loaded.tokenizer is None:
        raise LocalV3Error(f"{model} has no tokenizer.json, so it cannot chat")
    if not loaded.tokenizer.chat_template:
        raise LocalV3Error(
            f"{model} has no chat template in tokenizer_config.json; `localv3 run --raw` sends plain text"
        )
    temperature, top_p, top_k = resolve_sampling(loaded.path, temperature, top_p, top_k)
    settings = ChatSettings(temperature, top_p, top_k, seed, max_tokens, system, speculative=mtp)
    ChatRepl(loaded, settings, Console(highlight=False, soft_wrap=True), err, LineReader()).loop(message)


def register(app: typer.Typer) -> None:
    app.command()(chat)
