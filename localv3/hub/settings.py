"""Hub settings read from the environment when asked (never at import), localv3's hub errors,
and the facts of the hub cache layout the rest of the package relies on."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import constants
from huggingface_hub.file_download import repo_folder_name

from localv3.errors import LocalV3Error

PARTIAL_SUFFIX = ".localv3-partial"  # beside the blob it becomes: blobs/<etag>.localv3-partial
WEIGHT_SUFFIXES = (".safetensors", ".gguf", ".bin", ".pt", ".pth")
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


def repo_storage(cache_dir: Path, repo_id: str) -> Path:
    return cache_dir / repo_folder_name(repo_id=repo_id, repo_type="model")


def is_weight_file(path: str) -> bool:
    return path.endswith(WEIGHT_SUFFIXES)

