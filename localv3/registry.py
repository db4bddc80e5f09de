"""The model registry (models.toml) and model-name resolution.

The packaged `localv3/models.toml` lists the known models; `$LOCALV3_HOME/models.toml`
(default `~/.localv3/models.toml`) may add entries or override fields of packaged ones.
`resolve_model_path` turns what a user typed (a registry name, a hub repo id, or a
directory) into a local directory; `config_for` gives that model's `ModelConfig`, falling
back to a shipped config for known models that are not downloaded yet.
"""

from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from localv3.config import SUPPORTED_MODEL_TYPES, ModelConfig
from localv3.errors import ConfigError, LocalV3Error, ModelNotFoundError
from localv3.formats.table import DENSE_SCHEMES, EXPERT_SCHEMES

PACKAGE_DIR = Path(__file__).resolve().parent
PACKAGED_REGISTRY = PACKAGE_DIR / "models.toml"
SHIPPED_CONFIGS_DIR = PACKAGE_DIR / "assets" / "configs"

FORMATS = ("hf", "gguf", "bundled")
EXPERT_QUANTS = EXPERT_SCHEMES
DENSE_QUANTS = DENSE_SCHEMES
REPO_ID_PATTERN = re.compile(r"[A-Za-z0-9][\w.\-]*/[\w.\-]+")


class RegistryError(LocalV3Error):
    """A models.toml file is malformed; the message names the file and the line."""


def localv3_home() -> Path:
    """localv3's own directory: `$LOCALV3_HOME`, else `~/.localv3`."""
    return Path(os.environ.get("LOCALV3_HOME") or Path.home() / ".localv3").expanduser()


def outputs_dir() -> Path:
    """Where `localv3 quantize` writes its models, one directory per model name."""
    return localv3_home() / "models"


def user_registry_path() -> Path:
    return localv3_home() / "models.toml"


@dataclass(frozen=True)
class RecommendedQuant:
    """The `localv3 quantize` choice that suits the model: `--experts` and `--dense`."""

    experts: str
    dense: str


@dataclass(frozen=True)
class ModelEntry:
    name: str
    description: str
    format: str  # "hf" | "gguf" | "bundled"
    family: str  # config.json model_type
    precision: str  # fp8 | bf16 | fp32 | a GGUF quant type
    repo: str | None = None
    revision: str = "main"
    path: str | None = None  # bundled models: relative to the localv3 package
    params_total_b: float | None = None
    params_active_b: float | None = None
    quant: RecommendedQuant | None = None
    allow: tuple[str, ...] = ()
    deny: tuple[str, ...] = ()
    config: str | None = None  # file name under localv3/assets/configs/
    aliases: tuple[str, ...] = ()
    tags: tuple[str, ...] = ()
    source: str = ""  # the models.toml that defined (or last overrode) the entry

    @property
    def spellings(self) -> tuple[str, ...]:
        """Every spec that names this entry: name, aliases, and NAME:TAG forms (any of
        them may also be written with `:latest`)."""
        return (self.name, *self.aliases, *(f"{self.name}:{tag}" for tag in self.tags))

    @property
    def bundled_path(self) -> Path | None:
        return PACKAGE_DIR / self.path if self.format == "bundled" and self.path else None

    @property
    def shipped_config_path(self) -> Path | None:
        return SHIPPED_CONFIGS_DIR / self.config if self.config else None


# ----- parsing ------------------------------------------------------------------------------

_STRING_FIELDS = ("description", "format", "family", "precision", "repo", "revision", "path", "config")
_NUMBER_FIELDS = ("params_total_b", "params_active_b")
_LIST_FIELDS = ("allow", "deny", "aliases", "tags")
_KNOWN_FIELDS = (*_STRING_FIELDS, *_NUMBER_FIELDS, *_LIST_FIELDS, "quant")


@dataclass(frozen=True)
class _RegistryFile:
    """One models.toml: its path, its text (to find lines), and its parsed `models` tables."""

    path: Path
    text: str
    tables: dict[str, dict[str, Any]]

    def header_line(self, name: str) -> int:
        """Line number of the `[models.NAME]` header (or the first line mentioning NAME)."""
        header = re.compile(rf"^\s*\[\s*models\s*\.\s*([\"']?){re.escape(name)}\1\s*\]", re.IGNORECASE)
        lines = self.text.splitlines()
        for number, line in enumerate(lines, start=1):
            if header.match(line):
                return number
        for number, line in enumerate(lines, start=1):
            if name in line.lower():
                return number
        return 1

    def key_line(self, name: str, key: str) -> int:
        """Line number of `key = ...` inside the NAME table; the header line if not found."""
        start = self.header_line(name)
        assignment = re.compile(rf"^\s*([\"']?){re.escape(key)}\1\s*=")
        for number, line in enumerate(self.text.splitlines()[start:], start=start + 1):
            if line.lstrip().startswith("["):
                break
            if assignment.match(line):
                return number
        return start

    def error(self, line: int, message: str) -> RegistryError:
        return RegistryError(f"{self.path}, line {line}: {message}")


def _read_registry_file(path: Path) -> _RegistryFile:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise RegistryError(f"{path}: cannot read ({exc})") from None
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        # tomllib reports "<problem> (at line N, column M)" or "<problem> (at end of document)"
        found = re.search(r"\(at line (\d+), column \d+\)", str(exc))
        line = int(found.group(1)) if found else max(len(text.splitlines()), 1)
        problem = str(exc).split(" (at ")[0]
        raise RegistryError(f"{path}, line {line}: invalid TOML: {problem}") from None
    registry_file = _RegistryFile(path=path, text=text, tables=document.get("models", {}))
    for key in document:
        if key != "models":
            line = _first_line_matching(text, rf"^\s*\[?\s*{re.escape(key)}\b")
            raise registry_file.error(line, f"unexpected top-level key {key!r}; entries go in [models.NAME] tables")
    if not isinstance(registry_file.tables, dict):
        line = _first_line_matching(text, r"^\s*models\b")
        raise registry_file.error(line, "models must be a table of [models.NAME] tables")
    for name, table in registry_file.tables.items():
        if not isinstance(table, dict):
            raise registry_file.error(registry_file.header_line(name), f"models.{name} must be a table")
    return registry_file


def _first_line_matching(text: str, pattern: str) -> int:
    compiled = re.compile(pattern)
    for number, line in enumerate(text.splitlines(), start=1):
        if compiled.match(line):
            return number
    return 1


def _entry_from_table(name: str, table: dict[str, Any], origin: _RegistryFile) -> ModelEntry:
    """Validate one merged `[models.NAME]` table; errors point into `origin`."""

    def fail(key: str | None, message: str) -> RegistryError:
        line = origin.key_line(name, key) if key else origin.header_line(name)
        return origin.error(line, f"model {name!r}: {message}")

    for key, value in table.items():
        if key not in _KNOWN_FIELDS:
            raise fail(key, f"unknown key {key!r} (known: {', '.join(_KNOWN_FIELDS)})")
        if key in _STRING_FIELDS and not (isinstance(value, str) and value.strip()):
            raise fail(key, f"{key} must be a non-empty string")
        if key in _NUMBER_FIELDS and (isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0):
            raise fail(key, f"{key} must be a positive number")
        if key in _LIST_FIELDS and not (isinstance(value, list) and all(isinstance(v, str) and v for v in value)):
            raise fail(key, f"{key} must be a list of non-empty strings")

    for key in ("description", "format", "family", "precision"):
        if key not in table:
            raise fail(None, f"missing required key {key!r}")
    entry_format = table["format"]
    if entry_format not in FORMATS:
        raise fail("format", f"format must be one of {', '.join(FORMATS)}, not {entry_format!r}")
    if table["family"] not in SUPPORTED_MODEL_TYPES:
        raise fail("family", f"family must be one of {', '.join(SUPPORTED_MODEL_TYPES)}, not {table['family']!r}")
    if entry_format == "bundled":
        if "path" not in table:
            raise fail(None, "a bundled model needs path = \"<directory inside the localv3 package>\"")
    else:
        if "repo" not in table:
            raise fail(None, f"a {entry_format} model needs repo = \"owner/name\"")
        if not REPO_ID_PATTERN.fullmatch(table["repo"]):
            raise fail("repo", f"repo must be a hub repo id owner/name, not {table['repo']!r}")
    if "config" in table and ("/" in table["config"] or not table["config"].endswith(".json")):
        raise fail("config", "config must be the file name of a JSON under localv3/assets/configs/")

    return ModelEntry(
        name=name,
        description=table["description"],
        format=entry_format,
        family=table["family"],
        precision=table["precision"],
        repo=table.get("repo"),
        revision=table.get("revision", "main"),
        path=table.get("path"),
        params_total_b=table.get("params_total_b"),
        params_active_b=table.get("params_active_b"),
        quant=_quant_from_table(table.get("quant"), fail),
        allow=tuple(table.get("allow", ())),
        deny=tuple(table.get("deny", ())),
        config=table.get("config"),
        aliases=tuple(alias.lower() for alias in table.get("aliases", ())),
        tags=tuple(tag.lower() for tag in table.get("tags", ())),
        source=str(origin.path),
    )


def _quant_from_table(value: Any, fail) -> RecommendedQuant | None:
    if value is None:
        return None
    if not isinstance(value, dict) or set(value) != {"experts", "dense"}:
        raise fail("quant", f'quant must be {{ experts = "{"|".join(EXPERT_QUANTS)}", dense = "{"|".join(DENSE_QUANTS)}" }}')
    if value["experts"] not in EXPERT_QUANTS:
        raise fail("quant", f"quant.experts must be one of {', '.join(EXPERT_QUANTS)}")
    if value["dense"] not in DENSE_QUANTS:
        raise fail("quant", f"quant.dense must be one of {', '.join(DENSE_QUANTS)}")
    return RecommendedQuant(experts=value["experts"], dense=value["dense"])


# ----- the registry -------------------------------------------------------------------------


@dataclass(frozen=True)
class Registry:
    entries: dict[str, ModelEntry]
    spellings: dict[str, str]  # lower-case spec -> entry name

    def find(self, spec: str) -> ModelEntry | None:
        spelling = spec.strip().lower()
        if spelling not in self.spellings:
            spelling = spelling.removesuffix(":latest")
        name = self.spellings.get(spelling)
        return self.entries[name] if name else None

    def names_by_repo(self) -> dict[str, str]:
        """Hub repo id -> the first registry name that fetches it."""
        names: dict[str, str] = {}
        for entry in self.entries.values():
            if entry.repo:
                names.setdefault(entry.repo, entry.name)
        return names


def load_registry() -> Registry:
    """The packaged registry with the user's file (if any) merged over it."""
    packaged = _read_registry_file(PACKAGED_REGISTRY)
    files = [packaged]
    user_path = user_registry_path()
    if user_path.is_file():
        files.append(_read_registry_file(user_path))

    merged: dict[str, dict[str, Any]] = {}
    origins: dict[str, _RegistryFile] = {}
    for registry_file in files:
        for raw_name, table in registry_file.tables.items():
            name = raw_name.lower()
            merged[name] = {**merged.get(name, {}), **table}
            origins[name] = registry_file

    entries: dict[str, ModelEntry] = {}
    spellings: dict[str, str] = {}
    for name, table in merged.items():
        origin = origins[name]
        entry = _entry_from_table(name, table, origin)
        entries[name] = entry
        for spelling in entry.spellings:
            owner = spellings.setdefault(spelling, name)
            if owner != name:
                line = origin.key_line(name, "aliases") if spelling in entry.aliases else origin.header_line(name)
                raise origin.error(line, f"model {name!r}: {spelling!r} already names model {owner!r}")
    return Registry(entries=entries, spellings=spellings)


def find_model(spec: str) -> ModelEntry | None:
    """The registry entry named by `spec` (name, alias, or NAME:TAG), or None."""
    return load_registry().find(spec)


# ----- resolution ---------------------------------------------------------------------------


def _is_explicit_path(spec: str) -> bool:
    return spec.startswith((".", "~", os.sep)) or os.sep in spec


def _is_dir(path: Path) -> bool:
    """Path.is_dir, but False for a name the file system cannot hold (too long, a NUL byte)."""
    try:
        return path.is_dir()
    except (OSError, ValueError):
        return False


def _shown(spec: str) -> str:
    """`spec` quoted for a message, shortened when someone pasted a page into it."""
    return repr(spec) if len(spec) <= 80 else f"{spec[:60]!r}... ({len(spec):,} characters)"


def resolve_model_dir(model: str | Path) -> Path:
    """A model directory (resolved: `.` is the directory's own name), else what
    `resolve_model_path` finds for the name."""
    path = Path(model).expanduser()
    return path.resolve() if _is_dir(path) else resolve_model_path(str(model))


def resolve_model_path(spec: str, offline: bool = False) -> Path:
    """The local directory holding the model `spec` names.

    A directory path is itself. The name of a quantized output (`$LOCALV3_HOME/models/<spec>`,
    e.g. `deepseek-v3-q4` as `localv3 quantize` names it) is that directory. A registry name
    is, in order: the bundled directory, the quantized output `$LOCALV3_HOME/models/<name>`,
    or the pulled hub snapshot. A hub repo
    id `owner/name` is its pulled snapshot. Anything else raises ModelNotFoundError with a hint.
    `offline` only shapes the hint: resolution never touches the network.
    """
    local = Path(spec).expanduser()
    if _is_explicit_path(spec) and _is_dir(local):
        return local.resolve()
    quantized_output = outputs_dir() / spec
    if "/" not in spec and _is_dir(quantized_output):
        return quantized_output
    entry = find_model(spec)
    if entry is not None:
        return _entry_path(entry, offline)
    if _is_dir(local):
        return local.resolve()
    if REPO_ID_PATTERN.fullmatch(spec):
        from localv3.hub import cached_snapshot  # huggingface_hub costs ~0.3 s to import: only for repo ids

        snapshot = cached_snapshot(spec)
        if snapshot is not None:
            _require_complete(snapshot, spec, offline)
            return snapshot
        raise ModelNotFoundError(f"{spec} is not downloaded; {_pull_hint(spec, offline)}")
    raise ModelNotFoundError(
        f"unknown model {_shown(spec)}: not a models.toml name, a directory, or a hub repo id (owner/name); "
        "`localv3 ls` lists downloaded models"
    )


def _entry_path(entry: ModelEntry, offline: bool) -> Path:
    if entry.bundled_path is not None:
        if not entry.bundled_path.is_dir():
            raise ModelNotFoundError(
                f"bundled model {entry.name!r} is missing from this installation ({entry.bundled_path})"
            )
        return entry.bundled_path
    quantized = outputs_dir() / entry.name
    if quantized.is_dir():
        return quantized
    from localv3.hub import cached_snapshot

    snapshot = cached_snapshot(entry.repo, entry.revision)
    if snapshot is None:
        raise ModelNotFoundError(f"{entry.name} is not downloaded; {_pull_hint(entry.name, offline)}")
    _require_complete(snapshot, entry.name, offline)
    return snapshot


def _require_complete(snapshot: Path, spec: str, offline: bool) -> None:
    from localv3.hub import snapshot_problem

    problem = snapshot_problem(snapshot)
    if problem:
        raise ModelNotFoundError(f"{spec} is only partly downloaded ({problem}); {_pull_hint(spec, offline)}")


def _pull_hint(spec: str, offline: bool) -> str:
    if offline:
        return f"offline mode is on: run `localv3 pull {spec}` while online"
    return f"run: localv3 pull {spec}"


def config_for(spec: str) -> ModelConfig:
    """The ModelConfig of `spec`: its config.json when it is local, else (for a registry
    entry that is not downloaded) the config shipped in localv3/assets/configs/."""
    entry = find_model(spec)
    try:
        path = resolve_model_path(spec)
    except ModelNotFoundError:
        if entry is None or entry.shipped_config_path is None:
            raise
        return _shipped_config(entry)
    if (path / "config.json").is_file():
        return ModelConfig.from_file(path)
    if entry is not None and entry.shipped_config_path is not None:
        return _shipped_config(entry)
    raise ConfigError(f"{path}: no config.json, and no shipped config is known for {spec!r}")


def _shipped_config(entry: ModelEntry) -> ModelConfig:
    path = entry.shipped_config_path
    if not path.is_file():
        raise ConfigError(f"shipped config {path.name} for {entry.name!r} is missing from this installation ({path})")
    return ModelConfig.from_file(path)
