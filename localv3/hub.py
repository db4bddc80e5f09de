"""Hugging Face Hub access: pull, look up, list and delete models. The only module that
imports huggingface_hub.

A pull is planned first (the repo listing with sizes, what the cache already holds, the
free disk), then fetches config and tokenizer files, then weight shards. Each file is
downloaded into `blobs/<etag>.localv3-partial` inside the hub cache with HTTP Range
requests, so a cut-off transfer resumes from the bytes already saved, whether the retry
comes in the same run or in a later `localv3 pull`. A finished file is renamed to
`blobs/<etag>` and huggingface_hub itself links it into the snapshot, so the result is an
ordinary hub-cache entry. The branch ref (refs/main) is written last: a pull that never
finished is not found by name.

Settings are read when a function is called, not at import: HF_ENDPOINT, HF_HOME /
HF_HUB_CACHE, HF_HUB_OFFLINE; HF_TOKEN is read by huggingface_hub on every request.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol, TypeVar
from urllib.parse import urlsplit

import httpx2
from huggingface_hub import (
    HfApi,
    constants,
    get_hf_file_metadata,
    hf_hub_download,
    hf_hub_url,
    scan_cache_dir,
    snapshot_download,
)
from huggingface_hub.errors import (
    CacheNotFound,
    GatedRepoError,
    HfHubHTTPError,
    HFValidationError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.file_download import repo_folder_name
from huggingface_hub.utils import WeakFileLock, build_hf_headers, filter_repo_objects, get_session

from localv3.errors import LocalV3Error, ModelNotFoundError

T = TypeVar("T")

PARTIAL_SUFFIX = ".localv3-partial"
MANIFEST_NAME = "localv3_manifest.json"
WEIGHT_SUFFIXES = (".safetensors", ".gguf", ".bin", ".pt", ".pth")
# After an attempt that saved no new bytes, wait this long and try again; when the delays
# are used up the pull stops (the next run resumes). An attempt that saved bytes resets them.
STALLED_RETRY_DELAYS_S = (1.0, 4.0, 15.0)
# A metadata request (repo listing, file HEAD) that fails to connect or times out is tried again
# after each of these delays, then the pull stops with one line.
REQUEST_RETRY_DELAYS_S = (1.0, 3.0)
# A request still unanswered after this long shows "connecting to ..." on stderr.
SLOW_REQUEST_NOTICE_S = 1.0
DEFAULT_REQUEST_TIMEOUT_S = 10.0
_TRUE_VALUES = {"1", "on", "yes", "true"}


class HubAccessError(LocalV3Error):
    """The hub cannot be reached, or refuses access (gated repo, bad token)."""


class InsufficientDiskError(LocalV3Error):
    """The files to download do not fit on the disk holding the hub cache."""


class DownloadError(LocalV3Error):
    """A transfer stopped part-way; the bytes saved so far are kept for the next run."""


# ----- settings -----------------------------------------------------------------------------


@dataclass(frozen=True)
class HubSettings:
    endpoint: str
    cache_dir: Path
    offline: bool
    # seconds to connect, and between bytes once connected (HF_HUB_ETAG_TIMEOUT for metadata,
    # HF_HUB_DOWNLOAD_TIMEOUT for file bodies)
    metadata_timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S
    download_timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S

    @classmethod
    def current(cls, offline: bool = False) -> "HubSettings":
        endpoint = os.environ.get("HF_ENDPOINT") or constants.ENDPOINT
        if os.environ.get("HF_HUB_CACHE"):
            cache_dir = Path(os.environ["HF_HUB_CACHE"])
        elif os.environ.get("HF_HOME"):
            cache_dir = Path(os.environ["HF_HOME"]) / "hub"
        else:
            cache_dir = Path(constants.HF_HUB_CACHE)
        env_offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE_VALUES
        return cls(
            endpoint=endpoint.rstrip("/"),
            cache_dir=cache_dir.expanduser(),
            offline=offline or env_offline or constants.is_offline_mode(),
            metadata_timeout_s=_positive_seconds("HF_HUB_ETAG_TIMEOUT"),
            download_timeout_s=_positive_seconds("HF_HUB_DOWNLOAD_TIMEOUT"),
        )


def _positive_seconds(variable: str) -> float:
    """A timeout from the environment; the default when unset, refused when not a positive number."""
    text = os.environ.get(variable, "").strip()
    if not text:
        return DEFAULT_REQUEST_TIMEOUT_S
    try:
        seconds = float(text)
    except ValueError:
        seconds = float("nan")
    if not 0 < seconds < 86_400:  # NaN fails too
        raise HubAccessError(f"{variable}={text!r} is not a timeout in seconds (a number above 0)")
    return seconds


def format_bytes(count: int) -> str:
    """Decimal units, as disks are sold: 950 B, 25.8 kB, 688.6 GB."""
    if abs(count) < 1000:
        return f"{count} B"
    value = count / 1000
    for unit in ("kB", "MB", "GB"):
        if abs(value) < 1000:
            return f"{value:.1f} {unit}"
        value /= 1000
    return f"{value:.1f} TB"


def free_disk_bytes(path: Path) -> int:
    """Free bytes on the file system that holds `path` (or its nearest existing parent)."""
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    return shutil.disk_usage(existing).free


def _repo_storage(cache_dir: Path, repo_id: str) -> Path:
    return cache_dir / repo_folder_name(repo_id=repo_id, repo_type="model")


def _is_weight_file(path: str) -> bool:
    return path.endswith(WEIGHT_SUFFIXES)


@contextlib.contextmanager
def _hub_errors(repo_id: str, revision: str, endpoint: str) -> Iterator[None]:
    """Turn huggingface_hub / network exceptions into one-line localv3 errors."""
    try:
        yield
    except GatedRepoError:
        raise HubAccessError(
            f"{repo_id} is gated: accept its terms at {endpoint}/{repo_id} and set HF_TOKEN"
        ) from None
    except RepositoryNotFoundError:
        raise ModelNotFoundError(
            f"repository {repo_id} not found on {endpoint} (a private repo needs HF_TOKEN)"
        ) from None
    except RevisionNotFoundError:
        raise ModelNotFoundError(f"revision {revision!r} not found in {repo_id}") from None
    except HfHubHTTPError as exc:
        raise HubAccessError(f"{repo_id}: {str(exc).splitlines()[0]}") from None
    except HFValidationError:
        raise ModelNotFoundError(f"{repo_id!r} is not a valid hub repo id (owner/name)") from None
    except OfflineModeIsEnabled:
        raise HubAccessError(
            f"{repo_id}: offline mode is on (HF_HUB_OFFLINE); use --offline to read the cache"
        ) from None
    except httpx2.TransportError as exc:
        raise HubAccessError(
            f"cannot reach {endpoint} ({type(exc).__name__}: {exc}); --offline uses the local cache only"
        ) from None


_RETRYABLE_STATUS = (429, 500, 502, 503, 504)


def _is_transient(exc: Exception) -> bool:
    """A failure worth another try: no connection, a timeout, or a busy server."""
    if isinstance(exc, httpx2.TransportError):
        return True
    response = getattr(exc, "response", None)
    return isinstance(exc, HfHubHTTPError) and getattr(response, "status_code", None) in _RETRYABLE_STATUS


@contextlib.contextmanager
def _notice_if_slow(progress: "PullProgress", message: str) -> Iterator[None]:
    """Tell the user what we wait for when a request is not answered within a second."""
    timer = threading.Timer(SLOW_REQUEST_NOTICE_S, progress.waiting, args=(message,))
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


def _ask_hub(call: Callable[[], T], *, what: str, endpoint: str, timeout_s: float, progress: "PullProgress") -> T:
    """`call()`, tried again after each of REQUEST_RETRY_DELAYS_S when it fails transiently;
    one line naming the endpoint and the last failure when every try failed."""
    for attempt in range(len(REQUEST_RETRY_DELAYS_S) + 1):
        try:
            with _notice_if_slow(progress, f"connecting to {endpoint} ({what}) ..."):
                return call()
        except Exception as exc:
            if not _is_transient(exc):
                raise
            problem = _describe_failure(exc, timeout_s)
            if attempt == len(REQUEST_RETRY_DELAYS_S):
                raise HubAccessError(
                    f"cannot reach {endpoint}: {what} failed {attempt + 1} times, last: {problem}; "
                    "check HF_ENDPOINT and the network, or use --offline for the local cache"
                ) from None
            delay = REQUEST_RETRY_DELAYS_S[attempt]
            progress.waiting(f"{what}: {problem}; trying again in {delay:g} s")
            time.sleep(delay)
    raise AssertionError("unreachable")


def _describe_failure(exc: Exception, timeout_s: float) -> str:
    if isinstance(exc, httpx2.TimeoutException):
        return f"no answer within {timeout_s:g} s"
    if isinstance(exc, httpx2.TransportError):
        return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    status = getattr(getattr(exc, "response", None), "status_code", None)
    return f"HTTP {status}" if status is not None else str(exc).splitlines()[0]


# ----- the plan (dry run) -------------------------------------------------------------------


@dataclass(frozen=True)
class PullRequest:
    repo_id: str
    revision: str = "main"
    allow: tuple[str, ...] = ()
    deny: tuple[str, ...] = ()
    offline: bool = False


@dataclass(frozen=True)
class PlannedFile:
    path: str
    size: int
    cached: bool
    partial_bytes: int  # saved by an earlier, interrupted pull


@dataclass(frozen=True)
class PullPlan:
    repo_id: str
    revision: str
    commit: str
    endpoint: str
    cache_dir: Path
    files: tuple[PlannedFile, ...]  # config/tokenizer files first, then weights
    free_bytes: int
    metadata_timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S
    download_timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    @property
    def cached_bytes(self) -> int:
        return sum(f.size for f in self.files if f.cached)

    @property
    def partial_bytes(self) -> int:
        return sum(f.partial_bytes for f in self.files if not f.cached)

    @property
    def bytes_to_fetch(self) -> int:
        return self.total_bytes - self.cached_bytes - self.partial_bytes

    @property
    def storage_dir(self) -> Path:
        return _repo_storage(self.cache_dir, self.repo_id)


def plan_pull(request: PullRequest, settings: HubSettings, progress: PullProgress | None = None) -> PullPlan:
    """List the repo's files with sizes and compare them with the cache. No file is fetched."""
    api = HfApi(endpoint=settings.endpoint)
    with _hub_errors(request.repo_id, request.revision, settings.endpoint):
        info = _ask_hub(
            lambda: api.model_info(
                request.repo_id, revision=request.revision, files_metadata=True, timeout=settings.metadata_timeout_s
            ),
            what=f"listing {request.repo_id}",
            endpoint=settings.endpoint,
            timeout_s=settings.metadata_timeout_s,
            progress=progress or QuietProgress(),
        )
    siblings = list(
        filter_repo_objects(
            info.siblings or [],
            allow_patterns=list(request.allow) or None,
            ignore_patterns=list(request.deny) or None,
            key=lambda sibling: sibling.rfilename,
        )
    )
    if not siblings:
        patterns = f" matching {list(request.allow)}" if request.allow else ""
        raise ModelNotFoundError(f"{request.repo_id}@{request.revision} has no files{patterns}")

    storage = _repo_storage(settings.cache_dir, request.repo_id)
    files = []
    for sibling in siblings:
        # the blob name the hub will give: the LFS sha256, else the git blob id
        blob_key = sibling.lfs.sha256 if sibling.lfs else sibling.blob_id
        size = sibling.lfs.size if sibling.lfs else (sibling.size or 0)
        pointer = storage / "snapshots" / info.sha / sibling.rfilename
        blob = storage / "blobs" / str(blob_key)
        partial = blob.with_name(blob.name + PARTIAL_SUFFIX)
        files.append(
            PlannedFile(
                path=sibling.rfilename,
                size=size,
                cached=pointer.exists() or blob.exists(),
                partial_bytes=partial.stat().st_size if partial.exists() else 0,
            )
        )
    files.sort(key=lambda f: (_is_weight_file(f.path), f.path))
    return PullPlan(
        repo_id=request.repo_id,
        revision=request.revision,
        commit=info.sha,
        endpoint=settings.endpoint,
        cache_dir=settings.cache_dir,
        files=tuple(files),
        free_bytes=free_disk_bytes(settings.cache_dir),
        metadata_timeout_s=settings.metadata_timeout_s,
        download_timeout_s=settings.download_timeout_s,
    )


def check_disk_space(plan: PullPlan) -> None:
    if plan.bytes_to_fetch > plan.free_bytes:
        raise InsufficientDiskError(
            f"not enough disk space for {plan.repo_id}: {format_bytes(plan.bytes_to_fetch)} to download, "
            f"{format_bytes(plan.free_bytes)} free at {plan.cache_dir} (HF_HOME or HF_HUB_CACHE can point elsewhere)"
        )


# ----- fetching -----------------------------------------------------------------------------


class PullProgress(Protocol):
    def planned(self, plan: PullPlan) -> None:
        """The dry run is done; downloads start next."""

    def advanced(self, nbytes: int) -> None:
        """`nbytes` more bytes were saved (negative when a server ignored a Range request)."""

    def waiting(self, message: str) -> None:
        """A request is slow or is being tried again (called from a timer thread too)."""


class QuietProgress:
    def planned(self, plan: PullPlan) -> None:
        pass

    def advanced(self, nbytes: int) -> None:
        pass

    def waiting(self, message: str) -> None:
        pass


@dataclass(frozen=True)
class PullResult:
    repo_id: str
    revision: str
    commit: str
    path: Path
    files: int
    total_bytes: int
    fetched_bytes: int  # bytes transferred by this run

    def to_dict(self) -> dict:
        return {**asdict(self), "path": str(self.path)}


def pull(request: PullRequest, progress: PullProgress | None = None) -> PullResult:
    """Plan, check the disk, then fetch; with offline mode on, answer from the cache only."""
    progress = progress or QuietProgress()
    settings = HubSettings.current(offline=request.offline)
    if settings.offline:
        return _pull_from_cache(request, settings)
    plan = plan_pull(request, settings, progress)
    progress.planned(plan)
    check_disk_space(plan)
    return fetch(plan, progress)


def fetch(plan: PullPlan, progress: PullProgress) -> PullResult:
    """Fetch every file of the plan not yet in the snapshot, then record the branch ref."""
    snapshot = plan.storage_dir / "snapshots" / plan.commit
    snapshot.mkdir(parents=True, exist_ok=True)  # makes an unfinished pull visible to `ls`
    fetched = 0
    for planned in plan.files:
        if (snapshot / planned.path).exists():
            continue
        fetched += _fetch_file(plan, planned, progress)
    if plan.revision != plan.commit:
        ref = plan.storage_dir / "refs" / plan.revision
        ref.parent.mkdir(parents=True, exist_ok=True)
        ref.write_text(plan.commit)
    return PullResult(
        repo_id=plan.repo_id,
        revision=plan.revision,
        commit=plan.commit,
        path=snapshot,
        files=len(plan.files),
        total_bytes=plan.total_bytes,
        fetched_bytes=fetched,
    )


def _fetch_file(plan: PullPlan, planned: PlannedFile, progress: PullProgress) -> int:
    """Make sure the file's blob is complete, then let huggingface_hub link it into the
    snapshot. Returns the bytes transferred."""
    url = hf_hub_url(plan.repo_id, planned.path, revision=plan.commit, endpoint=plan.endpoint)
    with _hub_errors(plan.repo_id, plan.revision, plan.endpoint):
        metadata = _ask_hub(
            lambda: get_hf_file_metadata(url, timeout=plan.metadata_timeout_s, endpoint=plan.endpoint),
            what=f"looking up {planned.path}",
            endpoint=plan.endpoint,
            timeout_s=plan.metadata_timeout_s,
            progress=progress,
        )
    if not metadata.etag:
        raise HubAccessError(f"{plan.endpoint} sent no ETag for {planned.path}: is HF_ENDPOINT a Hugging Face hub?")
    blob = plan.storage_dir / "blobs" / metadata.etag
    transferred = 0
    if not blob.exists():
        headers = build_hf_headers()
        headers["Accept-Encoding"] = "identity"  # byte offsets must be offsets into the file
        download = _ResumableDownload(
            url=url,
            headers=headers,
            blob=blob,
            size=metadata.size if metadata.size is not None else planned.size,
            label=f"{plan.repo_id}/{planned.path}",
            progress=progress,
            timeout_s=plan.download_timeout_s,
        )
        lock = plan.cache_dir / ".locks" / plan.storage_dir.name / f"{metadata.etag}.lock"
        lock.parent.mkdir(parents=True, exist_ok=True)
        with WeakFileLock(lock):
            transferred = download.run()
    with _hub_errors(plan.repo_id, plan.revision, plan.endpoint):
        _ask_hub(
            lambda: hf_hub_download(
                plan.repo_id,
                planned.path,
                revision=plan.commit,
                cache_dir=plan.cache_dir,
                endpoint=plan.endpoint,
                etag_timeout=plan.metadata_timeout_s,
            ),
            what=f"linking {planned.path}",
            endpoint=plan.endpoint,
            timeout_s=plan.metadata_timeout_s,
            progress=progress,
        )
    return transferred


_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
_HASH_BLOCK_BYTES = 8 << 20


class _ServerBusy(Exception):
    """A temporary server-side refusal (429, 5xx): retried like a broken connection."""


def _content_range_start(header: str) -> int | None:
    found = re.match(r"bytes (\d+)-", header)
    return int(found.group(1)) if found else None


@dataclass
class _ResumableDownload:
    """One file into `<blob>.localv3-partial`, appending from its current size with Range
    requests, then renamed to `blob`. Every attempt asks the hub's resolve URL afresh, so a
    CDN redirect is never stale; httpx drops the token when a redirect leaves the hub."""

    url: str
    headers: dict[str, str]
    blob: Path
    size: int
    label: str
    progress: PullProgress
    timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S  # to connect, and between bytes
    received: int = 0  # bytes transferred by this run

    @property
    def partial(self) -> Path:
        return self.blob.with_name(self.blob.name + PARTIAL_SUFFIX)

    def saved_bytes(self) -> int:
        return self.partial.stat().st_size if self.partial.exists() else 0

    def run(self) -> int:
        if self.blob.exists():  # another process finished it while we waited for the lock
            return 0
        if self.saved_bytes() > self.size:
            self.partial.unlink()  # not a prefix of this file: start over
        resumed = self.saved_bytes() > 0
        stalled_attempts = 0
        while self.saved_bytes() < self.size:
            saved_before = self.saved_bytes()
            problem = "the server sent nothing new"
            try:
                self._attempt()
            except (httpx2.TransportError, _ServerBusy) as exc:
                problem = f"{type(exc).__name__}: {exc}"
            if self.saved_bytes() > saved_before:  # grows strictly, so this loop is bounded
                stalled_attempts = 0
                continue
            if stalled_attempts == len(STALLED_RETRY_DELAYS_S):
                raise DownloadError(
                    f"download of {self.label} stopped at {format_bytes(self.saved_bytes())} of "
                    f"{format_bytes(self.size)} ({problem}); run the same command again to resume"
                )
            time.sleep(STALLED_RETRY_DELAYS_S[stalled_attempts])
            stalled_attempts += 1
        if self.saved_bytes() != self.size:
            self.partial.unlink()
            raise DownloadError(f"download of {self.label} is longer than its listed size; run the command again")
        if resumed:
            self._verify_resumed_file()
        os.replace(self.partial, self.blob)
        return self.received

    def _verify_resumed_file(self) -> None:
        """A file assembled across runs is checked against its LFS sha256 (the blob name), in
        case the saved part was damaged (say, by a crash before it reached the disk)."""
        if not _SHA256_HEX.fullmatch(self.blob.name):
            return  # a small git file: its ETag is a git blob id, not a content hash
        digest = hashlib.sha256()
        with self.partial.open("rb") as saved:
            while block := saved.read(_HASH_BLOCK_BYTES):
                digest.update(block)
        if digest.hexdigest() != self.blob.name:
            self.partial.unlink()
            raise DownloadError(
                f"{self.label}: the resumed file does not match its sha256, so the saved part was damaged; "
                "it was deleted, run the command again"
            )

    def _attempt(self) -> None:
        """One GET from the saved offset; appends what arrives until the stream ends or breaks."""
        offset = self.saved_bytes()
        headers = dict(self.headers)
        if offset:
            headers["Range"] = f"bytes={offset}-"
        self.partial.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.ExitStack() as open_stream:
            with _notice_if_slow(self.progress, f"connecting to {urlsplit(self.url).netloc} for {self.label} ..."):
                response = open_stream.enter_context(
                    get_session().stream(
                        "GET", self.url, headers=headers, timeout=self.timeout_s, follow_redirects=True
                    )
                )
            if response.status_code in _RETRYABLE_STATUS:
                raise _ServerBusy(f"HTTP {response.status_code}")
            if response.status_code >= 400:
                raise DownloadError(f"download of {self.label} refused: HTTP {response.status_code}")
            if response.status_code == 206:
                start = _content_range_start(response.headers.get("Content-Range", ""))
                if start != offset:
                    raise DownloadError(f"{self.label}: asked for bytes from {offset}, the server sent from {start}")
                mode = "ab"
            else:  # 200: the server ignored the Range header and sends the whole file
                self.progress.advanced(-offset)
                mode = "wb"
            with self.partial.open(mode) as out:
                for chunk in response.iter_bytes():  # as it arrives: a break loses nothing saved
                    out.write(chunk)
                    self.received += len(chunk)
                    self.progress.advanced(len(chunk))


# ----- the cache: look-ups ------------------------------------------------------------------


def _pull_from_cache(request: PullRequest, settings: HubSettings) -> PullResult:
    snapshot = cached_snapshot(request.repo_id, request.revision)
    if snapshot is None:
        raise ModelNotFoundError(
            f"{request.repo_id}@{request.revision} is not in the hub cache ({settings.cache_dir}) "
            "and offline mode is on (--offline or HF_HUB_OFFLINE)"
        )
    problem = snapshot_problem(snapshot)
    if problem:
        raise ModelNotFoundError(
            f"{request.repo_id} is only partly in the cache ({problem}) and offline mode is on; "
            "pull it again while online"
        )
    files = [p for p in snapshot.rglob("*") if p.is_file()]
    return PullResult(
        repo_id=request.repo_id,
        revision=request.revision,
        commit=snapshot.name,
        path=snapshot,
        files=len(files),
        total_bytes=sum(p.stat().st_size for p in files),
        fetched_bytes=0,
    )


def cached_snapshot(repo_id: str, revision: str = "main") -> Path | None:
    """The cached snapshot directory of `repo_id@revision`, or None. For a branch or tag
    only a finished pull counts (its ref is written last); a commit's snapshot exists from
    the first file on, so check `snapshot_problem` before using it."""
    settings = HubSettings.current()
    try:
        found = snapshot_download(repo_id, revision=revision, cache_dir=settings.cache_dir, local_files_only=True)
    except (LocalEntryNotFoundError, HFValidationError):
        return None
    return Path(found)


_GGUF_SPLIT = re.compile(r"(?P<stem>.+)-(?P<index>\d{5})-of-(?P<count>\d{5})\.gguf$")


def snapshot_problem(snapshot: Path) -> str | None:
    """Why a snapshot cannot be a whole model yet, or None. Weights are fetched last, so a
    snapshot with weights has its other files; the safetensors index (weight_map) and GGUF
    split names tell whether every weight file is there."""
    weights = [p for p in snapshot.rglob("*") if _is_weight_file(p.name) and p.exists()]
    if not weights:
        return "no weight files yet"
    missing: set[str] = set()
    for index in snapshot.rglob("*.safetensors.index.json"):
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map", {})
        except (OSError, ValueError):
            continue
        missing.update(str((index.parent / shard).relative_to(snapshot)) for shard in weight_map.values())
    for part in weights:
        split = _GGUF_SPLIT.match(part.name)
        if split:
            count = int(split["count"])
            missing.update(
                str(part.with_name(f"{split['stem']}-{number:05d}-of-{count:05d}.gguf").relative_to(snapshot))
                for number in range(1, count + 1)
            )
    missing = {name for name in missing if not (snapshot / name).exists()}
    if missing:
        return f"{len(missing)} weight file(s) missing, e.g. {min(missing)}"
    return None


# ----- the cache: listing and removal -------------------------------------------------------


@dataclass(frozen=True)
class StoredModel:
    name: str
    source: str  # "hub" (huggingface_hub cache) | "localv3" (quantized output)
    size_bytes: int
    quant: str
    path: Path
    complete: bool
    repo_id: str | None = None

    def to_dict(self) -> dict:
        return {**asdict(self), "path": str(self.path)}


def list_stored_models(outputs_dir: Path, names_by_repo: Mapping[str, str]) -> list[StoredModel]:
    """Models in the hub cache (named by registry name where one fetches that repo) and
    localv3's quantized outputs under `outputs_dir`."""
    return [*_hub_models(names_by_repo), *_localv3_outputs(outputs_dir)]


def _hub_models(names_by_repo: Mapping[str, str]) -> list[StoredModel]:
    try:
        cache = scan_cache_dir(HubSettings.current().cache_dir)
    except CacheNotFound:
        return []
    models = []
    for repo in sorted(cache.repos, key=lambda r: r.repo_id):
        if repo.repo_type != "model":
            continue
        latest = max(repo.revisions, key=lambda r: r.last_modified, default=None)
        path = latest.snapshot_path if latest else repo.repo_path
        partial_bytes = sum(p.stat().st_size for p in (repo.repo_path / "blobs").glob(f"*{PARTIAL_SUFFIX}"))
        models.append(
            StoredModel(
                name=names_by_repo.get(repo.repo_id, repo.repo_id),
                source="hub",
                size_bytes=repo.size_on_disk + partial_bytes,
                quant=_stored_precision(path),
                path=path,
                complete=latest is not None and partial_bytes == 0 and snapshot_problem(path) is None,
                repo_id=repo.repo_id,
            )
        )
    return models


def _localv3_outputs(outputs_dir: Path) -> list[StoredModel]:
    if not outputs_dir.is_dir():
        return []
    models = []
    for child in sorted(outputs_dir.iterdir()):
        if child.name.startswith("."):  # work in progress of an atomic write
            continue
        if child.is_dir() and (child / MANIFEST_NAME).is_file():
            quant = _manifest_quant(child / MANIFEST_NAME)
            size = sum(p.stat().st_size for p in child.rglob("*") if p.is_file())
        elif child.is_file() and child.suffix == ".gguf":
            quant = _gguf_quant([child.name])
            size = child.stat().st_size
        else:
            continue
        models.append(
            StoredModel(name=child.name, source="localv3", size_bytes=size, quant=quant, path=child, complete=True)
        )
    return models


_GGUF_TYPE = re.compile(r"(?:UD-)?(?:I?Q\d(?:_[A-Z0-9]+)*|BF16|F16|F32)(?=[-.])", re.IGNORECASE)
_DTYPE_NAMES = {"bfloat16": "bf16", "float16": "f16", "float32": "fp32"}


def _gguf_quant(names: list[str]) -> str:
    types = sorted({match.group(0).upper() for name in names for match in _GGUF_TYPE.finditer(name)})
    return "gguf " + ",".join(types) if types else "gguf"


def _stored_precision(snapshot: Path) -> str:
    """What the weights in a snapshot are: GGUF type(s), the config's quant method, or dtype."""
    gguf_names = [p.name for p in snapshot.rglob("*.gguf")]
    if gguf_names:
        return _gguf_quant(gguf_names)
    try:
        config = json.loads((snapshot / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "-"
    method = (config.get("quantization_config") or {}).get("quant_method")
    if method:
        return str(method)
    dtype = config.get("torch_dtype") or config.get("dtype")
    return _DTYPE_NAMES.get(dtype, str(dtype or "-"))


def _manifest_quant(manifest_path: Path) -> str:
    """The `scheme` / `experts` fields of a localv3 manifest, as one short string."""
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "?"
    parts = []
    if isinstance(manifest.get("scheme"), str):
        parts.append(manifest["scheme"])
    if isinstance(manifest.get("experts"), str):
        parts.append(f"experts={manifest['experts']}")
    return " ".join(parts) or "localv3"


def remove_stored_model(model: StoredModel) -> None:
    """Delete a listed model: a hub repo through huggingface_hub's cache deletion (which
    also handles blobs shared between repos), or a localv3 output."""
    if model.source == "localv3":
        if model.path.is_dir():
            shutil.rmtree(model.path)
        else:
            model.path.unlink()
        return
    cache_dir = HubSettings.current().cache_dir
    cache = scan_cache_dir(cache_dir)
    for repo in cache.repos:
        if repo.repo_id == model.repo_id and repo.repo_type == "model":
            cache.delete_revisions(*(revision.commit_hash for revision in repo.revisions)).execute()
            if repo.repo_path.exists():  # partial downloads outside any revision
                shutil.rmtree(repo.repo_path)
            shutil.rmtree(cache_dir / ".locks" / repo.repo_path.name, ignore_errors=True)
