"""The `localv3` command: a thin typer app. Each command lives in localv3/commands/<name>.py
and registers itself with `register(app)`; errors reach the user as one line on stderr.

Start-up stays light: command modules import torch, transformers and llama.cpp inside the
commands that use them, so `--help`, `ls`, `rm`, `pull` and `plan` start without them."""

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

EXIT_ERROR = 1
EXIT_INTERRUPTED = 128 + signal.SIGINT
EXIT_TERMINATED = 128 + signal.SIGTERM
DEBUG_VARIABLE = "LOCALV3_DEBUG"  # set: unexpected errors print their traceback too

app = typer.Typer(
    name="localv3",
    help="Run DeepSeek-V3-class MoE models on one GPU plus CPU RAM.",
    add_completion=False,
    pretty_exceptions_enable=False,
)
register_all(app)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("localv3")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"


def _print_version(value: bool) -> None:
    if value:
        print(f"localv3 {_version()}")
        raise typer.Exit()


@app.callback(invoke_without_command=True)
def _top_level(
    ctx: typer.Context,
    version: bool = typer.Option(
        False, "--version", callback=_print_version, is_eager=True, help="Print localv3's version and exit."
    ),
) -> None:
    if ctx.invoked_subcommand is None:  # bare `localv3`: the help, and success
        print(ctx.get_help())
        raise typer.Exit()


class Terminated(BaseException):
    """SIGTERM (`kill`, a service manager): unwind like Ctrl-C (work directories are removed), then exit
    143; not a KeyboardInterrupt, which chat takes as "stop this answer" and click as an abort."""


def _terminate(signum, frame) -> None:
    raise Terminated


def _click_exception() -> type[Exception]:
    """The ClickException class of the click typer runs on: recent typer carries its own copy
    (typer._click), older typer uses the click package."""
    return next(cls for cls in typer.BadParameter.__mro__ if cls.__name__ == "ClickException")


def usage_message(exc: Exception) -> str:
    """One line for a click error: the message (it names the option or argument), and where
    the command's usage is described."""
    message = exc.format_message().rstrip(".")
    ctx = getattr(exc, "ctx", None)
    if ctx is not None:
        message += f" (see `{ctx.command_path} --help`)"
    return message


def _fail(message: str, code: int) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


def invoke(args: list[str]) -> None:
    """Parse `args` and run the command, leaving every outcome to main's handlers (click's own
    main would turn Ctrl-C into exit 130 without a word, and a closed pipe into exit 1)."""
    command = typer.main.get_command(app)
    with command.make_context("localv3", args) as ctx:
        command.invoke(ctx)


def main() -> None:
    if sys.stdout is None:  # started with stdout closed (`>&-`): nowhere to answer
        if sys.stderr is not None:
            print("error: standard output is closed; redirect it instead (>/dev/null discards it)", file=sys.stderr)
        sys.exit(EXIT_ERROR)
    signal.signal(signal.SIGTERM, _terminate)
    try:
        invoke(sys.argv[1:])
        sys.stdout.flush()  # a reader that went away shows here, not after exit as a failed flush
    except LocalV3Error as exc:
        _fail(str(exc), EXIT_ERROR)
    except Terminated:
        print("terminated", file=sys.stderr)
        sys.exit(EXIT_TERMINATED)
    except (KeyboardInterrupt, typer.Abort):  # Abort: a confirmation prompt answered with Ctrl-C
        print("interrupted", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)
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
        if isinstance(exc, _click_exception()):
            _fail(usage_message(exc), exc.exit_code)
        if os.environ.get(DEBUG_VARIABLE):
            import traceback

            traceback.print_exc()
        _fail(f"{str(exc).strip() or 'unexpected failure'} ({DEBUG_VARIABLE}=1 prints where)", EXIT_ERROR)
    sys.exit(0)


if __name__ == "__main__":
    main()
