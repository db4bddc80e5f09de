"""`localv3 serve`: the official `openai` client against a real server on a loopback port.

The bundled tiny model checks answers, usage, streaming, stop strings, prefix reuse and
concurrency against the engine itself and `localv3 run`; a scripted model (a real tokenizer
and chat template, logits that spell a chosen answer) checks tool calls, the reasoning split,
cancellation and the error paths a random or tiny model cannot reach on purpose.
"""

from __future__ import annotations

import http.client
import json
import shutil
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import openai
import pytest
import torch
from fixtures_cli import train_tokenizer
from tokenizers import AddedToken
from typer.testing import CliRunner

import localv3
from localv3.cli import app
from localv3.engines.base import Engine
from localv3.serve.app import AppSettings
from localv3.serve.server import BackgroundServer, ServerSettings
from localv3.serve.tools import CALL_BEGIN, CALL_END, CALLS_BEGIN, CALLS_END, SEPARATOR
from localv3.serve.turns import Served
from localv3.tokenizer import Tokenizer

QUESTIONS = [
    "What is 37 + 48?",
    "What is 91 - 17?",
    "Hello",
    "What is the capital of Japan?",
    "Count from 3 to 11.",
    "Reverse the words: red green blue",
    "What can you do?",
    "What is the larger of 12 and 71?",
]


def client(url: str, **kwargs) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=kwargs.pop("api_key", "unused"), max_retries=0, **kwargs)


def ask(url: str, question: str, **options) -> openai.types.chat.ChatCompletion:
    return client(url).chat.completions.create(model="tiny", messages=[{"role": "user", "content": question}], **options)


def streamed(stream) -> tuple[str, list]:
    """The content of a streamed chat answer and its chunks."""
    chunks = list(stream)
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices), chunks


# ----- the bundled tiny model ------------------------------------------------------------------
@pytest.fixture(scope="module")
def reference():
    """A second engine for the expected answers (the served one belongs to the server's thread)."""
    return localv3.load("tiny")


@pytest.fixture(scope="module")
def served_engine():
    return localv3.load("tiny")


@pytest.fixture(scope="module")
def tiny_url(served_engine):
    with BackgroundServer(ServerSettings(port=0, app=AppSettings("tiny")), lambda: Served.of(served_engine)) as url:
        yield url


def expected(reference, question: str, max_tokens: int | None = None, **kwargs) -> tuple[str, list[int], list[int]]:
    """(answer text, prompt ids, answer ids) of the engine's own generation (greedy unless told)."""
    prompt = reference.tokenizer.encode_chat([{"role": "user", "content": question}])
    ids = reference.generate(prompt, max_tokens or reference.max_context, **kwargs)
    return reference.tokenizer.decode(ids), prompt, ids


def connect(url: str, timeout: float = 60) -> http.client.HTTPConnection:
    parts = urlsplit(url)
    return http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)


def call(url: str, method: str, path: str, body: bytes | dict | None = None, **headers) -> tuple[int, dict]:
    """A raw request (bodies no client library would send) -> (status, the JSON answer)."""
    connection = connect(url)
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    connection.request(method, path, body=data, headers=headers)
    response = connection.getresponse()
    status, answer = response.status, response.read()
    connection.close()
    return status, json.loads(answer)


def metrics(url: str) -> dict:
    return call(url, "GET", "/metrics")[1]


def test_models_lists_the_served_name(tiny_url):
    assert [m.id for m in client(tiny_url).models.list()] == ["tiny"]
    assert client(tiny_url).models.retrieve("tiny").id == "tiny"


def test_greedy_chat_answer_equals_localv3_run(tiny_url):
    result = CliRunner().invoke(app, ["run", "tiny", QUESTIONS[0], "--json"])
    *pieces, final = [json.loads(line) for line in result.stdout.splitlines()]
    answer = ask(tiny_url, QUESTIONS[0])
    assert answer.choices[0].message.content == "".join(p["text"] for p in pieces) == "85"
    assert answer.usage.prompt_tokens == final["prompt_tokens"]
    assert answer.usage.completion_tokens == final["completion_tokens"]
    assert answer.choices[0].finish_reason == "stop"


@pytest.mark.parametrize("question", QUESTIONS[1:5])
def test_chat_answers_and_usage_equal_the_engine(tiny_url, reference, question):
    text, prompt, ids = expected(reference, question)
    whole = ask(tiny_url, question)
    content, chunks = streamed(ask(tiny_url, question, stream=True, stream_options={"include_usage": True}))
    assert whole.choices[0].message.content == content == text
    assert whole.usage.prompt_tokens == chunks[-1].usage.prompt_tokens == len(prompt)
    assert whole.usage.completion_tokens == chunks[-1].usage.completion_tokens == len(ids)
    assert whole.usage.total_tokens == len(prompt) + len(ids)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks[:-1]][-1] == "stop" and chunks[-1].choices == []


def test_completions_continue_raw_text_and_token_ids(tiny_url, reference):
    prompt = "Count from 1 to 20."
    prompt_ids = reference.tokenizer.encode(prompt)
    ids = reference.generate(prompt_ids, 12)
    api = client(tiny_url)
    whole = api.completions.create(model="tiny", prompt=prompt, max_tokens=12)
    pieces = list(api.completions.create(model="tiny", prompt=prompt_ids, max_tokens=12, stream=True))
    assert whole.choices[0].text == "".join(p.choices[0].text for p in pieces) == reference.tokenizer.decode(ids)
    assert whole.choices[0].finish_reason == pieces[-1].choices[0].finish_reason == "length"
    assert whole.usage.prompt_tokens == len(prompt_ids) and whole.usage.completion_tokens == 12


def test_stop_strings_cut_the_answer(tiny_url, reference):
    text, _, _ = expected(reference, "Hello")
    stop = text[10:14]  # a piece of the middle of the greedy answer
    answer = ask(tiny_url, "Hello", stop=[stop, "never appears"])
    content, _ = streamed(ask(tiny_url, "Hello", stop=stop, stream=True))
    assert answer.choices[0].message.content == content == text[: text.index(stop)]
    assert answer.choices[0].finish_reason == "stop"


def test_max_tokens_ends_with_length(tiny_url):
    for limit in ("max_tokens", "max_completion_tokens"):
        answer = ask(tiny_url, "Hello", **{limit: 3})
        assert answer.usage.completion_tokens == 3 and answer.choices[0].finish_reason == "length"


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_seed_makes_sampling_repeatable(tiny_url, reference, seed):
    options = dict(temperature=1.5, top_p=1.0, seed=seed, max_tokens=12)
    first, again = ask(tiny_url, "Hello", **options), ask(tiny_url, "Hello", **options)
    assert first.choices[0].message.content == again.choices[0].message.content
    assert first.choices[0].message.content == expected(reference, "Hello", 12, temperature=1.5, seed=seed)[0]


def test_a_continued_conversation_prefills_only_its_new_tokens(tiny_url, served_engine, reference, monkeypatch):
    prefilled = []
    session_class = type(served_engine.new_session(2))
    original = session_class.prefill
    monkeypatch.setattr(session_class, "prefill", lambda self, ids: prefilled.append(len(ids)) or original(self, ids))
    turns = [{"role": "user", "content": "What is 37 + 48?"}]
    first = client(tiny_url).chat.completions.create(model="tiny", messages=turns)
    turns += [{"role": "assistant", "content": first.choices[0].message.content}, {"role": "user", "content": "Hi"}]
    second = client(tiny_url).chat.completions.create(model="tiny", messages=turns)
    new_prompt = reference.tokenizer.encode_chat(turns)
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert second.usage.prompt_tokens == len(new_prompt)
    assert cached >= first.usage.prompt_tokens  # the first turn's prompt and more were not prefilled again
    assert prefilled[-1] == len(new_prompt) - cached
    fresh = reference.tokenizer.decode(reference.generate(new_prompt, reference.max_context))
    assert second.choices[0].message.content == fresh


def test_eight_concurrent_streaming_clients_get_their_own_answers(tiny_url, reference, served_engine):
    answers = {q: expected(reference, q)[0] for q in QUESTIONS}
    results: dict[tuple[int, int], str] = {}

    def run(i: int) -> None:
        for round_ in range(2):
            question = QUESTIONS[(i + round_) % len(QUESTIONS)]
            content, chunks = streamed(ask(tiny_url, question, stream=True))
            assert chunks[-1].choices[0].finish_reason == "stop"
            results[i, round_] = (question, content)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 16
    assert all(content == answers[question] for question, content in results.values())
    assert metrics(tiny_url)["waiting"] == 0
    assert len(served_engine._kept_sessions) <= served_engine.kept_sessions


@pytest.mark.parametrize(
    "body, status, param",
    [
        (b'{"model": "tiny", "messages": [', 400, None),  # malformed JSON
        (b'["not", "an", "object"]', 400, None),
        (b"[" * 100000, 400, None),  # nested past the parser's recursion limit
        ({"model": "tiny", "messages": "Hello"}, 400, "messages"),
        ({"model": "tiny", "messages": [{"role": "robot", "content": "x"}]}, 400, "messages[0].role"),
        ({"model": "tiny", "messages": [{"role": "user", "content": 7}]}, 400, "messages[0].content"),
        ({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": -5}, 400, "max_tokens"),
        ({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": "9"}, 400, "max_tokens"),
        ({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "temperature": 3}, 400, "temperature"),
        ({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "stop": [1]}, 400, "stop"),
        ({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "n": 2}, 400, "n"),
        ({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "stream": "yes"}, 400, "stream"),
        ({"model": "gpt-4", "messages": [{"role": "user", "content": "x"}]}, 404, "model"),
        ({"messages": [{"role": "user", "content": "x"}]}, 400, "model"),
    ],
)
def test_bad_requests_get_openai_errors(tiny_url, body, status, param):
    got, answer = call(tiny_url, "POST", "/v1/chat/completions", body)
    error = answer["error"]
    assert got == status and error["param"] == param and error["message"]
    assert error["type"] == "invalid_request_error"
    assert ask(tiny_url, "What is 37 + 48?").choices[0].message.content == "85"  # still serving


def test_openai_client_raises_the_matching_errors(tiny_url, served_engine):
    with pytest.raises(openai.NotFoundError):
        client(tiny_url).chat.completions.create(model="other", messages=[{"role": "user", "content": "x"}])
    long_prompt = "one two three " * served_engine.max_context
    with pytest.raises(openai.BadRequestError) as too_long:
        ask(tiny_url, long_prompt, stream=True)
    assert too_long.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError):
        client(tiny_url).completions.create(model="tiny", prompt=[served_engine.config.vocab_size + 5])


def test_oversized_bodies_unknown_paths_and_methods(tiny_url):
    status, answer = call(tiny_url, "POST", "/v1/completions", b" " * (17 << 20))
    assert status == 413 and answer["error"]["code"] == "request_too_large"
    status, answer = call(tiny_url, "GET", "/v1/nothing")
    assert status == 404 and answer["error"]["message"]
    assert call(tiny_url, "GET", "/v1/chat/completions")[0] == 405


# ----- a scripted model: tools, reasoning, cancellation, keys, loading -------------------------
EXTRA_TOKENS = [CALLS_BEGIN, CALLS_END, CALL_BEGIN, CALL_END, SEPARATOR, "<｜tool▁output▁begin｜>", "<｜tool▁output▁end｜>"]

# DeepSeek-R1's shape: tool calls in the V3 markup, tool outputs, a generation prompt that opens a thought.
TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] }}{% endif %}{% endfor %}"
    "{% for m in messages %}"
    "{% if m['role'] == 'user' %}<｜User｜>{{ m['content'] }}"
    "{% elif m['role'] == 'assistant' %}<｜Assistant｜>{% if m['content'] %}{{ m['content'] }}{% endif %}"
    "{% if m['tool_calls'] %}" + CALLS_BEGIN + "{% for c in m['tool_calls'] %}" + CALL_BEGIN
    + "{{ c['type'] }}" + SEPARATOR + "{{ c['function']['name'] }}\n```json\n{{ c['function']['arguments'] }}\n```"
    + CALL_END + "{% endfor %}" + CALLS_END + "{% endif %}<｜end▁of▁sentence｜>"
    "{% elif m['role'] == 'tool' %}<｜tool▁output▁begin｜>{{ m['content'] }}<｜tool▁output▁end｜>"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<｜Assistant｜><think>\n{% endif %}"
)


@pytest.fixture(scope="module")
def scripted_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("scripted-model")
    tokenizer = train_tokenizer()
    tokenizer.add_special_tokens([AddedToken(t, normalized=False) for t in EXTRA_TOKENS])
    tokenizer.save(str(out / "tokenizer.json"))
    config = {"bos_token": "<｜begin▁of▁sentence｜>", "eos_token": "<｜end▁of▁sentence｜>", "chat_template": TEMPLATE}
    (out / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False))
    (out / "generation_config.json").write_text('{"do_sample": false}')
    return out


class ScriptedSession:
    """Logits that spell `answer(prompt text)`, one token per step; `delay_s` per decode step."""

    def __init__(self, engine: ScriptedModel, capacity: int):
        self.engine = engine
        self.capacity = capacity
        self.token_ids: list[int] = []
        self.position = 0
        self.script: list[int] = []

    def prefill(self, ids: list[int]) -> torch.Tensor:
        self.token_ids += ids
        self.position += len(ids)
        prompt = self.engine.tokenizer.decode(self.token_ids, skip_special_tokens=False)
        self.engine.prompts.append(prompt)
        answer = self.engine.answer(prompt)
        self.script = self.engine.tokenizer.encode(answer, add_bos=False) + [self.engine.eos]
        self.step = 0
        return self.logits()

    def decode(self, token: int) -> torch.Tensor:
        self.token_ids.append(token)
        self.position += 1
        self.step += 1
        time.sleep(self.engine.delay_s)
        return self.logits()

    def rollback(self, n: int) -> None:
        self.position -= n
        del self.token_ids[self.position :]

    def logits(self) -> torch.Tensor:
        logits = torch.full((self.engine.tokenizer.vocab_size,), -1e4)
        logits[self.script[min(self.step, len(self.script) - 1)]] = 0.0
        return logits


class ScriptedModel(Engine):
    name = "scripted"

    def __init__(self, model_dir: Path, answer, delay_s: float = 0.0):
        self.path = model_dir
        self.tokenizer = Tokenizer(model_dir)
        self.max_context = 4096
        self.answer = answer
        self.delay_s = delay_s
        self.eos = self.tokenizer.eos_token_id
        self.prompts: list[str] = []

    def new_session(self, capacity: int) -> ScriptedSession:
        return ScriptedSession(self, capacity)

    def stop_token_ids(self) -> list[int]:
        return [self.eos]


def scripted_server(model: ScriptedModel, **app_settings) -> BackgroundServer:
    settings = ServerSettings(port=0, app=AppSettings("scripted", **app_settings))
    return BackgroundServer(settings, lambda: Served.of(model))


WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}
CALL_TEXT = f'{CALLS_BEGIN}{CALL_BEGIN}function{SEPARATOR}get_weather\n```json\n{{"city": "Paris"}}\n```{CALL_END}{CALLS_END}'


def weather_agent(prompt: str) -> str:
    if "<｜tool▁output▁begin｜>" in prompt:
        return "Checked the tool output.</think>It is 21 C in Paris."
    return "The user wants the weather, so I call the tool.</think>" + CALL_TEXT


@pytest.mark.parametrize("stream", [False, True])
def test_tool_call_round_trip(scripted_dir, stream):
    model = ScriptedModel(scripted_dir, weather_agent)
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    with scripted_server(model) as url:
        api = client(url)
        first = api.chat.completions.create(model="scripted", messages=messages, tools=[WEATHER_TOOL], stream=stream)
        if stream:
            chunks = list(first)
            calls = [call for c in chunks for call in (c.choices[0].delta.tool_calls or [])]
            reasoning = "".join(getattr(c.choices[0].delta, "reasoning_content", None) or "" for c in chunks)
            content = "".join(c.choices[0].delta.content or "" for c in chunks)
            finish = chunks[-1].choices[0].finish_reason
        else:
            message = first.choices[0].message
            calls, reasoning, content = message.tool_calls, message.reasoning_content, message.content or ""
            finish = first.choices[0].finish_reason
        assert finish == "tool_calls" and content == ""
        assert reasoning == "The user wants the weather, so I call the tool."
        assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == [("get_weather", {"city": "Paris"})]
        assert "get_weather" in model.prompts[0] and "The weather in a city" in model.prompts[0]
        call = {"id": calls[0].id, "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
        messages += [
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": calls[0].id, "content": "21 C, sunny"},
        ]
        second = api.chat.completions.create(model="scripted", messages=messages, tools=[WEATHER_TOOL])
    assert second.choices[0].message.content == "It is 21 C in Paris." and second.choices[0].finish_reason == "stop"
    assert CALL_BEGIN + "function" + SEPARATOR + "get_weather" in model.prompts[1]
    assert "<｜tool▁output▁begin｜>21 C, sunny<｜tool▁output▁end｜>" in model.prompts[1]


def test_a_template_that_renders_tools_gets_them_instead_of_a_system_message(scripted_dir, tmp_path):
    model_dir = Path(shutil.copytree(scripted_dir, tmp_path / "renders-tools"))
    config = json.loads((model_dir / "tokenizer_config.json").read_text())
    config["chat_template"] = "{% if tools %}<tools>{{ tools | tojson }}</tools>{% endif %}" + config["chat_template"]
    (model_dir / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False))
    model = ScriptedModel(model_dir, weather_agent)
    with scripted_server(model) as url:
        first = client(url).chat.completions.create(
            model="scripted", messages=[{"role": "user", "content": "Weather in Paris?"}], tools=[WEATHER_TOOL]
        )
    assert first.choices[0].finish_reason == "tool_calls"
    prompt = model.prompts[0]
    assert f"<tools>{json.dumps([WEATHER_TOOL], ensure_ascii=False)}</tools>" in prompt
    assert prompt.count("get_weather") == 1  # the template's own rendering, no system-message copy


@pytest.mark.parametrize("stream", [False, True])
def test_reasoning_goes_to_reasoning_content(scripted_dir, stream):
    model = ScriptedModel(scripted_dir, lambda prompt: "Two and two make four.</think>The answer is 4.")
    with scripted_server(model) as url:
        answer = client(url).chat.completions.create(
            model="scripted", messages=[{"role": "user", "content": "2+2?"}], stream=stream
        )
        if stream:
            chunks = list(answer)
            reasoning = "".join(getattr(c.choices[0].delta, "reasoning_content", None) or "" for c in chunks)
            content = "".join(c.choices[0].delta.content or "" for c in chunks)
        else:
            reasoning, content = answer.choices[0].message.reasoning_content, answer.choices[0].message.content
    assert (reasoning, content) == ("Two and two make four.", "The answer is 4.")


def test_tool_messages_need_a_template_with_tools(tiny_url):
    with pytest.raises(openai.BadRequestError, match="tool-call format"):
        ask(tiny_url, "Hello", tools=[WEATHER_TOOL])


def test_a_client_that_leaves_cancels_its_generation_queued_or_running(scripted_dir):
    model = ScriptedModel(scripted_dir, lambda prompt: "word " * 2000, delay_s=0.005)  # ~10 s to the end
    with scripted_server(model) as url:
        body = {"model": "scripted", "messages": [{"role": "user", "content": "Talk"}], "stream": True}
        running = connect(url)
        running.request("POST", "/v1/chat/completions", body=json.dumps(body))
        assert running.getresponse().readline().startswith(b"data: ")  # the generation is under way
        queued = connect(url, timeout=0.5)
        queued.request("POST", "/v1/chat/completions", body=json.dumps({**body, "stream": False}))
        with pytest.raises(TimeoutError):  # the second client gives up while its request waits
            queued.getresponse()
        queued.close()
        running.close()
        deadline = time.monotonic() + 30
        while metrics(url)["cancelled"] < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        stats = metrics(url)
        assert stats["cancelled"] == 2 and stats["requests"] == 1  # the queued one never ran
        model.answer = lambda prompt: "</think>Still here."
        answer = client(url).chat.completions.create(model="scripted", messages=[{"role": "user", "content": "?"}])
    assert answer.choices[0].message.content == "Still here."


def test_api_key_is_required_when_set(scripted_dir):
    model = ScriptedModel(scripted_dir, lambda prompt: "</think>ok")
    with scripted_server(model, api_key="s3cret") as url:
        with pytest.raises(openai.AuthenticationError):
            client(url, api_key="wrong").models.list()
        status, answer = call(url, "POST", "/v1/chat/completions", {})  # no key at all
        assert status == 401 and answer["error"]["code"] == "invalid_api_key"
        assert call(url, "GET", "/health") == (200, {"status": "ok"})
        answer = client(url, api_key="s3cret").chat.completions.create(
            model="scripted", messages=[{"role": "user", "content": "?"}]
        )
    assert answer.choices[0].message.content == "ok"


def test_requests_get_503_while_the_model_loads(scripted_dir):
    release = threading.Event()

    def slow_load():
        release.wait(30)
        return Served.of(ScriptedModel(scripted_dir, lambda prompt: "</think>ready"))

    server = BackgroundServer(ServerSettings(port=0, app=AppSettings("scripted")), slow_load, wait_for_model=False)
    with server as url:
        with pytest.raises(openai.InternalServerError) as loading:
            client(url).chat.completions.create(model="scripted", messages=[{"role": "user", "content": "?"}])
        assert loading.value.status_code == 503 and call(url, "GET", "/health")[0] == 503
        release.set()
        while call(url, "GET", "/health")[0] != 200:
            time.sleep(0.01)
        answer = client(url).chat.completions.create(model="scripted", messages=[{"role": "user", "content": "?"}])
    assert answer.choices[0].message.content == "ready"


def test_a_server_stopped_while_loading_does_not_wait_for_the_model(scripted_dir):
    release = threading.Event()
    server = BackgroundServer(
        ServerSettings(port=0, app=AppSettings("scripted")), lambda: release.wait(60), wait_for_model=False
    )
    with server:
        pass
    assert not server.thread.is_alive() and server.service.worker.thread.is_alive()  # still loading
    release.set()


# ----- the command -------------------------------------------------------------------------------
LOCALV3 = Path(sys.executable).parent / "localv3"


def test_serve_drains_its_requests_on_sigterm_and_exits_cleanly(reference):
    process = subprocess.Popen(
        [str(LOCALV3), "serve", "tiny", "--port", "0"], stderr=subprocess.PIPE, text=True, env=os.environ.copy()
    )
    try:
        url = next((line.split()[3] for line in process.stderr if line.startswith("serving tiny at ")), "")
        assert url, "the server never said it was ready"
        url = url.removesuffix("/v1")
        question, answers = "Count from 5 to 95.", []
        clients = [threading.Thread(target=lambda: answers.append(streamed(ask(url, question, stream=True))[0])) for _ in range(6)]
        for thread in clients:
            thread.start()
        while metrics(url)["requests"] + metrics(url)["waiting"] < len(clients):  # all six are in
            time.sleep(0.01)
        process.send_signal(signal.SIGTERM)  # while most of them still wait for the model
        for thread in clients:
            thread.join()
        assert answers == [expected(reference, question)[0]] * len(clients)
        assert process.wait(30) == 0
        assert process.stderr.read().strip().endswith("stopped")
    finally:
        process.kill()
        process.wait()


def test_serve_refuses_an_unknown_model_and_a_busy_port(capsys):
    unknown = CliRunner().invoke(app, ["serve", "no-such-model", "--port", "0"])
    assert unknown.exit_code != 0 and "unknown model" in str(unknown.exception)
    from localv3.serve.server import bind

    taken = bind("127.0.0.1", 0)
    try:
        with pytest.raises(localv3.LocalV3Error, match="cannot listen on 127.0.0.1"):
            bind("127.0.0.1", taken.getsockname()[1])
    finally:
        taken.close()


# ----- the pieces, without a server ------------------------------------------------------------------
def test_tool_calls_parse_in_both_deepseek_layouts():
    from localv3.serve.tools import ToolCallFormat

    v3 = f'{CALLS_BEGIN}{CALL_BEGIN}function{SEPARATOR}a\n```json\n{{"x": 1}}\n```{CALL_END}'
    v31 = f'{CALL_BEGIN}b{SEPARATOR}{{"y": [2]}}{CALL_END}{CALLS_END}'
    calls = ToolCallFormat(begin_id=0, typed=True).parse(v3 + v31)
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in calls] == [("a", '{"x": 1}'), ("b", '{"y": [2]}')]
    assert len({c["id"] for c in calls}) == 2 and all(c["type"] == "function" for c in calls)
    assert ToolCallFormat(begin_id=0, typed=False).parse(f"{CALLS_BEGIN}{CALL_BEGIN}unfinished") == []


def test_answer_splitter_keeps_text_before_a_tool_section_and_returns_a_broken_one_as_content(scripted_dir):
    from localv3.generate import GenerationChunk
    from localv3.serve.answer import AnswerSplitter
    from localv3.serve.tools import tool_call_format

    tokenizer = Tokenizer(scripted_dir)
    tools = tool_call_format(tokenizer.chat_template, tokenizer.token_to_id(CALLS_BEGIN))
    begin, hello = tools.begin_id, tokenizer.encode("Hello", add_bos=False)
    splitter = AnswerSplitter(tokenizer, thinking=False, tools=tools)
    first = splitter.feed(GenerationChunk([*hello, begin], "Hello"))  # two tokens in one step, as MTP gives
    rest = splitter.feed(GenerationChunk(tokenizer.encode("not a call", add_bos=False), "not a call"))
    tail, calls = splitter.finish()
    assert (first.content, rest.content, calls) == ("Hello", "", [])
    assert tail.content == CALLS_BEGIN + "not a call"


def test_request_parsing_normalises_messages_and_refuses_what_it_cannot_honour():
    from localv3.serve.errors import ApiError
    from localv3.serve.requests import parse_chat_request

    parts = [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]
    request = parse_chat_request(
        {"model": "m", "messages": [{"role": "developer", "content": "be brief"}, {"role": "user", "content": parts}]}, "m"
    )
    assert request.messages == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "a\nb"}]
    user = [{"role": "user", "content": "x"}]
    for extra, param in [
        ({"tool_choice": "required", "tools": [WEATHER_TOOL]}, "tool_choice"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"frequency_penalty": 0.5}, "frequency_penalty"),
        ({"logprobs": True}, "logprobs"),
    ]:
        with pytest.raises(ApiError) as refused:
            parse_chat_request({"model": "m", "messages": user, **extra}, "m")
        assert refused.value.status == 400 and refused.value.param == param
    assert parse_chat_request({"model": "m", "messages": user, "tools": [WEATHER_TOOL], "tool_choice": "none"}, "m").tools == []


def test_kept_conversations_fit_the_memory_the_plan_left(served_engine):
    from types import SimpleNamespace

    from localv3.serve.sessions import sessions_that_fit

    assert sessions_that_fit(served_engine, 4) == 4  # tiny's cache is small beside this machine's RAM
    size = 1 << 30
    plan = SimpleNamespace(
        kv_cache=SimpleNamespace(device_bytes={"gpu": size}),
        device=lambda name: SimpleNamespace(free_bytes=int(2.5 * size)),
    )
    assert sessions_that_fit(SimpleNamespace(plan=plan), 4) == 3
    plan.device = lambda name: SimpleNamespace(free_bytes=-5)  # a plan already over its budget
    assert sessions_that_fit(SimpleNamespace(plan=plan), 4) == 1
    assert sessions_that_fit(SimpleNamespace(), 4) == 1
