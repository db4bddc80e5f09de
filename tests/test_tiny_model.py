"""The bundled tiny model: a complete Hugging Face directory that loads here and in transformers
(with matching logits) and answers its tasks' questions, held-out ones included."""

import json
from pathlib import Path

import pytest
import torch
import transformers

import localv3
from localv3.tinydata import is_held_out

TINY_DIR = Path(localv3.__file__).parent / "assets" / "tiny"

QUESTIONS = {
    "What is 37 + 48?": "85",
    "What is 91 - 45?": "46",  # held out
    "What is 19 plus 11?": "30",  # held out
    "Which is larger, 72 or 27?": "72",
    "Count from 12 to 17.": "12, 13, 14, 15, 16, 17",
    "Reverse the words: red blue cat": "cat blue red",
    "What is the capital of France?": "Paris",
}


@pytest.fixture(scope="module")
def engine():
    return localv3.load(TINY_DIR, device="cpu", dtype=torch.float32)


def ask(engine, question: str, **kwargs) -> str:
    prompt = engine.tokenizer.encode_chat([{"role": "user", "content": question}])
    return engine.tokenizer.decode(engine.generate(prompt, 48, **kwargs)).strip()


def test_directory_is_complete_and_small():
    names = {p.name for p in TINY_DIR.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json"} <= names
    assert sum(p.stat().st_size for p in TINY_DIR.iterdir()) < 20e6
    config = json.loads((TINY_DIR / "config.json").read_text())
    assert config["model_type"] == "deepseek_v3" and config["num_nextn_predict_layers"] == 1
    tokenizer_config = json.loads((TINY_DIR / "tokenizer_config.json").read_text())
    assert tokenizer_config["bos_token"] == "<｜begin▁of▁sentence｜>"
    assert "<｜Assistant｜>" in tokenizer_config["chat_template"]


def test_the_held_out_questions_here_are_held_out():
    assert is_held_out("sub:91:45") and is_held_out("add:19:11")


def test_answers_questions(engine):
    for question, expected in QUESTIONS.items():
        assert ask(engine, question) == expected, question


def test_answers_with_and_without_mtp_agree(engine):
    assert engine.model.mtp, "the tiny model ships an MTP layer"
    for question in ("Count from 63 to 70.", "Reverse the words: moon sea dog star"):
        assert ask(engine, question, speculative=True) == ask(engine, question, speculative=False)


def test_logits_match_transformers(engine):
    theirs = transformers.AutoModelForCausalLM.from_pretrained(TINY_DIR, dtype=torch.float32).eval()
    ids = engine.tokenizer.encode_chat(
        [
            {"role": "user", "content": "What is 12 + 30?"},
            {"role": "assistant", "content": "42"},
            {"role": "user", "content": "Count from 3 to 8."},
        ]
    )
    with torch.no_grad():
        expected = theirs(torch.tensor([ids])).logits[0].float()
    assert (engine.logits(ids) - expected).abs().max().item() < 1e-4


def test_tokenizer_loads_in_transformers(engine):
    theirs = transformers.AutoTokenizer.from_pretrained(TINY_DIR)
    messages = [{"role": "user", "content": "What is 37 + 48?"}]
    assert theirs.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) == engine.tokenizer.render_chat(messages)
    assert theirs.encode("What is 37 + 48?", add_special_tokens=False) == engine.tokenizer.encode("What is 37 + 48?")
