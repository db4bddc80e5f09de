"""`localv3 show MODEL`: architecture and checkpoint facts; validates the checkpoint."""

from __future__ import annotations

import json

import typer
from rich.console import Console
from rich.table import Table


def show(
    model: str = typer.Argument("tiny", help="models.toml name, pulled hub repo id, or model directory"),
    as_json: bool = typer.Option(False, "--json", help="print the summary as JSON"),
) -> None:
    """Show a model's architecture and validate its checkpoint (reads headers, not weights)."""
    from localv3.registry import resolve_model_dir
    from localv3.model_summary import summarize

    summary = summarize(resolve_model_dir(model))
    if as_json:
        print(json.dumps(summary.to_dict()))
        return
    table = Table(show_header=False, box=None)
    for key, value in summary.to_dict().items():
        table.add_row(key.replace("_", " "), f"{value:,}" if isinstance(value, int) else str(value))
    Console().print(table)


def register(app: typer.Typer) -> None:
    app.command("show")(show)
