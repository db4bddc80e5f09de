"""The hub cache and localv3's outputs on disk: is a snapshot whole, what is stored, removal."""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

from huggingface_hub import scan_cache_dir, snapshot_download
from huggingface_hub.errors import CacheNotFound, HFValidationError, LocalEntryNotFoundError

from localv3.formats.table import DTYPE_SCHEMES
from localv3.hub.settings import PARTIAL_SUFFIX, HubSettings, is_weight_file
from localv3.quantized import MANIFEST_NAME


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
    weights = [p for p in snapshot.rglob("*") if is_weight_file(p.name) and p.exists()]
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
    return DTYPE_SCHEMES.get(dtype, str(dtype or "-"))


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
