"""`localv3 serve`: one model, loaded once, behind an OpenAI-compatible HTTP API."""

from __future__ import annotations

import ipaddress
import sys
from typing import Annotated

import typer

from localv3.commands.options import DEFAULT_MODEL, Context, EngineName, ModelArgument, Mtp
from localv3.errors import LocalV3Error

DEFAULT_SESSIONS = 4


def serve(
    model: ModelArgument = DEFAULT_MODEL,
    host: Annotated[str, typer.Option("--host", help="Address to listen on (0.0.0.0: every interface).")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=0, max=65535, help="TCP port (0: any free one).")] = 8000,
    api_key: Annotated[
        str | None,
        typer.Option(
            "--api-key", envvar="LOCALV3_API_KEY", help="Require `Authorization: Bearer KEY` on every request."
        ),
    ] = None,
    served_name: Annotated[
        str | None, typer.Option("--served-model-name", help="The model name clients send (default: MODEL).")
    ] = None,
    ctx: Context = None,
    sessions: Annotated[
        int | None,
        typer.Option(
            "--sessions",
            min=1,
            help=f"Conversations kept in the KV cache for prefix reuse, each a full context (default: as many as"
            f" the plan leaves memory for, up to {DEFAULT_SESSIONS}).",
        ),
    ] = None,
    mtp: Mtp = None,
    engine: EngineName = None,
    verbose: Annotated[bool, typer.Option("--verbose", help="Log every request on stderr.")] = False,
) -> None:
    """Serve MODEL over an OpenAI-compatible API (/v1/chat/completions, /v1/completions, /v1/models)."""
    from localv3.engine_choice import default_engine, weights_path
    from localv3.serve.app import AppSettings
    from localv3.serve.server import Service, ServerSettings

    engine = engine or default_engine(model)
    weights_path(model, engine)  # an unknown model fails here, before anything listens
    name = served_name or model
    settings = ServerSettings(host=host, port=port, app=AppSettings(served_name=name, api_key=api_key), access_log=verbose)
    if not api_key and not _is_loopback(host):
        print(f"warning: listening on {host} without --api-key: anyone who reaches this port can use the model", file=sys.stderr)

    def load():
        from localv3.engine_choice import open_engine
        from localv3.render import format_bytes
        from localv3.serve.sessions import sessions_that_fit
        from localv3.serve.turns import Served

        loaded = open_engine(model, engine, max_context=ctx, with_mtp=mtp is not False)
        if loaded.tokenizer is None:
            raise LocalV3Error(f"{model} has no tokenizer.json, so it cannot serve text")
        loaded.kept_sessions = sessions or sessions_that_fit(loaded, DEFAULT_SESSIONS)
        cache = format_bytes(loaded.kv_bytes_per_token * loaded.max_context)
        print(
            f"serving {name} at {service.url}/v1 ({loaded.placement}; context {loaded.max_context} tokens, "
            f"up to {loaded.kept_sessions} conversations cached at {cache} each)",
            file=sys.stderr,
        )
        return Served.of(loaded, speculative=mtp)

    service = Service(settings, load)
    print(f"loading {model}; {service.url}/v1 answers 503 until it is ready", file=sys.stderr)
    service.run()
    print("stopped", file=sys.stderr)


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def register(app: typer.Typer) -> None:
    app.command()(serve)
