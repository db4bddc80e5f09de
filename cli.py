"""The `localv3` command: a thin typer app. Each command lives in localv3/commands/<name>.py
and registers itself with `register(app)`; errors reach the user as one line on stderr."""

from __future__ import annotations

import os
import signal
import sys

# OpenMP threads that spin while waiting turn every small op into a wait for a time slice when
# the cores are shared (measured: 2 tok/s instead of 194 on the tiny model beside one busy
# process on 2 cores). Set before torch loads; OMP_WAIT_POLICY=ACTIVE in the environment wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import typer  # noqa: E402

from localv3.commands import register_all  # noqa: E402
from localv3.errors import LocalV3Error  # noqa: E402

app = typer.Typer(
    name="localv3",
    help="Run DeepSeek-V3-class MoE models on one GPU plus CPU RAM.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
register_all(app)


class Terminated(BaseException):
    """SIGTERM (`kill`, a service manager): unwind like Ctrl-C (work directories are removed), then exit
    143; not a KeyboardInterrupt, which chat takes as "stop this answer" and click as an abort."""


def _terminate(signum, frame) -> None:
    raise Terminated


def main() -> None:
    signal.signal(signal.SIGTERM, _terminate)
    try:
        # without standalone mode click returns the exit code of an aborted run (130 on Ctrl-C)
        exit_code = app(standalone_mode=False)
    except LocalV3Error as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
    except Terminated:
        print("terminated", file=sys.stderr)
        sys.exit(128 + signal.SIGTERM)
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
    sys.exit(exit_code if isinstance(exit_code, int) else 0)


if __name__ == "__main__":
    main()
