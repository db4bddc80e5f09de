"""`localv3 serve` under load: requests/s, tokens/s and time to first token for 1, 4 and 8
concurrent streaming clients, and the HTTP layer's cost against in-process stream_generate.

    python benchmarks/serve_load.py [--model tiny] [--clients 1 4 8] [--seconds 10] [--soak 30]
                                    [--questions 4] [--rounds 2] [--json out.json]

The server runs as `localv3 serve` in its own process; clients are threads here asking
held-out chat questions of the tiny model's tasks one after another (greedy, streamed, usage
included), through a plain http.client reader of the event stream (the `openai` client's own
parsing costs the client ~2 ms per chunk on this machine, which would be charged to the server).
Every answer is compared with the one first seen for the same question. The last level is
held for `--soak` seconds, the server's resident memory read from /metrics before and after.

HTTP overhead: each question answered in turn by `engine.stream_generate` in this process (the
engine loaded as the server loads it, the same prefix-reusing sessions), over HTTP, and through the `openai` client, rotating, so that
load changes on a shared machine hit all three alike; overhead = 1 - HTTP tok/s / in-process tok/s.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import openai
import psutil

from localv3.engine_choice import open_engine
from localv3.tinydata import held_out_questions

LOCALV3 = Path(sys.executable).parent / "localv3"


@dataclass
class Level:
    clients: int
    seconds: float = 0.0
    requests: int = 0
    tokens: int = 0
    ttft_s: list = field(default_factory=list)
    mismatches: int = 0
    errors: int = 0
    rss_before: int = 0
    rss_after: int = 0

    def row(self) -> dict:
        return {
            "clients": self.clients,
            "seconds": self.seconds,
            "requests": self.requests,
            "requests_s": self.requests / self.seconds,
            "tok_s": self.tokens / self.seconds,
            "ttft_p50_ms": 1e3 * statistics.median(self.ttft_s),
            "ttft_p90_ms": 1e3 * statistics.quantiles(self.ttft_s, n=10)[-1] if len(self.ttft_s) > 1 else 0.0,
            "mismatches": self.mismatches,
            "errors": self.errors,
            "rss_before_mib": self.rss_before / 2**20,
            "rss_after_mib": self.rss_after / 2**20,
        }


def start_server(model: str) -> tuple[subprocess.Popen, str]:
    """`localv3 serve MODEL` on a free port -> (the process, its URL) once the model is loaded."""
    process = subprocess.Popen([str(LOCALV3), "serve", model, "--port", "0"], stderr=subprocess.PIPE, text=True)
    for line in process.stderr:
        if line.startswith("serving "):
            return process, line.split()[3].removesuffix("/v1")
    raise SystemExit(f"the server did not start: {process.wait()}")


def server_rss(url: str) -> int:
    with urllib.request.urlopen(f"{url}/metrics") as response:
        return json.load(response)["rss_bytes"]


def connect(url: str) -> http.client.HTTPConnection:
    """A keep-alive connection, as a client library keeps one."""
    parts = urlsplit(url)
    return http.client.HTTPConnection(parts.hostname, parts.port, timeout=300)


def ask(connection: http.client.HTTPConnection, model: str, question: str) -> tuple[str, int, float]:
    """One streamed answer -> (text, completion tokens, seconds to the first piece)."""
    body = {"model": model, "messages": [{"role": "user", "content": question}], "stream": True,
            "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    connection.request("POST", "/v1/chat/completions", body=json.dumps(body), headers={"content-type": "application/json"})
    response = connection.getresponse()
    if response.status != 200:
        raise ConnectionError(f"HTTP {response.status}: {response.read()[:200]!r}")
    first, text, tokens = None, [], 0
    for line in response:
        if not line.startswith(b"data: {"):
            continue
        chunk = json.loads(line[6:])
        if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
            first = first or time.perf_counter()
            text.append(chunk["choices"][0]["delta"]["content"])
        if chunk.get("usage"):
            tokens = chunk["usage"]["completion_tokens"]
    return "".join(text), tokens, (first or time.perf_counter()) - start


def ask_openai(api: openai.OpenAI, model: str, question: str) -> int:
    """One streamed answer through the official client -> its completion tokens."""
    tokens = 0
    messages = [{"role": "user", "content": question}]
    for chunk in api.chat.completions.create(
        model=model, messages=messages, stream=True, stream_options={"include_usage": True}
    ):
        tokens = chunk.usage.completion_tokens if chunk.usage else tokens
    return tokens


def run_level(url: str, model: str, clients: int, seconds: float, questions: list[str], answers: dict) -> Level:
    level = Level(clients)
    lock = threading.Lock()
    stop_at = time.perf_counter() + seconds

    def client(index: int) -> None:
        i, connection = index, connect(url)
        while time.perf_counter() < stop_at:
            question = questions[i % len(questions)]
            i += clients
            try:
                text, tokens, ttft = ask(connection, model, question)
            except (OSError, ConnectionError, http.client.HTTPException):
                with lock:
                    level.errors += 1
                connection.close()
                connection = connect(url)
                continue
            with lock:
                level.requests += 1
                level.tokens += tokens
                level.ttft_s.append(ttft)
                expected = answers.setdefault(question, text)  # the first answer seen is the reference
                level.mismatches += text != expected

    level.rss_before = server_rss(url)
    started = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    level.seconds = time.perf_counter() - started
    level.rss_after = server_rss(url)
    return level


def overhead(url: str, server: psutil.Process, model: str, questions: list[str], rounds: int) -> dict:
    """tok/s of in-process stream_generate, HTTP and the openai client on the same questions,
    interleaved; and the CPU seconds per token each way (this process's, plus the server's for
    HTTP), which the other loads of a shared machine do not change."""
    engine = open_engine(model)  # as `localv3 serve` (and run, chat) load it: routing statistics recorded
    engine.kept_sessions = 4  # as the server keeps them
    api = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    connection = connect(url)

    def in_process(question: str) -> int:
        ids = engine.tokenizer.encode_chat([{"role": "user", "content": question}])
        return sum(len(c.token_ids) for c in engine.stream_generate(ids, max_new_tokens=engine.max_context, reuse_cache=True))

    ways = {
        "in_process": in_process,
        "http": lambda question: ask(connection, model, question)[1],
        "openai_client": lambda question: ask_openai(api, model, question),
    }
    totals = {name: [0, 0.0, 0.0, 0.0] for name in ways}  # tokens, seconds, our CPU s, the server's CPU s
    order = list(ways)
    for _ in range(rounds):
        for question in questions:
            order = order[1:] + order[:1]
            for name in order:
                start, cpu, server_cpu = time.perf_counter(), time.process_time(), sum(server.cpu_times()[:2])
                totals[name][0] += ways[name](question)
                totals[name][1] += time.perf_counter() - start
                totals[name][2] += time.process_time() - cpu
                totals[name][3] += sum(server.cpu_times()[:2]) - server_cpu
    tok_s = {name: tokens / seconds for name, (tokens, seconds, _, _) in totals.items()}
    cpu_ms = {name: 1e3 * (ours + theirs) / tokens for name, (tokens, _, ours, theirs) in totals.items()}
    server_cpu_ms = 1e3 * totals["http"][3] / totals["http"][0]
    return {
        "tok_s": tok_s,
        "tokens": totals["in_process"][0],
        "cpu_ms_per_token": cpu_ms,
        "server_cpu_ms_per_token": server_cpu_ms,
        "http_overhead": 1 - tok_s["http"] / tok_s["in_process"],
        "openai_client_overhead": 1 - tok_s["openai_client"] / tok_s["in_process"],
        "server_cpu_overhead": server_cpu_ms / cpu_ms["in_process"] - 1,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--seconds", type=float, default=10.0, help="per level")
    parser.add_argument("--soak", type=float, default=30.0, help="seconds of the last level")
    parser.add_argument("--questions", type=int, default=4, help="held-out questions per task")
    parser.add_argument("--rounds", type=int, default=2, help="passes over the questions for the overhead")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    questions = [example.question for example in held_out_questions(args.questions)]
    process, url = start_server(args.model)
    try:
        cost = overhead(url, psutil.Process(process.pid), args.model, questions, args.rounds)
        answers: dict[str, str] = {}
        levels = []
        for i, clients in enumerate(args.clients):
            seconds = args.soak if i == len(args.clients) - 1 else args.seconds
            levels.append(run_level(url, args.model, clients, seconds, questions, answers).row())
    finally:
        process.terminate()
        process.wait()

    print(
        f"{'clients':>7} {'seconds':>7} {'requests':>8} {'req/s':>7} {'tok/s':>7} {'TTFT p50':>9} {'TTFT p90':>9}"
        f" {'mismatch':>8} {'errors':>6}  server RSS MiB before/after"
    )
    for r in levels:
        print(
            f"{r['clients']:7d} {r['seconds']:7.1f} {r['requests']:8d} {r['requests_s']:7.1f} {r['tok_s']:7.1f}"
            f" {r['ttft_p50_ms']:7.1f}ms {r['ttft_p90_ms']:7.1f}ms {r['mismatches']:8d} {r['errors']:6d}"
            f"  {r['rss_before_mib']:.1f}/{r['rss_after_mib']:.1f}"
        )
    speeds = ", ".join(f"{name} {value:.1f}" for name, value in cost["tok_s"].items())
    print(f"one client, {cost['tokens']} tokens each way, tok/s: {speeds}")
    cpu = ", ".join(f"{name} {value:.2f}" for name, value in cost["cpu_ms_per_token"].items())
    print(f"CPU ms per token (client + server): {cpu}; the server alone {cost['server_cpu_ms_per_token']:.2f}")
    print(
        f"HTTP overhead: {cost['http_overhead']:.1%} of tok/s ({cost['openai_client_overhead']:.1%} with the openai"
        f" client); server CPU per token {cost['server_cpu_overhead']:+.1%} vs in-process"
    )
    result = {"model": args.model, "cpus": os.cpu_count(), "levels": levels, "one_client": cost}
    print(json.dumps(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
