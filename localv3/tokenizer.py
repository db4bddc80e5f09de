"""Text in and out: tokenizer.json through `tokenizers`, the chat template through jinja2.

DeepSeek's special tokens use full-width bars and U+2581, e.g. `<｜begin▁of▁sentence｜>`;
they come from the checkpoint's tokenizer files, never from constants here.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jinja2.exceptions import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as HFTokenizer

from localv3.errors import LocalV3Error


class TokenizerError(LocalV3Error):
    pass


def _token_text(value: Any) -> str | None:
    """tokenizer_config.json stores special tokens as strings or {"content": ...} objects."""
    if isinstance(value, dict):
        return value.get("content")
    return value


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
        config_path = model_dir / "tokenizer_config.json"
        config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
        self.chat_template: str | None = config.get("chat_template")
        self.bos_token = _token_text(config.get("bos_token"))
        self.eos_token = _token_text(config.get("eos_token"))
        self.add_bos_token = bool(config.get("add_bos_token", False))
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

    def render_chat(self, messages: list[ChatMessage] | list[dict], add_generation_prompt: bool = True) -> str:
        if not self.chat_template:
            raise TokenizerError("this model has no chat template; use --raw")
        if self._template is None:
            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            env.globals["raise_exception"] = _raise_template_error
            self._template = env.from_string(self.chat_template)
        as_dicts = [m if isinstance(m, dict) else {"role": m.role, "content": m.content} for m in messages]
        pieces, length = [], 0
        try:
            for piece in self._template.generate(
                messages=as_dicts,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token or "",
                eos_token=self.eos_token or "",
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

    def encode_chat(self, messages, add_generation_prompt: bool = True) -> list[int]:
        """The rendered conversation -> ids (the template writes the BOS token itself). Only the
        template's own markers become special tokens: a user's or system text that spells one
        (`<｜Assistant｜>` typed or piped in) is encoded as the plain text it is."""
        as_dicts = [m if isinstance(m, dict) else {"role": m.role, "content": m.content} for m in messages]
        typed: dict[str, str] = {}  # placeholder -> text encoded with special tokens disabled
        for i, message in enumerate(as_dicts):
            content = message.get("content")
            if message.get("role") in TYPED_ROLES and isinstance(content, str) and self._spells_special(content):
                placeholder = f"{PLACEHOLDER_OPEN}{i}{PLACEHOLDER_CLOSE}"
                typed[placeholder] = content
                as_dicts[i] = {**message, "content": placeholder}
        text = self.render_chat(as_dicts, add_generation_prompt)
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
TYPED_ROLES = ("user", "system")  # whose text comes from a person, not from the model
PLACEHOLDER_OPEN, PLACEHOLDER_CLOSE = "\ue000", "\ue001"  # private-use characters
PLACEHOLDER = re.compile(f"({PLACEHOLDER_OPEN}\\d+{PLACEHOLDER_CLOSE})")


def _raise_template_error(message: str):
    raise TemplateError(message)


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
