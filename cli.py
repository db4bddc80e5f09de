"""The `localv3` command: a thin typer app. Each command lives in localv3/commands/<name>.py
and registers itself with `register(app)`; errors reach the user as one line on stderr."""

from __future__ import annotations

import os
import sys

import typer

from localv3.commands import register_all
from localv3.errors import LocalV3Error

app = typer.Typer(
    name="localv3",
    help="Run DeepSeek-V3-class MoE models on one GPU plus CPU RAM.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
register_all(app)


def main() -> None:
    try:
        app(standalone_mode=False)
    except LocalV3Error as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
    except (KeyboardInterrupt, typer.Abort):
        # click turns Ctrl-C into Abort when it does not own the exit (standalone_mode=False)
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except BrokenPipeError:
        # the reader went away (`localv3 run ... | head`): stop quietly
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        sys.exit(0)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except SystemExit:
        raise
    except Exception as exc:  # click usage errors and anything unexpected: still one line
        import click

        if isinstance(exc, click.ClickException):
            exc.show()
            sys.exit(exc.exit_code)
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
