"""`pull`: plan (the repo listing with sizes, what the cache already holds, the free disk), check
the disk, then fetch config and tokenizer files first and weight shards last; the branch ref
(refs/main) is written last, so a pull that never finished is not found by name."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from huggingface_hub import HfApi, get_hf_file_metadata, hf_hub_download, hf_hub_url
from huggingface_hub.utils import WeakFileLock, build_hf_headers, filter_repo_objects

from localv3.errors import ModelNotFoundError
from localv3.files import free_disk_bytes
from localv3.hub.cache import cached_snapshot, snapshot_problem
from localv3.hub.calls import ask_hub
from localv3.hub.download import ResumableDownload
from localv3.hub.progress import PullProgress, QuietProgress
from localv3.render import format_bytes
from localv3.hub.settings import (
    PARTIAL_SUFFIX,
    HubAccessError,
    HubSettings,
    InsufficientDiskError,
    is_weight_file,
    repo_storage,
)


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
    settings: HubSettings  # the endpoint, the cache and the timeouts it was planned with
    files: tuple[PlannedFile, ...]  # config/tokenizer files first, then weights
    free_bytes: int

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
        return repo_storage(self.settings.cache_dir, self.repo_id)


def plan_pull(request: PullRequest, settings: HubSettings, progress: PullProgress | None = None) -> PullPlan:
    """List the repo's files with sizes and compare them with the cache. No file is fetched."""
    api = HfApi(endpoint=settings.endpoint)
    info = ask_hub(
        lambda: api.model_info(
            request.repo_id, revision=request.revision, files_metadata=True, timeout=settings.metadata_timeout_s
        ),
        what=f"listing {request.repo_id}",
        repo_id=request.repo_id,
        revision=request.revision,
        settings=settings,
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

    storage = repo_storage(settings.cache_dir, request.repo_id)
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
    files.sort(key=lambda f: (is_weight_file(f.path), f.path))
    return PullPlan(
        repo_id=request.repo_id,
        revision=request.revision,
        commit=info.sha,
        settings=settings,
        files=tuple(files),
        free_bytes=free_disk_bytes(settings.cache_dir),
    )


def check_disk_space(plan: PullPlan) -> None:
    if plan.bytes_to_fetch > plan.free_bytes:
        raise InsufficientDiskError(
            f"not enough disk space for {plan.repo_id}: {format_bytes(plan.bytes_to_fetch)} to download, "
            f"{format_bytes(plan.free_bytes)} free at {plan.settings.cache_dir} (HF_HOME or HF_HUB_CACHE can point elsewhere)"
        )

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
        return pull_from_cache(request, settings)
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
    settings = plan.settings
    url = hf_hub_url(plan.repo_id, planned.path, revision=plan.commit, endpoint=settings.endpoint)

    def ask(call, what: str):
        return ask_hub(call, what=what, repo_id=plan.repo_id, revision=plan.revision, settings=settings, progress=progress)

    metadata = ask(
        lambda: get_hf_file_metadata(url, timeout=settings.metadata_timeout_s, endpoint=settings.endpoint),
        f"looking up {planned.path}",
    )
    if not metadata.etag:
        raise HubAccessError(f"{settings.endpoint} sent no ETag for {planned.path}: is HF_ENDPOINT a Hugging Face hub?")
    blob = plan.storage_dir / "blobs" / metadata.etag
    transferred = 0
    if not blob.exists():
        headers = build_hf_headers()
        headers["Accept-Encoding"] = "identity"  # byte offsets must be offsets into the file
        download = ResumableDownload(
            url=url,
            headers=headers,
            blob=blob,
            size=metadata.size if metadata.size is not None else planned.size,
            label=f"{plan.repo_id}/{planned.path}",
            progress=progress,
            timeout_s=settings.download_timeout_s,
        )
        lock = settings.cache_dir / ".locks" / plan.storage_dir.name / f"{metadata.etag}.lock"
        lock.parent.mkdir(parents=True, exist_ok=True)
        with WeakFileLock(lock):
            transferred = download.run()
    ask(
        lambda: hf_hub_download(
            plan.repo_id,
            planned.path,
            revision=plan.commit,
            cache_dir=settings.cache_dir,
            endpoint=settings.endpoint,
            etag_timeout=settings.metadata_timeout_s,
        ),
        f"linking {planned.path}",
    )
    return transferred


def pull_from_cache(request: PullRequest, settings: HubSettings) -> PullResult:
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
