"""One hub request: a timeout on it, another try after a transient failure (no connection,
no answer in time, a busy server), "connecting to ..." when it is slow, and one-line errors."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

import httpx2
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    HFValidationError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from localv3.errors import ModelNotFoundError
from localv3.hub.progress import PullProgress
from localv3.hub.settings import HubAccessError, HubSettings

T = TypeVar("T")
# A metadata request (repo listing, file HEAD) that fails to connect or times out is tried again
# after each of these delays, then the pull stops with one line.
REQUEST_RETRY_DELAYS_S = (1.0, 3.0)
# A request still unanswered after this long shows "connecting to ..." on stderr.
SLOW_REQUEST_NOTICE_S = 1.0


@contextlib.contextmanager
def _hub_errors(repo_id: str, revision: str, endpoint: str) -> Iterator[None]:
    """Turn huggingface_hub's exceptions into one-line localv3 errors (network failures are
    ask_hub's: it retries them, then says so)."""
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


RETRYABLE_STATUS = (429, 500, 502, 503, 504)


def _is_transient(exc: Exception) -> bool:
    """A failure worth another try: no connection, a timeout, or a busy server."""
    if isinstance(exc, httpx2.TransportError):
        return True
    response = getattr(exc, "response", None)
    return isinstance(exc, HfHubHTTPError) and getattr(response, "status_code", None) in RETRYABLE_STATUS


@contextlib.contextmanager
def notice_if_slow(progress: PullProgress, message: str) -> Iterator[None]:
    """Tell the user what we wait for when a request is not answered within a second."""
    timer = threading.Timer(SLOW_REQUEST_NOTICE_S, progress.waiting, args=(message,))
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


def ask_hub(
    call: Callable[[], T], *, what: str, repo_id: str, revision: str, settings: HubSettings, progress: PullProgress
) -> T:
    """`call()` (a metadata request about `repo_id@revision`, with settings.metadata_timeout_s),
    tried again after each of REQUEST_RETRY_DELAYS_S when it fails transiently; one line naming
    the endpoint and the last failure when every try failed, or the hub's refusal."""
    endpoint = settings.endpoint
    with _hub_errors(repo_id, revision, endpoint):
        for attempt in range(len(REQUEST_RETRY_DELAYS_S) + 1):
            try:
                with notice_if_slow(progress, f"connecting to {endpoint} ({what}) ..."):
                    return call()
            except Exception as exc:
                if not _is_transient(exc):
                    raise
                problem = _describe_failure(exc, settings.metadata_timeout_s)
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
