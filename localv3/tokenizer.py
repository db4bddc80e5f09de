"""Text in and out: tokenizer.json through `tokenizers`, the chat template through jinja2.

DeepSeek's special tokens use full-width bars and U+2581, e.g. `<｜begin▁of▁sentence｜>`;
they come from the checkpoint's tokenizer files, never from constants here.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from jinja2 import Template
from jinja2.exceptions import TemplateError, TemplateSyntaxError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as HFTokenizer

from localv3.errors import LocalV3Error


class TokenizerError(LocalV3Error):
    pass


@dataclass(frozen=True)
class TokenizerSettings:
    """What localv3 reads from tokenizer_config.json, checked."""

    chat_templates: dict[str, str]  # name -> template; "default" is the one chat uses
    bos_token: str | None
    eos_token: str | None
    add_bos_token: bool

    @property
    def chat_template(self) -> str | None:
        return self.chat_templates.get("default")


def read_tokenizer_settings(model_dir: Path) -> TokenizerSettings:
    """tokenizer_config.json of `model_dir` (none: no template, no BOS/EOS), every field we use
    checked, with the file and the field named in the error."""
    path = Path(model_dir) / "tokenizer_config.json"
    if not path.is_file():
        return TokenizerSettings({}, None, None, False)
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise TokenizerError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise TokenizerError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None
    if not isinstance(config, dict):
        raise TokenizerError(f"{path}: expected a JSON object, found {type(config).__name__}")
    add_bos = config.get("add_bos_token", False)
    if not isinstance(add_bos, bool):
        raise TokenizerError(f"{path}: add_bos_token must be true or false, not {add_bos!r}")
    return TokenizerSettings(
        chat_templates=_chat_templates(path, config.get("chat_template")),
        bos_token=_token_text(path, "bos_token", config.get("bos_token")),
        eos_token=_token_text(path, "eos_token", config.get("eos_token")),
        add_bos_token=add_bos,
    )


def _chat_templates(path: Path, value: Any) -> dict[str, str]:
    """`chat_template` is one template, or a list of {"name", "template"} (named templates,
    as Hugging Face stores a default template beside e.g. a tool_use one)."""
    if value is None:
        return {}
    if isinstance(value, str):
        return {"default": value}
    named = value if isinstance(value, list) else None
    if named is not None and all(
        isinstance(item, dict) and isinstance(item.get("name"), str) and isinstance(item.get("template"), str)
        for item in named
    ):
        templates = {item["name"]: item["template"] for item in named}
        if "default" not in templates:
            raise TokenizerError(f"{path}: chat_template lists {sorted(templates)} but no template named 'default'")
        return templates
    raise TokenizerError(
        f"{path}: chat_template must be a string or a list of {{\"name\", \"template\"}} objects, "
        f"not {json.dumps(value)[:80]}"
    )


def _token_text(path: Path, field: str, value: Any) -> str | None:
    """Special tokens are stored as strings or {"content": ...} objects."""
    text = value.get("content") if isinstance(value, dict) else value
    if (value is None or isinstance(text, str)) and text != "":
        return text
    raise TokenizerError(f"{path}: {field} must be a token string or {{\"content\": ...}}, not {json.dumps(value)[:80]}")


@dataclass
class ChatMessage:
    role: str
    content: str


class Tokenizer:
    def __init__(self, model_dir: str | Path):
        model_dir = Path(model_dir)
        path = model_dir / "tokenizer.json"
        if not path.is_file():
            raise TokenizerError(f"{path}: tokenizer.json not found")
        try:
            self.backend = HFTokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises a bare Exception on malformed files
            raise TokenizerError(f"{path}: cannot read tokenizer ({exc})") from None
        settings = read_tokenizer_settings(model_dir)
        self.template_source = model_dir / "tokenizer_config.json"  # named in template errors
        self.chat_templates = settings.chat_templates
        self.chat_template: str | None = settings.chat_template
        self.bos_token = settings.bos_token
        self.eos_token = settings.eos_token
        self.add_bos_token = settings.add_bos_token
        self.bos_token_id = self.token_to_id(self.bos_token) if self.bos_token else None
        self.eos_token_id = self.token_to_id(self.eos_token) if self.eos_token else None
        self._template = None

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size()

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        """Plain text -> ids; special-token strings in `text` map to their ids."""
        ids = self.backend.encode(text, add_special_tokens=False).ids
        add_bos = self.add_bos_token if add_bos is None else add_bos
        if add_bos and self.bos_token_id is not None and (not ids or ids[0] != self.bos_token_id):
            ids = [self.bos_token_id] + ids
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    @property
    def renders_tools(self) -> bool:
        """The chat template reads a `tools` variable (function definitions it writes itself)."""
        return bool(self.chat_template) and re.search(r"\btools\b", self.chat_template) is not None

    def render_chat(
        self, messages: list[ChatMessage] | list[dict], add_generation_prompt: bool = True, tools: list[dict] | None = None
    ) -> str:
        """The conversation through the chat template; `tools` (OpenAI-style function
        definitions) reach templates that render them, as transformers passes them."""
        if not self.chat_template:
            raise TokenizerError("this model has no chat template; use --raw")
        if self._template is None:
            self._template = _compile_template(self.chat_template, self.template_source)
        as_dicts = [m if isinstance(m, dict) else {"role": m.role, "content": m.content} for m in messages]
        pieces, length = [], 0
        try:
            for piece in self._template.generate(
                messages=as_dicts,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token or "",
                eos_token=self.eos_token or "",
                **({"tools": tools} if tools is not None else {}),
            ):
                length += len(piece)
                if length > MAX_RENDERED_CHARS:  # counted as it renders: a runaway template stops here
                    raise TokenizerError(
                        f"the chat template expanded the conversation past {MAX_RENDERED_CHARS:,} characters, "
                        "more than any context holds"
                    )
                pieces.append(piece)
        except (TemplateError, OverflowError) as exc:  # OverflowError: the sandbox's range limit
            raise TokenizerError(f"chat template: {exc}") from None
        return "".join(pieces)

    def encode_chat(self, messages, add_generation_prompt: bool = True, tools: list[dict] | None = None) -> list[int]:
        """The rendered conversation -> ids (the template writes the BOS token itself). Only the
        template's own markers become special tokens: a user's, system or tool text that spells
        one (`<｜Assistant｜>` typed, piped in or returned by a tool) is encoded as the plain text it is."""
        as_dicts = [m if isinstance(m, dict) else {"role": m.role, "content": m.content} for m in messages]
        typed: dict[str, str] = {}  # placeholder -> text encoded with special tokens disabled
        for i, message in enumerate(as_dicts):
            content = message.get("content")
            if message.get("role") in TYPED_ROLES and isinstance(content, str) and self._spells_special(content):
                placeholder = f"{PLACEHOLDER_OPEN}{i}{PLACEHOLDER_CLOSE}"
                typed[placeholder] = content
                as_dicts[i] = {**message, "content": placeholder}
        text = self.render_chat(as_dicts, add_generation_prompt, tools)
        ids: list[int] = []
        for piece in PLACEHOLDER.split(text):
            if piece in typed:
                ids += self._encode_as_text(typed[piece])
            elif piece:
                ids += self.encode(piece, add_bos=False)
        return ids

    def _spells_special(self, text: str) -> bool:
        return any(token.content in text for token in self.backend.get_added_tokens_decoder().values() if token.special)

    def _encode_as_text(self, text: str) -> list[int]:
        self.backend.encode_special_tokens = True
        try:
            return self.backend.encode(text, add_special_tokens=False).ids
        finally:
            self.backend.encode_special_tokens = False


MAX_RENDERED_CHARS = 1 << 22  # ~4M characters: DeepSeek-V3's 163,840-token context is under 1M
TYPED_ROLES = ("user", "system", "tool")  # whose text comes from outside the model
PLACEHOLDER_OPEN, PLACEHOLDER_CLOSE = "\ue000", "\ue001"  # private-use characters
PLACEHOLDER = re.compile(f"({PLACEHOLDER_OPEN}\\d+{PLACEHOLDER_CLOSE})")


def _raise_template_error(message: str):
    raise TemplateError(message)


def _template_json(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None, sort_keys: bool = False) -> str:
    """`tojson` as chat templates expect it: plain JSON, not HTML-escaped (jinja2's own escapes
    <, >, & and ' for HTML, which would change tool schemas inside a prompt)."""
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format: str) -> str:
    """Today's date or time, as templates that state the date use it."""
    return datetime.now().strftime(format)


def _template_environment() -> ImmutableSandboxedEnvironment:
    """The sandbox chat templates run in, with what the hub's templates rely on: `break` and
    `continue` in loops, `raise_exception`, `strftime_now`, and a non-escaping `tojson`."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.globals["raise_exception"] = _raise_template_error
    env.globals["strftime_now"] = _strftime_now
    env.filters["tojson"] = _template_json
    return env


def _compile_template(source: str, origin: Path | str, name: str = "default") -> Template:
    try:
        return _template_environment().from_string(source)
    except TemplateSyntaxError as exc:
        which = "the chat template" if name == "default" else f"the chat template {name!r}"
        raise TokenizerError(f"{origin}: {which} does not compile (line {exc.lineno}: {exc.message})") from None


def validate_tokenizer_files(model_dir: Path) -> None:
    """`show`'s check: tokenizer_config.json reads, and each of its chat templates compiles."""
    for name, source in read_tokenizer_settings(model_dir).chat_templates.items():
        _compile_template(source, Path(model_dir) / "tokenizer_config.json", name)


class StreamDecoder:
    """Turns a growing list of token ids into text pieces, never splitting a UTF-8 character.

    A token that ends inside a multi-byte character decodes to U+FFFD; its text is held
    back until the next token completes the character.
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.emitted = ""

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""
        piece = text[len(self.emitted) :]
        self.emitted = text
        return piece

    def flush(self) -> str:
        text = self.tokenizer.decode(self.ids)
        piece = text[len(self.emitted) :]
        self.emitted = text
        return piece
