"""`localv3 pull NAME|REPO_ID`: download a model into the Hugging Face cache, resumably."""

from __future__ import annotations

import json
import sys
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

from localv3.commands.progress_bar import stop_progress
from localv3.errors import ModelNotFoundError
from localv3.render import format_bytes

if TYPE_CHECKING:
    from localv3 import hub, registry


def register(app: typer.Typer) -> None:
    app.command("pull")(pull_command)


def pull_command(
    model: Annotated[str, typer.Argument(help="A models.toml name (e.g. deepseek-v3) or a hub repo id owner/name.")],
    revision: Annotated[
        str | None, typer.Option(help="Branch, tag or commit (default: the registry's pin, else main).")
    ] = None,
    include: Annotated[
        list[str],
        typer.Option(help="Fetch only files matching this pattern (repeatable); replaces the registry's patterns."),
    ] = [],
    exclude: Annotated[list[str], typer.Option(help="Skip files matching this pattern (repeatable).")] = [],
    offline: Annotated[bool, typer.Option(help="Use the local cache only (as HF_HUB_OFFLINE=1 does).")] = False,
    json_output: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Download a model into the Hugging Face cache; re-running resumes an interrupted pull.

    A dry run comes first (sizes, bytes already cached, free disk), then config and
    tokenizer files, then the weight shards.
    """
    from localv3 import hub, registry

    entry = registry.find_model(model)
    if entry is not None and entry.format == "bundled":
        path = registry.resolve_model_path(entry.name)
        _say(f"{entry.name} is bundled with localv3: nothing to download")
        _print_result({"name": entry.name, "path": str(path), "fetched_bytes": 0}, str(path), json_output)
        return

    request = _request_for(model, entry, revision, include, exclude, offline)
    with _TerminalProgress() as progress:
        result = hub.pull(request, progress)
    _say(
        f"{request.repo_id}: {result.files} files, {format_bytes(result.total_bytes)} "
        f"({format_bytes(result.fetched_bytes)} fetched now) at {result.path}"
    )
    name = entry.name if entry is not None else request.repo_id
    _print_result({"name": name, **result.to_dict()}, str(result.path), json_output)


def _request_for(
    model: str,
    entry: registry.ModelEntry | None,
    revision: str | None,
    include: list[str],
    exclude: list[str],
    offline: bool,
) -> hub.PullRequest:
    from localv3 import hub, registry

    if entry is not None:
        return hub.PullRequest(
            repo_id=entry.repo,
            revision=revision or entry.revision,
            allow=tuple(include) or entry.allow,
            deny=(*entry.deny, *exclude),
            offline=offline,
        )
    if not registry.REPO_ID_PATTERN.fullmatch(model):
        raise ModelNotFoundError(f"unknown model {model!r}: not a models.toml name and not a hub repo id owner/name")
    return hub.PullRequest(
        repo_id=model, revision=revision or "main", allow=tuple(include), deny=tuple(exclude), offline=offline
    )


def _say(line: str) -> None:
    print(line, file=sys.stderr)


def _print_result(data: dict, path: str, json_output: bool) -> None:
    print(json.dumps(data) if json_output else path)


class _TerminalProgress:
    """The dry-run summary and a byte progress bar, on stderr."""

    def __init__(self) -> None:
        self.plan: hub.PullPlan | None = None
        self.bar: Progress | None = None  # started by the first byte, so a refused pull shows none
        self.task = None

    def __enter__(self) -> "_TerminalProgress":
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        if self.bar is not None:
            stop_progress(self.bar, exc_type)

    def planned(self, plan: hub.PullPlan) -> None:
        self.plan = plan
        size = format_bytes
        _say(
            f"{plan.repo_id}@{plan.revision} ({plan.commit[:12]}): {len(plan.files)} files, {size(plan.total_bytes)}; "
            f"cached {size(plan.cached_bytes)}, partial {size(plan.partial_bytes)}; "
            f"to download {size(plan.bytes_to_fetch)}, free {size(plan.free_bytes)}"
        )

    def waiting(self, message: str) -> None:
        if self.bar is not None:
            self.bar.console.print(message)  # above the live bar, not through it
        else:
            _say(message)

    def advanced(self, nbytes: int) -> None:
        if self.bar is None:
            self.bar = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                DownloadColumn(),
                TransferSpeedColumn(),
                TimeRemainingColumn(),
                console=Console(stderr=True),
            )
            done = self.plan.cached_bytes + self.plan.partial_bytes
            self.task = self.bar.add_task(self.plan.repo_id, total=self.plan.total_bytes, completed=done)
            self.bar.start()
        self.bar.advance(self.task, nbytes)
