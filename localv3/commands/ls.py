"""`localv3 ls`: the models that run now (bundled, downloaded, quantized); `ls --all` adds every
models.toml entry, with whether it is on disk or still to pull."""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Annotated

import typer

from localv3.render import format_bytes

if TYPE_CHECKING:
    from localv3.hub import StoredModel
    from localv3.registry import ModelEntry, Registry

NOT_PULLED = "not pulled"


def register(app: typer.Typer) -> None:
    app.command("ls")(ls_command)


def stored_models() -> list[StoredModel]:
    """Downloads in the hub cache and localv3's quantized outputs (what `rm` can delete)."""
    from localv3 import hub, registry

    return hub.list_stored_models(registry.outputs_dir(), registry.load_registry().names_by_repo())


def bundled_models(models: Registry) -> list[StoredModel]:
    """The models shipped inside the package: they run without a download."""
    from localv3.hub import StoredModel

    bundled = []
    for entry in models.entries.values():
        path = entry.bundled_path
        if path is not None and path.is_dir():
            size = sum(file.stat().st_size for file in path.rglob("*") if file.is_file())
            bundled.append(StoredModel(entry.name, "bundled", size, entry.precision, path, complete=True))
    return bundled


def matches(stored: StoredModel, spec: str, entry: ModelEntry | None) -> bool:
    """Whether `stored` is a copy of the model that `spec` (and its registry entry) names."""
    if spec in (stored.name, stored.repo_id):
        return True
    if entry is None:
        return False
    return stored.name == entry.name or (stored.source == "hub" and stored.repo_id == entry.repo)


@dataclass
class CatalogueRow:
    """One model `ls --all` lists: a models.toml entry, or a model on disk that none names."""

    name: str
    status: str  # bundled | on disk | partial | not pulled
    params_total_b: float | None
    params_active_b: float | None
    precision: str
    description: str
    paths: list[str]

    def params(self) -> str:
        if self.params_total_b is None:
            return "-"
        active = f" ({self.params_active_b:g}B active)" if self.params_active_b is not None else ""
        return f"{self.params_total_b:g}B{active}"


def catalogue(models: Registry, on_disk: list[StoredModel]) -> list[CatalogueRow]:
    """Every models.toml entry with its status, then the models on disk that no entry names."""
    rows, claimed = [], set()
    for entry in models.entries.values():
        copies = [stored for stored in on_disk if matches(stored, entry.name, entry)]
        claimed.update(id(stored) for stored in copies)
        if entry.format == "bundled":
            status = "bundled"
        elif any(stored.complete for stored in copies):
            status = "on disk"
        else:
            status = "partial" if copies else NOT_PULLED
        paths = [str(stored.path) for stored in copies]
        rows.append(
            CatalogueRow(
                entry.name, status, entry.params_total_b, entry.params_active_b, entry.precision, entry.description, paths
            )
        )
    for stored in on_disk:
        if id(stored) not in claimed:
            status = "on disk" if stored.complete else "partial"
            rows.append(CatalogueRow(stored.name, status, None, None, stored.quant, "-", [str(stored.path)]))
    return rows


def print_columns(rows: list[tuple[str, ...]]) -> None:
    """Left-aligned columns two spaces apart; the last column is not padded."""
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]) - 1)]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[-1])


def ls_command(
    all_models: Annotated[
        bool, typer.Option("--all", "-a", help="Also list every models.toml entry, pulled or not.")
    ] = False,
    json_output: Annotated[bool, typer.Option("--json", help="Print the list as JSON.")] = False,
) -> None:
    """List the models that run here (bundled, downloaded, quantized); --all adds those to pull."""
    from localv3 import registry

    models = registry.load_registry()
    on_disk = stored_models()
    if all_models:
        rows = catalogue(models, on_disk)
        if json_output:
            print(json.dumps([asdict(row) for row in rows], indent=2))
            return
        header = ("NAME", "STATUS", "PARAMS", "PRECISION", "DESCRIPTION")
        print_columns([header, *((r.name, r.status, r.params(), r.precision, r.description) for r in rows)])
        return
    listed = [*bundled_models(models), *on_disk]
    if not on_disk:
        print("nothing downloaded yet; `localv3 ls --all` lists the models `localv3 pull NAME` fetches", file=sys.stderr)
    if json_output:
        print(json.dumps([model.to_dict() for model in listed], indent=2))
        return
    rows = [("NAME", "SIZE", "QUANT", "PATH")]
    for model in listed:
        quant = model.quant if model.complete else f"{model.quant} (incomplete)"
        rows.append((model.name, format_bytes(model.size_bytes), quant, str(model.path)))
    print_columns(rows)
