"""Hugging Face Hub access: pull, look up, list and delete models. The only package that
imports huggingface_hub.

- settings.py: HF_ENDPOINT, HF_HOME / HF_HUB_CACHE, HF_HUB_OFFLINE and the request timeouts
  (HF_HUB_ETAG_TIMEOUT, HF_HUB_DOWNLOAD_TIMEOUT), read when a function is called, not at
  import; HF_TOKEN is read by huggingface_hub on every request. The errors.
- calls.py: every metadata request with a timeout, retried when it fails transiently.
- pulling.py: the dry run, the disk check, then the files, weights last.
- download.py: our own resumable transfer (why: see its docstring).
- cache.py: whether a snapshot is whole; listing and removing stored models.

What this relies on in the hub cache layout (huggingface_hub's own, so its tools and ours see
the same files): `models--OWNER--NAME/blobs/<etag>` holds each file once,
`snapshots/<commit>/<path>` links to it, `refs/<branch>` names the commit. We write only into
`blobs/` (a `.localv3-partial` file beside the blob it becomes) and `refs/`; huggingface_hub
links finished blobs into the snapshot.
"""

from localv3.hub.cache import StoredModel, cached_snapshot, list_stored_models, remove_stored_model, snapshot_problem
from localv3.hub.progress import PullProgress, QuietProgress
from localv3.hub.pulling import PlannedFile, PullPlan, PullRequest, PullResult, check_disk_space, fetch, plan_pull, pull
from localv3.hub.settings import (
    PARTIAL_SUFFIX,
    DownloadError,
    HubAccessError,
    HubSettings,
    InsufficientDiskError,
)

__all__ = [
    "PARTIAL_SUFFIX",
    "DownloadError",
    "HubAccessError",
    "HubSettings",
    "InsufficientDiskError",
    "PlannedFile",
    "PullPlan",
    "PullProgress",
    "PullRequest",
    "PullResult",
    "QuietProgress",
    "StoredModel",
    "cached_snapshot",
    "check_disk_space",
    "fetch",
    "list_stored_models",
    "plan_pull",
    "pull",
    "remove_stored_model",
    "snapshot_problem",
]
