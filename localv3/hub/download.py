"""One file into the hub cache, resumably: bytes are appended to `blobs/<etag>.localv3-partial`
with HTTP Range requests and the file is renamed to `blobs/<etag>` when whole. huggingface_hub's
own download restarts a file cut off in an earlier run; for checkpoints of hundreds of GB a
pull must go on from the bytes already on disk, in this run or the next."""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import httpx2
from huggingface_hub.utils import get_session

from localv3.hub.calls import RETRYABLE_STATUS, notice_if_slow
from localv3.hub.progress import PullProgress
from localv3.hub.settings import DEFAULT_REQUEST_TIMEOUT_S, PARTIAL_SUFFIX, DownloadError
from localv3.render import format_bytes

# After an attempt that saved no new bytes, wait this long and try again; when the delays
# are used up the pull stops (the next run resumes). An attempt that saved bytes resets them.
STALLED_RETRY_DELAYS_S = (1.0, 4.0, 15.0)
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
_HASH_BLOCK_BYTES = 8 << 20


class ServerBusy(Exception):
    """A temporary server-side refusal (429, 5xx): retried like a broken connection."""


def _content_range_start(header: str) -> int | None:
    found = re.match(r"bytes (\d+)-", header)
    return int(found.group(1)) if found else None


@dataclass
class ResumableDownload:
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
            except (httpx2.TransportError, ServerBusy) as exc:
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
            with notice_if_slow(self.progress, f"connecting to {urlsplit(self.url).netloc} for {self.label} ..."):
                response = open_stream.enter_context(
                    get_session().stream(
                        "GET", self.url, headers=headers, timeout=self.timeout_s, follow_redirects=True
                    )
                )
            if response.status_code in RETRYABLE_STATUS:
                raise ServerBusy(f"HTTP {response.status_code}")
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
