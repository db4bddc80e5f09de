"""pull / ls / rm against a fake Hugging Face hub on 127.0.0.1, with the real
huggingface_hub client.

The fake hub answers the routes the client uses: model info with file sizes
(`/api/models/{repo}/revision/{rev}?blobs=true`), HEAD/GET `/{repo}/resolve/{rev}/{file}`
with X-Repo-Commit / ETag / X-Linked-Etag / X-Linked-Size, and, for LFS files, a 302 to a
"CDN" on a second port (another origin, as on the real hub) that serves the bytes with
Range support. It logs every request and the body bytes it sent, and can cut a transfer
at a fixed byte offset of a file.
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
from huggingface_hub import constants, snapshot_download, try_to_load_from_cache
from typer import Typer
from typer.testing import CliRunner

from localv3 import hub, registry
from localv3.commands import ls, pull, rm
from localv3.errors import LocalV3Error, ModelNotFoundError

REPO = "acme/tiny-moe"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
TOKEN = "hf_test_token_123"
REPO_ROOT = Path(__file__).resolve().parents[1]


def _repo_files() -> dict[str, bytes]:
    config = {
        "model_type": "deepseek_v3", "torch_dtype": "bfloat16", "vocab_size": 256, "hidden_size": 64,
        "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "kv_lora_rank": 16,
        "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 8,
    }
    shards = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")
    index = {"weight_map": {"a.weight": shards[0], "b.weight": shards[1]}}
    return {
        "config.json": json.dumps(config).encode(),
        "tokenizer.json": b'{"model": {"type": "BPE"}}',
        "model.safetensors.index.json": json.dumps(index).encode(),
        "model-00001-of-00002.safetensors": bytes(range(256)) * 64,  # 16384 bytes
        "model-00002-of-00002.safetensors": b"\x07" * 9000,
        "README.md": b"# tiny moe\n",
    }


LFS_SUFFIX = ".safetensors"
STALL_S = 3.0


@dataclass
class Served:
    method: str
    path: str  # repo file path; "api:REPO" for model info, "redirect:FILE" for a GET answered by a 302
    range: str | None
    body_bytes: int
    authorization: str | None


@dataclass
class FakeHub:
    files: dict[str, bytes] = field(default_factory=_repo_files)
    log: list[Served] = field(default_factory=list)
    cut_at: dict[str, int] = field(default_factory=dict)  # file -> absolute offset where GETs stop
    # file -> offset where the next GET goes silent (connection open, no bytes) for STALL_S
    stall_once_at: dict[str, int] = field(default_factory=dict)
    busy_listings: int = 0  # the next model-info requests answered 503
    ignore_range: bool = False
    hub_url: str = ""
    cdn_url: str = ""
    lock: threading.Lock = field(default_factory=threading.Lock)

    def sha256(self, path: str) -> str:
        return hashlib.sha256(self.files[path]).hexdigest()

    def git_blob_id(self, path: str) -> str:
        data = self.files[path]
        return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()

    def is_lfs(self, path: str) -> bool:
        return path.endswith(LFS_SUFFIX)

    def record(self, entry: Served) -> None:
        with self.lock:
            self.log.append(entry)

    def gets(self, path: str) -> list[Served]:
        return [e for e in self.log if e.method == "GET" and e.path == path]

    def body_bytes(self) -> int:
        return sum(e.body_bytes for e in self.log if e.path in self.files)

    def file_by_sha(self, sha: str) -> str | None:
        return next((p for p in self.files if self.is_lfs(p) and self.sha256(p) == sha), None)


def _handler(fake: FakeHub, role: str):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:  # keep pytest output clean
            pass

        def do_HEAD(self) -> None:
            self._route(head=True)

        def do_GET(self) -> None:
            self._route(head=False)

        def _route(self, head: bool) -> None:
            path = unquote(urlsplit(self.path).path)
            if role == "cdn":
                found = re.fullmatch(r"/lfs/([0-9a-f]{64})", path)
                name = fake.file_by_sha(found.group(1)) if found else None
                return self._send_file(name, head) if name else self._error(404, "EntryNotFound")
            info = re.fullmatch(r"/api/models/([^/]+/[^/]+)/revision/([^/]+)", path)
            if info:
                return self._model_info(info.group(1), info.group(2))
            resolve = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
            if resolve:
                return self._resolve(*resolve.groups(), head=head)
            self._record(path, None, 0)
            self._error(404, "EntryNotFound")

        def _record(self, path: str, range_header: str | None, body_bytes: int) -> None:
            fake.record(Served(self.command, path, range_header, body_bytes, self.headers.get("Authorization")))

        def _error(self, status: int, code: str) -> None:
            self.send_response(status)
            self.send_header("X-Error-Code", code)
            self.send_header("X-Error-Message", code)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def _json(self, body: object) -> None:
            data = json.dumps(body).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _model_info(self, repo: str, revision: str) -> None:
            self._record(f"api:{repo}", None, 0)
            with fake.lock:
                busy, fake.busy_listings = fake.busy_listings > 0, max(0, fake.busy_listings - 1)
            if busy:
                return self._error(503, "ServiceUnavailable")
            if repo == "acme/gated" and self.headers.get("Authorization") != f"Bearer {TOKEN}":
                return self._error(401, "GatedRepo")
            if repo != REPO:
                return self._error(404, "RepoNotFound")
            if revision not in ("main", COMMIT):
                return self._error(404, "RevisionNotFound")
            siblings = []
            for name, data in fake.files.items():
                sibling = {"rfilename": name, "size": len(data), "blobId": fake.git_blob_id(name)}
                if fake.is_lfs(name):
                    sibling["lfs"] = {"size": len(data), "sha256": fake.sha256(name), "pointerSize": 130}
                siblings.append(sibling)
            self._json({"id": repo, "modelId": repo, "sha": COMMIT, "siblings": siblings})

        def _resolve(self, repo: str, revision: str, name: str, head: bool) -> None:
            if repo != REPO or revision not in ("main", COMMIT) or name not in fake.files:
                self._record(name, None, 0)
                return self._error(404, "RepoNotFound" if repo != REPO else "EntryNotFound")
            if not fake.is_lfs(name):
                return self._send_file(name, head)
            self._record(name if head else f"redirect:{name}", self.headers.get("Range"), 0)
            self.send_response(302)
            self.send_header("Location", f"{fake.cdn_url}/lfs/{fake.sha256(name)}")
            self.send_header("X-Repo-Commit", COMMIT)
            self.send_header("X-Linked-Etag", f'"{fake.sha256(name)}"')
            self.send_header("X-Linked-Size", str(len(fake.files[name])))
            self.send_header("ETag", f'"{fake.git_blob_id(name)}"')
            self.send_header("Content-Length", "0")
            self.end_headers()

        def _send_file(self, name: str, head: bool) -> None:
            data = fake.files[name]
            range_header = self.headers.get("Range")
            start = 0
            if range_header and not fake.ignore_range:
                start = int(re.fullmatch(r"bytes=(\d+)-", range_header).group(1))
            self.send_response(206 if start else 200)
            if start:
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            self.send_header("Content-Length", str(len(data) - start))
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("X-Repo-Commit", COMMIT)
            self.send_header("ETag", f'"{fake.sha256(name) if fake.is_lfs(name) else fake.git_blob_id(name)}"')
            self.end_headers()
            if head:
                return self._record(name, range_header, 0)
            end = min(len(data), fake.cut_at.get(name, len(data)))
            stall_at = fake.stall_once_at.pop(name, None)
            if stall_at is not None:
                end = stall_at
            body = data[start:end] if end > start else b""
            self.wfile.write(body)
            self.wfile.flush()
            self._record(name, range_header, len(body))
            if stall_at is not None:
                time.sleep(STALL_S)  # silent but connected: only a read timeout ends the wait
            if end < len(data):
                self.close_connection = True  # the client sees a body shorter than Content-Length

    return Handler


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    """Two loopback servers (hub and CDN) on free ports; both stop at teardown."""
    fake = FakeHub()
    servers = [ThreadingHTTPServer(("127.0.0.1", 0), _handler(fake, role)) for role in ("hub", "cdn")]
    threads = [threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}) for server in servers]
    for thread in threads:
        thread.start()
    fake.hub_url, fake.cdn_url = (f"http://127.0.0.1:{server.server_port}" for server in servers)

    monkeypatch.setenv("HF_ENDPOINT", fake.hub_url)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setenv("LOCALV3_HOME", str(tmp_path / "home"))
    # constants read at import time: no telemetry look-ups, not offline
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr("localv3.hub.download.STALLED_RETRY_DELAYS_S", (0.0,))
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "models.toml").write_text(
        "[models.fake-moe]\n"
        'description = "test model"\nformat = "hf"\nfamily = "deepseek_v3"\nprecision = "bf16"\n'
        f'repo = "{REPO}"\nallow = ["*.json", "*.safetensors"]\n'
    )
    yield fake
    for server in servers:
        server.shutdown()
        server.server_close()
    for thread in threads:
        thread.join(timeout=5)


def cache_dir(tmp_path: Path) -> Path:
    return tmp_path / "hf" / "hub"


def storage_dir(tmp_path: Path) -> Path:
    return cache_dir(tmp_path) / "models--acme--tiny-moe"


def run(*args: str):
    app = Typer()
    for command in (pull, ls, rm):
        command.register(app)
    return CliRunner().invoke(app, list(args))


# ----- pull ---------------------------------------------------------------------------------


def test_full_pull_fills_the_hub_cache(fake_hub, tmp_path):
    result = run("pull", "fake-moe")
    assert result.exit_code == 0, result.output
    snapshot = storage_dir(tmp_path) / "snapshots" / COMMIT
    assert result.stdout.strip() == str(snapshot)
    assert "to download 25.17 KiB" in result.stderr  # the dry-run summary

    wanted = [name for name in fake_hub.files if name != "README.md"]
    for name in wanted:
        assert (snapshot / name).read_bytes() == fake_hub.files[name]
    assert not (snapshot / "README.md").exists()
    assert (storage_dir(tmp_path) / "refs" / "main").read_text() == COMMIT

    # each file fetched once, config/tokenizer before weights, bytes served = repo size
    fetched = [e.path for e in fake_hub.log if e.method == "GET" and e.path in fake_hub.files]
    assert sorted(fetched) == sorted(wanted)
    assert not any(p.endswith(LFS_SUFFIX) for p in fetched[:3])
    assert fake_hub.body_bytes() == sum(len(fake_hub.files[n]) for n in wanted)

    # HF_TOKEN goes to the hub, never to the CDN
    hub_requests = [e for e in fake_hub.log if e.method == "HEAD" or e.path.startswith(("api:", "redirect:"))]
    assert hub_requests and all(e.authorization == f"Bearer {TOKEN}" for e in hub_requests)
    cdn_gets = [e for e in fake_hub.log if e.method == "GET" and e.path in wanted and e.path.endswith(LFS_SUFFIX)]
    assert cdn_gets and all(e.authorization is None for e in cdn_gets)

    # an ordinary hub-cache entry: huggingface_hub and localv3 both find it offline
    cached = try_to_load_from_cache(REPO, "config.json", cache_dir=cache_dir(tmp_path))
    assert Path(cached).read_bytes() == fake_hub.files["config.json"]
    assert Path(snapshot_download(REPO, cache_dir=cache_dir(tmp_path), local_files_only=True)) == snapshot
    assert registry.resolve_model_path("fake-moe") == snapshot
    assert registry.config_for("fake-moe").hidden_size == 64

    # a second pull transfers nothing
    served_before = fake_hub.body_bytes()
    again = run("pull", "fake-moe", "--json")
    assert again.exit_code == 0, again.output
    assert json.loads(again.stdout)["fetched_bytes"] == 0
    assert fake_hub.body_bytes() == served_before


def test_interrupted_pull_resumes_from_the_saved_bytes(fake_hub, tmp_path):
    shard = "model-00001-of-00002.safetensors"
    size = len(fake_hub.files[shard])
    fake_hub.cut_at[shard] = 5000  # every transfer of this shard breaks at byte 5000

    first = run("pull", "fake-moe")
    assert first.exit_code != 0
    assert isinstance(first.exception, hub.DownloadError)
    assert "run the same command again to resume" in str(first.exception)
    # within the run: one retry after the break (it saved bytes), then one stalled retry
    first_run_gets = [(e.range, e.body_bytes) for e in fake_hub.gets(shard)]
    assert first_run_gets == [(None, 5000), ("bytes=5000-", 0), ("bytes=5000-", 0)]
    partial = storage_dir(tmp_path) / "blobs" / (fake_hub.sha256(shard) + hub.PARTIAL_SUFFIX)
    assert partial.stat().st_size == 5000
    assert not (storage_dir(tmp_path) / "refs" / "main").exists()
    assert hub.snapshot_problem(storage_dir(tmp_path) / "snapshots" / COMMIT) == "no weight files yet"
    with pytest.raises(ModelNotFoundError, match="run: localv3 pull fake-moe"):
        registry.resolve_model_path("fake-moe")

    fake_hub.cut_at.clear()
    first_run_requests = len(fake_hub.log)
    second = run("pull", "fake-moe", "--json")
    assert second.exit_code == 0, second.output
    resumed = fake_hub.log[first_run_requests:]

    shard_gets = [e for e in resumed if e.method == "GET" and e.path == shard]
    assert [(e.range, e.body_bytes) for e in shard_gets] == [("bytes=5000-", size - 5000)]
    # files finished in the first run are not fetched again
    assert not [e for e in resumed if e.path in ("config.json", "tokenizer.json", "model.safetensors.index.json")]
    second_shard = len(fake_hub.files["model-00002-of-00002.safetensors"])
    assert sum(e.body_bytes for e in resumed) == size - 5000 + second_shard
    assert json.loads(second.stdout)["fetched_bytes"] == size - 5000 + second_shard

    snapshot = registry.resolve_model_path("fake-moe")
    assert (snapshot / shard).read_bytes() == fake_hub.files[shard]
    assert not partial.exists()


def test_a_damaged_partial_file_is_caught_and_dropped(fake_hub, tmp_path):
    shard = "model-00001-of-00002.safetensors"
    fake_hub.cut_at[shard] = 5000
    assert run("pull", "fake-moe").exit_code != 0
    partial = storage_dir(tmp_path) / "blobs" / (fake_hub.sha256(shard) + hub.PARTIAL_SUFFIX)
    partial.write_bytes(b"\0" * 5000)  # the saved bytes did not survive (a crash before they reached the disk)
    fake_hub.cut_at.clear()

    damaged = run("pull", "fake-moe")
    assert isinstance(damaged.exception, hub.DownloadError)
    assert "does not match its sha256" in str(damaged.exception)
    assert not partial.exists()
    assert run("pull", "fake-moe").exit_code == 0
    assert (storage_dir(tmp_path) / "snapshots" / COMMIT / shard).read_bytes() == fake_hub.files[shard]


def test_a_server_that_ignores_range_restarts_the_file(fake_hub, tmp_path):
    shard = "model-00001-of-00002.safetensors"
    fake_hub.cut_at[shard] = 5000
    assert run("pull", "fake-moe").exit_code != 0
    fake_hub.cut_at.clear()
    fake_hub.ignore_range = True
    assert run("pull", "fake-moe").exit_code == 0
    snapshot = storage_dir(tmp_path) / "snapshots" / COMMIT
    assert (snapshot / shard).read_bytes() == fake_hub.files[shard]


@pytest.fixture
def silent_endpoint(monkeypatch):
    """A server that accepts connections and never answers; yields its URL and the accepted count."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    accepted: list[socket.socket] = []

    def accept_forever() -> None:
        while True:
            try:
                accepted.append(listener.accept()[0])
            except OSError:  # closed at teardown
                return

    threading.Thread(target=accept_forever, daemon=True).start()
    yield f"http://127.0.0.1:{listener.getsockname()[1]}", accepted
    listener.close()
    for connection in accepted:
        connection.close()


@pytest.mark.parametrize("timeout_s", ["0.3", "0.6"])
def test_a_hub_that_never_answers_times_out_retries_then_says_so(fake_hub, silent_endpoint, monkeypatch, timeout_s):
    url, accepted = silent_endpoint
    monkeypatch.setenv("HF_ENDPOINT", url)
    monkeypatch.setenv("HF_HUB_ETAG_TIMEOUT", timeout_s)
    monkeypatch.setattr("localv3.hub.calls.REQUEST_RETRY_DELAYS_S", (0.0, 0.0))
    monkeypatch.setattr("localv3.hub.calls.SLOW_REQUEST_NOTICE_S", 0.1)
    result = run("pull", "acme/anything")
    assert isinstance(result.exception, hub.HubAccessError)
    assert str(result.exception) == (
        f"cannot reach {url}: listing acme/anything failed 3 times, last: no answer within {timeout_s} s; "
        "check HF_ENDPOINT and the network, or use --offline for the local cache"
    )
    assert len(accepted) == 3
    assert result.stderr.count(f"connecting to {url} (listing acme/anything) ...") == 3
    assert result.stderr.count("trying again in 0 s") == 2


def test_a_refused_connection_is_retried_then_one_line(fake_hub, monkeypatch):
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    closed_url = f"http://127.0.0.1:{probe.getsockname()[1]}"
    probe.close()  # nothing listens there now
    monkeypatch.setenv("HF_ENDPOINT", closed_url)
    monkeypatch.setattr("localv3.hub.calls.REQUEST_RETRY_DELAYS_S", (0.0,))
    result = run("pull", "acme/anything")
    assert isinstance(result.exception, hub.HubAccessError)
    assert str(result.exception).startswith(f"cannot reach {closed_url}: listing acme/anything failed 2 times, last: ConnectError")


@pytest.mark.parametrize("busy", [1, 2])
def test_a_busy_hub_is_asked_again_and_the_pull_completes(fake_hub, tmp_path, monkeypatch, busy):
    monkeypatch.setattr("localv3.hub.calls.REQUEST_RETRY_DELAYS_S", (0.0, 0.0))
    fake_hub.busy_listings = busy
    result = run("pull", "fake-moe")
    assert result.exit_code == 0, result.output
    assert len([e for e in fake_hub.log if e.path == f"api:{REPO}"]) == busy + 1
    assert result.stderr.count("HTTP 503; trying again in 0 s") == busy


def test_a_busy_hub_that_stays_busy_is_one_line(fake_hub, monkeypatch):
    monkeypatch.setattr("localv3.hub.calls.REQUEST_RETRY_DELAYS_S", (0.0, 0.0))
    fake_hub.busy_listings = 3
    result = run("pull", "fake-moe")
    assert isinstance(result.exception, hub.HubAccessError)
    assert f"listing {REPO} failed 3 times, last: HTTP 503" in str(result.exception)


@pytest.mark.parametrize("offset", [0, 5000])
def test_a_transfer_that_goes_silent_times_out_and_resumes(fake_hub, tmp_path, monkeypatch, offset):
    shard = "model-00001-of-00002.safetensors"
    monkeypatch.setenv("HF_HUB_DOWNLOAD_TIMEOUT", "0.5")
    fake_hub.stall_once_at[shard] = offset
    result = run("pull", "fake-moe")
    assert result.exit_code == 0, result.output
    snapshot = storage_dir(tmp_path) / "snapshots" / COMMIT
    assert (snapshot / shard).read_bytes() == fake_hub.files[shard]
    ranges = [e.range for e in fake_hub.gets(shard)]
    assert ranges == [None, f"bytes={offset}-" if offset else None]


@pytest.mark.parametrize("value", ["0", "-1", "soon", "nan"])
def test_a_bad_timeout_variable_is_one_line(fake_hub, monkeypatch, value):
    monkeypatch.setenv("HF_HUB_ETAG_TIMEOUT", value)
    result = run("pull", "fake-moe")
    assert isinstance(result.exception, hub.HubAccessError)
    assert str(result.exception) == f"HF_HUB_ETAG_TIMEOUT={value!r} is not a timeout in seconds (a number above 0)"


def test_missing_or_gated_repo_is_a_clear_error(fake_hub, monkeypatch):
    result = run("pull", "acme/does-not-exist")
    assert isinstance(result.exception, ModelNotFoundError)
    assert str(result.exception) == f"repository acme/does-not-exist not found on {fake_hub.hub_url} (a private repo needs HF_TOKEN)"

    monkeypatch.delenv("HF_TOKEN")
    gated = run("pull", "acme/gated")
    assert isinstance(gated.exception, hub.HubAccessError)
    assert str(gated.exception) == f"acme/gated is gated: accept its terms at {fake_hub.hub_url}/acme/gated and set HF_TOKEN"

    bad_revision = run("pull", REPO, "--revision", "v9")
    assert isinstance(bad_revision.exception, ModelNotFoundError)
    assert "revision 'v9' not found" in str(bad_revision.exception)


def test_missing_repo_through_the_real_cli_is_one_line(fake_hub, tmp_path):
    import os

    env = {**os.environ, "HF_HUB_DISABLE_TELEMETRY": "1"}
    done = subprocess.run(
        [sys.executable, str(REPO_ROOT / "cli.py"), "pull", "acme/does-not-exist"],
        capture_output=True, text=True, env=env, timeout=120, cwd=tmp_path,
    )
    assert done.returncode == 1
    assert done.stdout == ""
    assert done.stderr.strip().splitlines() == [
        f"error: repository acme/does-not-exist not found on {fake_hub.hub_url} (a private repo needs HF_TOKEN)"
    ]


def test_pull_refuses_when_the_disk_is_too_small(fake_hub, tmp_path, monkeypatch):
    monkeypatch.setattr("localv3.hub.pulling.free_disk_bytes", lambda path: 10_000)
    result = run("pull", "fake-moe")
    assert isinstance(result.exception, hub.InsufficientDiskError)
    assert str(result.exception).startswith("not enough disk space for acme/tiny-moe: 25.17 KiB to download, 9.77 KiB free")
    assert not [e for e in fake_hub.log if e.path in fake_hub.files]  # nothing fetched
    assert not (storage_dir(tmp_path) / "blobs").exists()


def test_offline_uses_the_cache_only(fake_hub, tmp_path, monkeypatch):
    not_cached = run("pull", "fake-moe", "--offline")
    assert isinstance(not_cached.exception, ModelNotFoundError)
    assert "offline mode is on" in str(not_cached.exception)

    assert run("pull", "fake-moe").exit_code == 0
    requests_before = len(fake_hub.log)
    flag = run("pull", "fake-moe", "--offline", "--json")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    env = run("pull", "fake-moe", "--json")
    assert flag.exit_code == 0 and env.exit_code == 0, (flag.output, env.output)
    assert len(fake_hub.log) == requests_before  # not one request
    for result in (flag, env):
        assert json.loads(result.stdout)["path"] == str(storage_dir(tmp_path) / "snapshots" / COMMIT)


# ----- ls / rm ------------------------------------------------------------------------------


def _quantized_output(tmp_path: Path) -> Path:
    output = tmp_path / "home" / "models" / "fake-moe-q4"
    output.mkdir(parents=True)
    (output / "localv3_manifest.json").write_text(json.dumps({"scheme": "localv3-v1", "experts": "q4"}))
    (output / "model.safetensors").write_bytes(b"\0" * 1000)
    (tmp_path / "home" / "models" / ".fake-moe-q8.tmp").mkdir()  # an unfinished write: not listed
    return output


def test_ls_lists_hub_downloads_and_quantized_outputs(fake_hub, tmp_path):
    assert run("pull", "fake-moe").exit_code == 0
    output = _quantized_output(tmp_path)

    listed = run("ls", "--json")
    assert listed.exit_code == 0, listed.output
    rows = {row["name"]: row for row in json.loads(listed.stdout)}
    assert set(rows) == {"tiny", "fake-moe", "fake-moe-q4"} and rows["tiny"]["source"] == "bundled"
    assert rows["fake-moe"]["repo_id"] == REPO
    assert rows["fake-moe"]["quant"] == "bf16"
    assert rows["fake-moe"]["complete"] is True
    assert rows["fake-moe"]["size_bytes"] == sum(len(d) for n, d in fake_hub.files.items() if n != "README.md")
    assert rows["fake-moe"]["path"] == str(storage_dir(tmp_path) / "snapshots" / COMMIT)
    manifest_bytes = (output / "localv3_manifest.json").stat().st_size
    assert rows["fake-moe-q4"] == {
        "name": "fake-moe-q4", "source": "localv3", "size_bytes": 1000 + manifest_bytes,
        "quant": "localv3-v1 experts=q4", "path": str(output), "complete": True, "repo_id": None,
    }

    table = run("ls").stdout.splitlines()
    assert table[0].split() == ["NAME", "SIZE", "QUANT", "PATH"]
    snapshot = str(storage_dir(tmp_path) / "snapshots" / COMMIT)
    assert any(line.startswith("fake-moe ") and line.endswith(snapshot) for line in table)


def test_ls_marks_an_interrupted_pull_incomplete(fake_hub, tmp_path):
    fake_hub.cut_at["model-00001-of-00002.safetensors"] = 5000
    assert run("pull", "fake-moe").exit_code != 0
    row = next(r for r in json.loads(run("ls", "--json").stdout) if r["source"] == "hub")
    assert row["name"] == "fake-moe" and row["complete"] is False
    assert row["size_bytes"] >= 5000  # the partial shard counts as disk used


def test_rm_deletes_hub_downloads_and_quantized_outputs(fake_hub, tmp_path):
    assert run("pull", "fake-moe").exit_code == 0
    output = _quantized_output(tmp_path)

    refused = run("rm", "fake-moe")  # CliRunner's stdin is not a terminal
    assert isinstance(refused.exception, LocalV3Error) and "--yes" in str(refused.exception)
    assert storage_dir(tmp_path).exists()

    removed = run("rm", REPO, "--yes")
    assert removed.exit_code == 0, removed.output
    assert not storage_dir(tmp_path).exists()
    assert output.exists()

    assert run("rm", "fake-moe-q4", "--yes").exit_code == 0
    assert not output.exists()
    assert [r["source"] for r in json.loads(run("ls", "--json").stdout)] == ["bundled"]  # only the bundled tiny

    missing = run("rm", "fake-moe", "--yes")
    assert isinstance(missing.exception, ModelNotFoundError)


def test_rm_clears_an_interrupted_pull(fake_hub, tmp_path):
    fake_hub.cut_at["model-00001-of-00002.safetensors"] = 5000
    assert run("pull", "fake-moe").exit_code != 0
    assert run("rm", "fake-moe", "-y").exit_code == 0
    assert not storage_dir(tmp_path).exists()
