"""`localv3 ls`: models on disk, in the hub cache and among localv3's quantized outputs."""

from __future__ import annotations

import json
import sys
from typing import Annotated

import typer

from localv3 import hub, registry


def register(app: typer.Typer) -> None:
    app.command("ls")(ls_command)


def stored_models() -> list[hub.StoredModel]:
    return hub.list_stored_models(registry.outputs_dir(), registry.load_registry().names_by_repo())


def ls_command(json_output: Annotated[bool, typer.Option("--json", help="Print the list as JSON.")] = False) -> None:
    """List downloaded and quantized models: name, size on disk, quantisation, path."""
    models = stored_models()
    if not models:
        print("no models on disk yet; `localv3 pull NAME` downloads one", file=sys.stderr)
    if json_output:
        print(json.dumps([model.to_dict() for model in models], indent=2))
        return
    rows = [("NAME", "SIZE", "QUANT", "PATH")]
    for model in models:
        quant = model.quant if model.complete else f"{model.quant} (incomplete)"
        rows.append((model.name, hub.format_bytes(model.size_bytes), quant, str(model.path)))
    widths = [max(len(row[column]) for row in rows) for column in range(3)]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[3])
