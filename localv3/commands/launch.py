"""`localv3 launch sglang|vllm MODEL --gpus N`: hand a model that outgrows one box to SGLang or vLLM."""

from __future__ import annotations

import os
import sys
from typing import Annotated

import typer

from localv3.commands.options import ModelArgument
from localv3.launch import DEFAULT_PORT, ENGINES


def launch(
    engine: Annotated[str, typer.Argument(help=f"The serving engine: {' or '.join(ENGINES)}.")],
    model: ModelArgument,
    gpus: Annotated[int, typer.Option("--gpus", min=1, help="GPUs per node.")],
    nodes: Annotated[int, typer.Option("--nodes", min=1, help="Nodes, each with --gpus GPUs.")] = 1,
    node_rank: Annotated[int, typer.Option("--node-rank", min=0, help="This node's rank (0: the one clients talk to).")] = 0,
    master: Annotated[
        str | None, typer.Option("--master", help="HOST or HOST:PORT of node 0 (with --nodes > 1).")
    ] = None,
    host: Annotated[str, typer.Option("--host", help="Address the engine's API listens on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=1, max=65535, help="The engine's API port.")] = DEFAULT_PORT,
    ctx: Annotated[int | None, typer.Option("--ctx", min=1, help="Context length (default: the model's).")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the command instead of running it.")] = False,
) -> None:
    """Serve MODEL with SGLang or vLLM across GPUs and nodes (tensor + expert parallel)."""
    from localv3.launch import LaunchError, Topology, check_can_run, launch_command, launch_target

    if engine not in ENGINES:
        raise LaunchError(f"unknown engine {engine!r}; choose from {', '.join(ENGINES)}")
    topology = Topology(gpus=gpus, nodes=nodes, node_rank=node_rank, master=master)
    command = launch_command(engine, launch_target(model), topology, host=host, port=port, context=ctx)
    if dry_run:
        print(command.shell_line())
        return
    check_can_run(engine, topology)
    print(command.shell_line(), file=sys.stderr)
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, *command.module, *command.arguments])


def register(app: typer.Typer) -> None:
    app.command()(launch)
