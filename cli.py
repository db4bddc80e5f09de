"""The design card's `cli.py`. The `localv3` command itself is localv3/cli.py, installed as
`localv3.cli` so that the wheel puts no top-level module named `cli` into site-packages;
`python cli.py ARGS` from a checkout runs it."""

from localv3.cli import app, main

__all__ = ["app", "main"]

if __name__ == "__main__":
    main()
