"""Tool calls in DeepSeek's markup, mapped to and from OpenAI's `tools` / `tool_calls`.

DeepSeek-V3/R1 chat templates render an assistant's calls as

    <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME
    ```json
    ARGUMENTS
    ```<｜tool▁call▁end｜><｜tool▁calls▁end｜>

(V3.1-style templates write `NAME<｜tool▁sep｜>ARGUMENTS` instead) and tool results as
`tool` messages; both come in as OpenAI messages and are rendered by the model's own template.
Those templates do not render the function definitions, so the offered functions go into the
system message, with the call syntax the template uses.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass

CALLS_BEGIN = "<｜tool▁calls▁begin｜>"
CALLS_END = "<｜tool▁calls▁end｜>"
CALL_BEGIN = "<｜tool▁call▁begin｜>"
CALL_END = "<｜tool▁call▁end｜>"
SEPARATOR = "<｜tool▁sep｜>"
CALL = re.compile(re.escape(CALL_BEGIN) + "(.*?)" + re.escape(SEPARATOR) + "(.*?)" + re.escape(CALL_END), re.DOTALL)
FENCED_JSON = re.compile(r"\A\s*(\S+)\s*\n```(?:json)?\s*\n(.*?)\n?```\s*\Z", re.DOTALL)


@dataclass(frozen=True)
class ToolCallFormat:
    """The markup of one chat template; `begin_id` is the token that opens a model's calls."""

    begin_id: int
    typed: bool  # V3/R1: `function<sep>NAME` and fenced JSON; else V3.1: `NAME<sep>ARGUMENTS`

    def instructions(self, functions: list[dict]) -> str:
        """The system-message text that offers `functions` and shows how to call them."""
        if self.typed:
            example = f'{CALL_BEGIN}function{SEPARATOR}NAME\n```json\n{{"argument": "value"}}\n```{CALL_END}'
        else:
            example = f'{CALL_BEGIN}NAME{SEPARATOR}{{"argument": "value"}}{CALL_END}'
        listed = "\n".join(json.dumps(f, ensure_ascii=False) for f in functions)
        return (
            "You can call the functions below. To call one or more, answer with only this, one "
            f"{CALL_BEGIN}...{CALL_END} block per call:\n{CALLS_BEGIN}{example}{CALLS_END}\n\n"
            f"Functions (JSON schema):\n{listed}"
        )

    def parse(self, section: str) -> list[dict]:
        """The OpenAI tool_calls written in `section` (the text from CALLS_BEGIN on)."""
        calls = []
        for head, body in CALL.findall(section):
            fenced = FENCED_JSON.match(body)
            if fenced and head.strip() == "function":  # V3/R1 layout
                name, arguments = fenced.group(1), fenced.group(2)
            else:
                name, arguments = head, body
            calls.append(
                {
                    "id": f"call_{uuid.uuid4().hex[:24]}",
                    "type": "function",
                    "function": {"name": name.strip(), "arguments": arguments.strip()},
                }
            )
        return calls


def tool_call_format(chat_template: str | None, begin_id: int | None) -> ToolCallFormat | None:
    """The format a template renders tool calls in; None when it renders none (or the
    tokenizer has no single token that opens them)."""
    if not chat_template or CALLS_BEGIN not in chat_template or "tool_calls" not in chat_template or begin_id is None:
        return None
    return ToolCallFormat(begin_id=begin_id, typed="```json" in chat_template)


def offer_functions(messages: list[dict], functions: list[dict], fmt: ToolCallFormat) -> list[dict]:
    """`messages` with the functions described in the (first) system message."""
    text = fmt.instructions(functions)
    if messages and messages[0]["role"] == "system":
        first = messages[0]
        return [{**first, "content": f"{first['content']}\n\n{text}"}, *messages[1:]]
    return [{"role": "system", "content": text}, *messages]
