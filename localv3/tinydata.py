"""The task generator behind the bundled tiny chat model: questions, answers, a held-out split.

Tasks: two-number addition and subtraction, comparisons, counting, word-order reversal
(all generated from operands, so unseen combinations test generalisation), a small fixed
table of facts and greetings and single words spelled backwards (both always trained on;
asked only as "seen" questions).

The held-out split is by construction: a question's operands (not its phrasing) hash to
the held-out bucket or not, so no phrasing of a held-out problem is ever trained on.
Training rows and the multi-turn evaluation are conversations of several such turns.

It ships in the package (no command imports it) because three entry points share it: the
training and evaluation scripts and the tests of the bundled model, with benchmarks/serve_load.py
asking its held-out questions.
"""

from __future__ import annotations

import random
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

HELD_OUT_BUCKETS = 10  # one operand set in ten is held out

WORDS = (
    "apple", "river", "green", "house", "music", "cloud", "stone", "light", "table", "water",
    "bird", "train", "paper", "sun", "moon", "tree", "fish", "road", "book", "door",
    "red", "blue", "cat", "dog", "rain", "snow", "fire", "star", "sea", "hill",
)  # fmt: skip

FACTS = (
    ("What is the capital of France?", "Paris"),
    ("What is the capital of Germany?", "Berlin"),
    ("What is the capital of Italy?", "Rome"),
    ("What is the capital of Spain?", "Madrid"),
    ("What is the capital of Japan?", "Tokyo"),
    ("What is the capital of China?", "Beijing"),
    ("What is the capital of Egypt?", "Cairo"),
    ("What is the capital of Canada?", "Ottawa"),
    ("What is the capital of Kenya?", "Nairobi"),
    ("What is the capital of Peru?", "Lima"),
    ("What color is the sky?", "Blue"),
    ("What color is grass?", "Green"),
    ("What color is snow?", "White"),
    ("How many days are in a week?", "7"),
    ("How many months are in a year?", "12"),
    ("How many legs does a spider have?", "8"),
    ("How many hours are in a day?", "24"),
    ("What is the largest planet?", "Jupiter"),
    ("What is the closest star to Earth?", "The Sun"),
    ("What do bees make?", "Honey"),
    ("Hello", "Hello! I am a tiny localv3 model. Ask me about numbers, words or facts."),
    ("Hi", "Hi! I am a tiny localv3 model. Ask me about numbers, words or facts."),
    ("Who are you?", "I am a tiny DeepSeek-V3-style model bundled with localv3."),
    ("What can you do?", "I can add, subtract, compare and count numbers, reverse words and answer a few facts."),
)

PHRASINGS = {
    "add": ("What is {a} + {b}?", "What is {a} plus {b}?", "{a} + {b} = ?", "Calculate {a} + {b}."),
    "sub": ("What is {a} - {b}?", "What is {a} minus {b}?", "{a} - {b} = ?", "Calculate {a} - {b}."),
    "max": ("Which is larger, {a} or {b}?", "Which number is bigger, {a} or {b}?"),
    "min": ("Which is smaller, {a} or {b}?", "Which number is smaller, {a} or {b}?"),
    "count": (
        "Count from {a} to {b}.",
        "Count up from {a} to {b}.",
        "Count from {a} up to {b}.",
        "Please count from {a} to {b}.",
        "List the numbers from {a} to {b}.",
        "Write the numbers from {a} to {b}.",
        "Count {a} to {b}.",
    ),
    "reverse": (
        "Reverse the words: {words}",
        "Reverse the order of the words: {words}",
        "Reverse these words: {words}",
        "Reverse the words {words}.",
        "Reverse: {words}",
        "Put these words in reverse order: {words}",
        "Say these words backwards: {words}",
        "Reverse the word order of: {words}",
    ),
}
GENERATED_TASKS = tuple(PHRASINGS)


@dataclass(frozen=True)
class Example:
    task: str
    key: str  # the operands: decides the held-out split
    question: str
    answer: str


def is_held_out(key: str) -> bool:
    return zlib.crc32(key.encode()) % HELD_OUT_BUCKETS == 0


def _operands(task: str, rng: random.Random) -> tuple[str, dict, str]:
    """-> (key, template fields, answer) for one random problem of `task`."""
    if task == "reverse":
        words = [rng.choice(WORDS) for _ in range(rng.randint(2, 5))]
        return f"reverse:{' '.join(words)}", {"words": " ".join(words)}, " ".join(reversed(words))
    if task == "count":
        a = rng.randint(0, 99)
        b = a + rng.randint(2, 9)
        return f"count:{a}:{b}", {"a": a, "b": b}, ", ".join(str(n) for n in range(a, b + 1))
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    if task == "sub":
        a, b = max(a, b), min(a, b)  # results stay non-negative
        answer = a - b
    elif task == "add":
        answer = a + b
    else:
        while a == b:
            b = rng.randint(0, 99)
        answer = max(a, b) if task == "max" else min(a, b)
    return f"{task}:{a}:{b}", {"a": a, "b": b}, str(answer)


def sample_example(rng: random.Random, task: str, held_out: bool) -> Example:
    """A random problem of `task` from the training split (held_out False) or the held-out one."""
    while True:
        key, fields, answer = _operands(task, rng)
        if is_held_out(key) == held_out:
            question = rng.choice(PHRASINGS[task]).format(**fields)
            return Example(task, key, question, answer)


def fact_examples() -> list[Example]:
    return [Example("fact", q, q, a) for q, a in FACTS]


SPELL_PHRASINGS = ("Reverse the word {word}.", "Spell {word} backwards.", "Reverse the letters of {word}.")


def spelling_examples() -> list[Example]:
    """Each of WORDS spelled backwards ("Reverse the word cat." -> "tac"): a fixed table, like the facts."""
    return [Example("spell", w, p.format(word=w), w[::-1]) for w in WORDS for p in SPELL_PHRASINGS]


def seen_examples() -> list[Example]:
    """Everything asked only as a seen question: the facts and the backwards spellings."""
    return fact_examples() + spelling_examples()


# how often each task is drawn for training (tuned on held-out accuracy per task; counting must learn where to stop)
TRAIN_MIX = {"add": 4, "sub": 4, "max": 2, "min": 2, "count": 5, "reverse": 4, "fact": 1, "spell": 3}


def training_turns(seed: int) -> Iterator[Example]:
    """An endless stream of question/answer turns from the training split."""
    rng = random.Random(seed)
    tasks, weights = zip(*TRAIN_MIX.items())
    tables = {"fact": fact_examples(), "spell": spelling_examples()}
    while True:
        task = rng.choices(tasks, weights)[0]
        yield rng.choice(tables[task]) if task in tables else sample_example(rng, task, held_out=False)


def held_out_questions(n_per_task: int, seed: int = 1234) -> list[Example]:
    """Distinct held-out problems, up to n_per_task of each generated task (none is ever trained on).

    A task with fewer held-out problems (counting has ~80) gives all of them.
    """
    rng = random.Random(seed)
    out: list[Example] = []
    for task in GENERATED_TASKS:
        seen: set[str] = set()
        misses = 0
        while len(seen) < n_per_task and misses < 50 * n_per_task:
            example = sample_example(rng, task, held_out=True)
            if example.key in seen:
                misses += 1
                continue
            seen.add(example.key)
            out.append(example)
    return out


def held_out_conversations(
    n_per_task: int, turns: int = 10, first_scored: int = 5, seed: int = 1234
) -> list[list[Example]]:
    """Conversations of `turns` held-out questions in which every held-out question of
    held_out_questions(n_per_task, seed) is asked once at a scored turn (first_scored..turns,
    counted from 1); the turns before are other held-out questions, drawn at random."""
    questions = held_out_questions(n_per_task, seed)
    rng = random.Random(seed)
    order = rng.sample(questions, len(questions))
    scored_per_conversation = turns - first_scored + 1
    conversations = []
    for first in range(0, len(order), scored_per_conversation):
        scored = order[first : first + scored_per_conversation]
        leading = rng.sample([q for q in questions if q not in scored], first_scored - 1)
        conversations.append(leading + scored)
    return conversations


def converse(engine, questions: list[str], max_new_tokens: int = 64) -> list[str]:
    """Greedy answers (stripped) to `questions` asked one after another in one conversation, as
    `localv3 chat` asks them: the model's own earlier answers stay in the transcript and the
    cache is reused (only each new turn is prefilled)."""
    messages: list[dict[str, str]] = []
    answers = []
    for question in questions:
        messages.append({"role": "user", "content": question})
        prompt = engine.tokenizer.encode_chat(messages)
        answer = engine.tokenizer.decode(engine.generate(prompt, max_new_tokens, reuse_cache=True))
        messages.append({"role": "assistant", "content": answer})
        answers.append(answer.strip())
    return answers


def corpus_texts(n: int, seed: int) -> list[str]:
    """Plain questions and answers for training the tokenizer."""
    stream = training_turns(seed)
    texts = [f"{q} {a}" for q, a in FACTS]
    while len(texts) < n:
        example = next(stream)
        texts.append(f"{example.question} {example.answer}")
    return texts
