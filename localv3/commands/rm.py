"""`localv3 rm NAME`: delete a model from the hub cache or localv3's quantized outputs."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from localv3.commands.ls import matches, stored_models
from localv3.errors import LocalV3Error, ModelNotFoundError
from localv3.render import format_bytes


def register(app: typer.Typer) -> None:
    app.command("rm")(rm_command)


def rm_command(
    model: Annotated[str, typer.Argument(help="A name or repo id as `localv3 ls` shows it, or a models.toml name.")],
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
) -> None:
    """Delete a downloaded or quantized model.

    Every copy the name matches (hub download, quantized output) is listed, then deleted.
    """
    from localv3 import hub, registry

    entry = registry.find_model(model)
    targets = [stored for stored in stored_models() if matches(stored, model, entry)]
    if not targets and entry is not None and entry.format == "bundled":
        raise LocalV3Error(f"{entry.name} is bundled with localv3 (part of the installation), so there is nothing to remove")
    if not targets:
        raise ModelNotFoundError(f"{model!r} is not on disk (`localv3 ls` lists what is)")
    for target in targets:
        print(f"{target.name}: {format_bytes(target.size_bytes)} at {target.path}", file=sys.stderr)
    if not yes:
        if not sys.stdin.isatty():
            raise LocalV3Error("not deleting without --yes: stdin is not a terminal to confirm on")
        typer.confirm(f"delete {len(targets)} model(s)?", abort=True, err=True)
    for target in targets:
        hub.remove_stored_model(target)
        print(target.path)

