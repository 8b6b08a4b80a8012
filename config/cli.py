"""What every `python -m ...` entry point shares: expected errors become one line, exit 2."""

from __future__ import annotations

import sys

import click
from rich.console import Console
from rich.markup import escape

from config.errors import ExpectedError

err_console = Console(stderr=True, highlight=False)


def run(command: click.Command, prog_name: str) -> None:
    """Run a click command; expected failures print `error: ...` and exit 2, no traceback."""
    try:
        command.main(prog_name=prog_name, standalone_mode=False)
    except click.exceptions.Abort:
        err_console.print("aborted")
        sys.exit(130)
    except click.UsageError as e:
        # A wrong option or argument is an expected failure too: one line, exit 2.
        hint = f" (see {e.ctx.command_path} --help)" if e.ctx is not None else ""
        err_console.print(
            f"[red]error:[/red] {escape(e.format_message())}{hint}", markup=True, soft_wrap=True
        )
        sys.exit(2)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except ExpectedError as e:
        err_console.print(f"[red]error:[/red] {escape(str(e))}", markup=True, soft_wrap=True)
        sys.exit(2)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
