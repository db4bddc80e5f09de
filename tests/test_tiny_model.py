"""The bundled tiny model: a complete Hugging Face directory that loads here and in transformers
(with matching logits) and answers its tasks' questions, held-out ones included, asked alone
or late in a conversation (where the cache kept between turns gives what a fresh prefill of
the transcript gives)."""

import json
from pathlib import Path

import pytest
import torch
import transformers

import localv3
from localv3.generate import stream_generate
from localv3.tinydata import converse, held_out_conversations, is_held_out

TINY_DIR = Path(localv3.__file__).parent / "assets" / "tiny"

QUESTIONS = {
    "What is 37 + 48?": "85",
    "What is 91 - 45?": "46",  # held out
    "What is 19 plus 11?": "30",  # held out
    "Which is larger, 72 or 27?": "72",
    "Count from 12 to 17.": "12, 13, 14, 15, 16, 17",
    "Count from 3 to 7.": "3, 4, 5, 6, 7",
    "Reverse the words: red blue cat": "cat blue red",
    "Reverse these words: sun moon star": "star moon sun",
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


def roll_back_to_shared_prefix(session, prompt: list[int]) -> int:
    """Keep what the session shares with `prompt`, less its last token (run again, as chat's
    reused cache does: decoding starts from its hidden state) -> tokens kept."""
    shared = 0
    for ours, theirs in zip(session.token_ids, prompt):
        if ours != theirs:
            break
        shared += 1
    keep = max(shared - 1, 0)
    session.rollback(session.position - keep)
    return keep


@pytest.mark.parametrize("speculative", [False, True])
def test_reused_cache_gives_the_fresh_prefill_logits_and_answers_at_every_turn(engine, speculative):
    """Two 10-turn conversations in one session: each turn run on the cache the turns before
    left gives the logits of its whole transcript prefilled from nothing (within 1e-4) and the
    same greedy answer."""
    session = engine.new_session(engine.config.max_position_embeddings)
    for conversation in held_out_conversations(4, seed=7)[:2]:
        messages: list[dict[str, str]] = []
        for turn, example in enumerate(conversation, start=1):
            messages.append({"role": "user", "content": example.question})
            prompt = engine.tokenizer.encode_chat(messages)
            kept = roll_back_to_shared_prefix(session, prompt)
            reused = session.forward(prompt[kept:])  # [new tokens, V]
            fresh = engine.logits(prompt)[kept:]  # [new tokens, V]
            assert (reused - fresh).abs().max().item() < 1e-4, f"turn {turn}"
            session.rollback(len(prompt) - kept)
            chunks = stream_generate(
                session,
                engine.tokenizer,
                prompt,
                64,
                stop_token_ids=engine.stop_token_ids(),
                steps=engine.step_strategy(speculative),
                cached_tokens=kept,
            )
            answer = [token for chunk in chunks for token in chunk.token_ids]
            assert answer == engine.generate(prompt, 64, speculative=speculative), f"turn {turn}"
            messages.append({"role": "assistant", "content": engine.tokenizer.decode(answer)})


def test_answers_held_out_questions_late_in_a_conversation(engine):
    """Every question at turns 5-10 of conversations of held-out questions (three seeds, the
    model's own earlier answers in the transcript): >= 90% exact match, as on single questions."""
    right = total = 0
    for seed in (1, 2, 3):
        for conversation in held_out_conversations(6, seed=seed):
            answers = converse(engine, [example.question for example in conversation])
            for example, answer in list(zip(conversation, answers))[4:]:
                right += answer == example.answer
                total += 1
    assert total == 108
    assert right / total >= 0.9, f"{right}/{total}"


def test_answers_the_questions_in_one_conversation(engine):
    """The single questions asked one after another, then a sum at the eighth turn."""
    questions = [*QUESTIONS, "What is 8 + 9?"]
    assert converse(engine, questions) == [*QUESTIONS.values(), "17"]


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
