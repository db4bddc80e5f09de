"""Fuzzing the bundled tiny model's files: random values for every config.json, tokenizer and
generation_config.json field the engine reads, random byte flips in the safetensors header,
truncation at random offsets.

Each corrupted copy goes through the Python API (load, chat encoding, sampling defaults, a
greedy answer) with a time limit, and a sample of them through `localv3 show` and `localv3 run`.
A case passes when it is refused with our error class in one line naming the file or the
field (exit 1, no traceback on the command line), or when it is accepted and the answer is
right: the clean model's answer, or, for a config value that changes the numbers but is valid,
the same answer as Hugging Face transformers gives on the same files. Nothing may be written
beside the model or in the working directory.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import struct
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import localv3
from localv3.config import REAL_FIELDS
from localv3.errors import LocalV3Error
from localv3.sampling import model_sampling_defaults

TINY_DIR = Path(localv3.__file__).parent / "assets" / "tiny"
QUESTION = [{"role": "user", "content": "What is 37 + 48?"}]
NEW_TOKENS = 6
CASE_TIME_LIMIT_S = 60
WILD_VALUES = (
    None, -1, 0, 1, 2, 3, 7, 3.5, 1e-9, 1e9, 2**40, float("nan"), float("inf"),
    "7", "", "yarn", [], [1], {}, {"type": "yarn"}, True, False,
)
CONFIG_FIELDS = (
    *json.loads((TINY_DIR / "config.json").read_text()),
    "rope_interleave", "rope_parameters", "quantization_config",
)
TOKENIZER_FIELDS = ("chat_template", "bos_token", "eos_token", "add_bos_token")
GENERATION_FIELDS = ("do_sample", "temperature", "top_p", "top_k")
MODEL_FILE = "model.safetensors"


@dataclass(frozen=True)
class Corruption:
    label: str
    file: str  # the file changed
    field: str | None  # the JSON field changed, if any
    apply: Callable[[Path], None]


def _set_field(file: str, field: str, value) -> Callable[[Path], None]:
    def apply(model: Path) -> None:
        path = model / file
        data = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
        data[field] = value
        path.write_text(json.dumps(data), encoding="utf-8")

    return apply


def _flip_header_bytes(seed: int) -> Callable[[Path], None]:
    def apply(model: Path) -> None:
        path = model / MODEL_FILE
        data = bytearray(path.read_bytes())
        header_length = struct.unpack("<Q", data[:8])[0]
        rng = random.Random(seed)
        for _ in range(rng.randint(1, 3)):
            position = rng.randrange(0, 8 + header_length)
            data[position] ^= rng.randrange(1, 256)
        path.write_bytes(bytes(data))

    return apply


def _truncate(seed: int) -> Callable[[Path], None]:
    def apply(model: Path) -> None:
        path = model / MODEL_FILE
        data = path.read_bytes()
        path.write_bytes(data[: random.Random(seed).randrange(0, len(data))])

    return apply


def field_cases(file: str, fields, per_field: int, rng: random.Random) -> list[Corruption]:
    """`per_field` wild values (drawn by `rng`) for each of `fields` in the JSON file `file`."""
    return [
        Corruption(f"{file} {field}={value!r}", file, field, _set_field(file, field, value))
        for field in fields
        for value in rng.sample(WILD_VALUES, per_field)
    ]


def corruptions() -> list[Corruption]:
    rng = random.Random(20261130)
    cases = field_cases("config.json", CONFIG_FIELDS, 2, rng)
    cases += field_cases("tokenizer_config.json", TOKENIZER_FIELDS, 3, rng)
    cases += field_cases("generation_config.json", GENERATION_FIELDS, 3, rng)
    cases += [Corruption(f"header flip seed {seed}", MODEL_FILE, None, _flip_header_bytes(seed)) for seed in range(20)]
    cases += [Corruption(f"truncated seed {seed}", MODEL_FILE, None, _truncate(seed)) for seed in range(4)]
    return cases


CASES = corruptions()


def command_line_sample(per_file: dict[str, int]) -> list[Corruption]:
    """A few cases of each corrupted file, spread over its cases, run as a user would."""
    sample = []
    for file, count in per_file.items():
        of_file = [case for case in CASES if case.file == file]
        sample += [of_file[(i * len(of_file)) // count + len(of_file) // (2 * count)] for i in range(count)]
    return sample


CLI_CASES = command_line_sample({"config.json": 2, "tokenizer_config.json": 1, "generation_config.json": 1, MODEL_FILE: 2})


# ----- running a case -----------------------------------------------------------------------


class CaseTimeout(Exception):
    pass


@contextlib.contextmanager
def time_limit(seconds: int) -> Iterator[None]:
    def expire(signum, frame):
        raise CaseTimeout(f"no answer within {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def files_state(directory: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(directory)): (p.stat().st_size, p.stat().st_mtime_ns) for p in directory.rglob("*")}


@dataclass(frozen=True)
class Answer:
    prompt: list[int]
    tokens: list[int]  # greedy, up to (not including) the first stop token


def greedy_answer(model: Path) -> tuple[Answer, list[int]]:
    """The API path a script takes (the model's sampling defaults are read: they are checked);
    returns the answer and the stop token ids."""
    engine = localv3.load(model, device="cpu")
    model_sampling_defaults(model)
    prompt = engine.tokenizer.encode_chat(QUESTION)
    return Answer(prompt, engine.generate(prompt, max_new_tokens=NEW_TOKENS)), engine.stop_token_ids()


def reference_answer(model: Path, stop_ids: list[int]) -> Answer:
    """The same greedy answer from Hugging Face transformers (its tokenizer renders the chat
    template too) on the same files, cut at the same stop tokens."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = as_transformers_reads_it(model)
    tokenizer = AutoTokenizer.from_pretrained(model)
    text = tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=False)
    prompt = tokenizer(text, add_special_tokens=False).input_ids
    reference = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    with torch.no_grad():
        out = reference.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None)
    tokens = out[0, len(prompt) :].tolist()
    stops = [i for i, token in enumerate(tokens) if token in stop_ids]
    return Answer(prompt, tokens[: stops[0]] if stops else tokens)


def as_transformers_reads_it(model: Path) -> Path:
    """A copy whose real-valued config fields are JSON floats: 7 and 7.0 are the same number,
    but transformers' config classes refuse an int where they declare a float."""
    copy = Path(shutil.copytree(model, model.parent / "for-transformers"))
    config = json.loads((copy / "config.json").read_text())
    for name, *_ in REAL_FIELDS:
        if isinstance(config.get(name), int) and not isinstance(config[name], bool):
            config[name] = float(config[name])
    (copy / "config.json").write_text(json.dumps(config))
    return copy


def names_the_cause(message: str, case: Corruption) -> bool:
    return case.file in message or (case.field is not None and case.field in message)


@pytest.fixture(scope="module")
def localv3_home(tmp_path_factory) -> Path:
    """One LOCALV3_HOME for all cases: the hardware probe is measured once."""
    return tmp_path_factory.mktemp("home")


@pytest.fixture(scope="module")
def clean_answer(tmp_path_factory, localv3_home) -> Answer:
    model = Path(shutil.copytree(TINY_DIR, tmp_path_factory.mktemp("clean") / "tiny"))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LOCALV3_HOME", str(localv3_home))
        return greedy_answer(model)[0]


@pytest.fixture
def corrupted(tmp_path, request, monkeypatch, localv3_home) -> tuple[Path, Corruption]:
    case: Corruption = request.param
    model = Path(shutil.copytree(TINY_DIR, tmp_path / "tiny"))
    case.apply(model)
    monkeypatch.setenv("LOCALV3_HOME", str(localv3_home))
    workdir = tmp_path / "api-cwd"
    workdir.mkdir()
    monkeypatch.chdir(workdir)
    return model, case


@pytest.mark.parametrize("corrupted", CASES, ids=[c.label for c in CASES], indirect=True)
def test_a_corrupted_model_is_refused_in_one_line_or_answers_right(corrupted, clean_answer):
    model, case = corrupted
    before = files_state(model)
    try:
        with time_limit(CASE_TIME_LIMIT_S):
            answer, stop_ids = greedy_answer(model)
    except LocalV3Error as error:
        message = str(error)
        assert "\n" not in message, f"{case.label}: {message!r}"
        assert names_the_cause(message, case), f"{case.label}: {message!r} names neither {case.file} nor {case.field}"
    else:
        if answer != clean_answer:  # a valid value that changes the prompt or the numbers: transformers must agree
            with time_limit(CASE_TIME_LIMIT_S):
                reference = reference_answer(model, stop_ids)
            assert answer == reference, f"{case.label}: accepted, answered {answer}, transformers {reference}"
    assert files_state(model) == before, f"{case.label}: the model directory changed"
    assert not any(Path.cwd().iterdir()), f"{case.label}: wrote into the working directory"


# ----- through the command line ---------------------------------------------------------------

ENTRY_POINT = [sys.executable, "-c", "import cli; cli.main()"]
REPO = Path(__file__).resolve().parents[1]


def run_cli(args: list[str], tmp_path: Path, localv3_home: Path) -> subprocess.CompletedProcess:
    workdir, user_home = tmp_path / "cwd", tmp_path / "user-home"
    workdir.mkdir(exist_ok=True)
    user_home.mkdir(exist_ok=True)
    env = {
        **os.environ,
        "LOCALV3_HOME": str(localv3_home),
        "HOME": str(user_home),
        "PYTHONPATH": str(REPO),
        "OMP_NUM_THREADS": "1",
    }
    done = subprocess.run(ENTRY_POINT + args, capture_output=True, text=True, env=env, cwd=workdir, timeout=CASE_TIME_LIMIT_S * 2)
    for untouched in (workdir, user_home):
        assert not any(untouched.iterdir()), f"{args}: wrote {list(untouched.iterdir())} outside LOCALV3_HOME"
    return done


@pytest.mark.slow
@pytest.mark.parametrize("corrupted", CLI_CASES, ids=[c.label for c in CLI_CASES], indirect=True)
def test_show_and_run_on_a_corrupted_model_exit_cleanly(corrupted, tmp_path, localv3_home):
    model, case = corrupted
    before = files_state(model)
    try:
        expected = ("ok", localv3.load(model, device="cpu").tokenizer.decode(greedy_answer(model)[0].tokens))
    except LocalV3Error:
        expected = ("error", None)
    for args in (["show", str(model)], ["run", str(model), QUESTION[0]["content"], "--temp", "0", "-n", str(NEW_TOKENS)]):
        done = run_cli(args, tmp_path, localv3_home)
        assert "Traceback" not in done.stderr, f"{case.label} {args[0]}: {done.stderr}"
        if done.returncode != 0:
            lines = done.stderr.strip().splitlines()
            assert done.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: "), f"{case.label}: {done.stderr!r}"
            assert names_the_cause(lines[0], case), f"{case.label}: {lines[0]!r}"
            if args[0] == "run":
                assert expected[0] == "error", f"{case.label}: the API answers, run refuses: {lines[0]}"
        elif args[0] == "run":
            assert expected == ("ok", done.stdout.strip()), f"{case.label}: run printed {done.stdout!r}, the API {expected}"
    assert files_state(model) == before
