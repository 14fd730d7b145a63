"""The `ecoflap` command line: parses options, calls the stages, renders to stderr."""

from __future__ import annotations

import sys
from typing import Any

__all__ = ["app", "main"]


def main() -> None:
    """The console script: Ctrl-C even while the command line is still being imported, or while
    typer builds the commands (before any runs), ends in one line and exit code 130, not a traceback."""
    try:
        from ecoflap_cli.cli.app import main as run

        run()
    except KeyboardInterrupt:  # a command's own Ctrl-C is handled inside it (cli.app.user_errors)
        sys.stderr.write("error: interrupted: nothing was written\n")
        raise SystemExit(130) from None


def __getattr__(name: str) -> Any:
    if name == "app":
        from ecoflap_cli.cli.app import app

        return app
    raise AttributeError(name)
