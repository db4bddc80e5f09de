"""A generated answer as the chat API returns it: reasoning, content and tool calls.

R1-style thinking (between `<think>` and `</think>`, or from the start when the prompt opens
the thought) goes to `reasoning_content`, as DeepSeek's API returns it, and never into
`content`. From the token that opens a tool-call section on, the tokens are kept and parsed
whole at the end (the section's markers may be special tokens that the streamed text leaves
out, so it is decoded again with them).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from localv3.chat_session import ThinkSplitter
from localv3.generate import GenerationChunk
from localv3.serve.tools import CALLS_BEGIN, ToolCallFormat
from localv3.tokenizer import Tokenizer


@dataclass
class Delta:
    """New answer text: thinking and visible content."""

    reasoning: str = ""
    content: str = ""

    def __bool__(self) -> bool:
        return bool(self.reasoning or self.content)

    def add(self, other: "Delta") -> None:
        self.reasoning += other.reasoning
        self.content += other.content


@dataclass
class AnswerSplitter:
    tokenizer: Tokenizer
    thinking: bool  # the prompt opened a thought: the answer starts inside it
    tools: ToolCallFormat | None = None  # parse tool calls (None: the request offered none)
    section: list[int] | None = field(default=None, init=False)  # tool-call tokens after the opener

    def __post_init__(self) -> None:
        self.splitter = ThinkSplitter(self.thinking)

    def feed(self, chunk: GenerationChunk) -> Delta:
        if self.section is not None:
            self.section.extend(chunk.token_ids)
            return Delta()
        text = chunk.text
        if self.tools is not None and self.tools.begin_id in chunk.token_ids:
            at = chunk.token_ids.index(self.tools.begin_id)
            self.section = list(chunk.token_ids[at + 1 :])
            if CALLS_BEGIN in text:  # the opener is plain text in this tokenizer
                text = text[: text.index(CALLS_BEGIN)]
        return self._delta(self.splitter.feed(text))

    def finish(self) -> tuple[Delta, list[dict]]:
        """The held-back tail and the tool calls; a section with no well-formed call is content."""
        tail = self._delta(self.splitter.flush())
        if self.section is None:
            return tail, []
        text = CALLS_BEGIN + self.tokenizer.decode(self.section, skip_special_tokens=False)
        calls = self.tools.parse(text)
        if not calls:
            tail.content += text
        return tail, calls

    @staticmethod
    def _delta(segments: list[tuple[bool, str]]) -> Delta:
        delta = Delta()
        for thinking, text in segments:
            delta.add(Delta(reasoning=text) if thinking else Delta(content=text))
        return delta
