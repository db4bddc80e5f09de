"""A tiny chat model for the CLI tests: random DeepSeek-V3 weights, a byte-level BPE tokenizer
trained on a few sentences, and a DeepSeek-V3/R1-style chat template.

The output head is zeroed for every token that is not printable ASCII (specials, control
bytes, the end-of-sentence token): greedy answers are readable text that never stops early,
so a test can count on a long answer to interrupt.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from safetensors.torch import load_file, save_file
from tokenizers import AddedToken, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as BPETokenizer

from localv3.config import ModelConfig
from localv3.engines.base import Engine
from localv3.generate import GenerationChunk, GenerationStats
from localv3.synthetic import TINY_V3, write_checkpoint
from localv3.tokenizer import Tokenizer

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"

# The DeepSeek-V3 template's shape; assistant turns drop their thinking as R1's template does.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}{% if message['role'] == 'system' %}{{ message['content'] }}{% endif %}{% endfor %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}" + USER + "{{ message['content'] }}"
    "{% elif message['role'] == 'assistant' %}{% set content = message['content'] %}"
    "{% if '</think>' in content %}{% set content = content.split('</think>')[-1] %}{% endif %}"
    + ASSISTANT
    + "{{ content }}"
    + EOS
    + "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}" + ASSISTANT + "{% endif %}"
)

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Mixture of experts models route each token to a few experts.",
    "The GPU holds attention and the CPU holds the routed experts.",
    "Hello! How can I help you today? Tell me about the weather.",
    "Decoding reads the active weights once for every new token.",
]


def train_tokenizer() -> BPETokenizer:
    tokenizer = BPETokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=[BOS, EOS, USER, ASSISTANT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS, trainer)
    tokenizer.add_tokens([AddedToken("<think>", normalized=False), AddedToken("</think>", normalized=False)])
    return tokenizer


def _readable(text: str) -> bool:
    return bool(text) and all(" " <= ch <= "~" for ch in text) and "<" not in text


def write_chat_model(out_dir: Path, seed: int = 0) -> Path:
    tokenizer = train_tokenizer()
    vocab_size = tokenizer.get_vocab_size()
    config = dict(
        TINY_V3, vocab_size=vocab_size, bos_token_id=tokenizer.token_to_id(BOS), eos_token_id=tokenizer.token_to_id(EOS)
    )
    write_checkpoint(out_dir, config, seed=seed)
    weights_path = out_dir / "model.safetensors"
    tensors = load_file(str(weights_path))
    unreadable = [i for i in range(vocab_size) if not _readable(tokenizer.decode([i], skip_special_tokens=False))]
    for name in ("lm_head.weight", f"model.layers.{config['num_hidden_layers']}.shared_head.head.weight"):
        tensors[name][unreadable] = 0
    save_file(tensors, str(weights_path), metadata={"format": "pt"})
    tokenizer.save(str(out_dir / "tokenizer.json"))
    tokenizer_config = {
        "bos_token": {"content": BOS},
        "eos_token": {"content": EOS},
        "add_bos_token": True,
        "chat_template": CHAT_TEMPLATE,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, ensure_ascii=False, indent=2))
    return out_dir


class ScriptedEngine(Engine):
    """An engine that streams given text pieces: for the chat/run/bench paths a random model
    cannot reach on purpose (thinking, a full context, MTP statistics, an interrupt mid-answer).
    It records every prompt and the settings it was called with."""

    name = "scripted"
    placement = "scripted"

    def __init__(
        self,
        model_dir: Path,
        pieces: list[str],
        finish_reason="stop",
        speculation=None,
        interrupt_after=None,
        plain_decode_s=0.1,
    ):
        self.path = Path(model_dir)
        self.config = ModelConfig.from_file(model_dir)
        self.tokenizer = Tokenizer(model_dir)
        self.max_context = 4096
        self.pieces = pieces
        self.finish_reason = finish_reason
        self.speculation = speculation
        self.interrupt_after = interrupt_after
        self.plain_decode_s = plain_decode_s  # decode time when asked not to speculate
        self.prompts: list[list[int]] = []
        self.calls: list[dict] = []

    def stream_generate(self, token_ids: list[int], max_new_tokens: int = 256, **settings) -> Iterator[GenerationChunk]:
        self.prompts.append(list(token_ids))
        self.calls.append(dict(settings, max_new_tokens=max_new_tokens))
        for i, piece in enumerate(self.pieces):
            if i == self.interrupt_after:
                raise KeyboardInterrupt
            yield GenerationChunk([i + 10], piece)
        plain = settings.get("speculative") is False
        stats = GenerationStats(
            prompt_tokens=len(token_ids),
            completion_tokens=len(self.pieces),
            prompt_s=0.01,
            decode_s=self.plain_decode_s if plain else 0.1,
            ttft_s=0.02,
            finish_reason=self.finish_reason,
            speculation=None if plain else self.speculation,
        )
        yield GenerationChunk(stats=stats)

    def prompt_text(self, call: int = -1) -> str:
        return self.tokenizer.decode(self.prompts[call], skip_special_tokens=False)


def scripted_loader(monkeypatch, model_dir: Path, pieces: list[str], **script) -> ScriptedEngine:
    """Make every command open this ScriptedEngine instead of loading the model."""
    engine = ScriptedEngine(model_dir, pieces, **script)
    monkeypatch.setattr("localv3.engine_choice.open_engine", lambda *args, **kwargs: engine)
    return engine
