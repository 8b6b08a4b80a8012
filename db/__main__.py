"""python -m db upgrade | python -m db query "SQL" [--format table|csv|json]"""

from __future__ import annotations

import click

from config.cli import run
from config.settings import load_settings


@click.group(help="The fleetscribe store: migrations and read-only SQL.")
def cli() -> None:
    pass


@cli.command(help="Create or upgrade the database schema to the newest revision.")
@click.option(
    "--wait", "wait_s", default=60.0, show_default=True, help="Seconds to wait for the DB."
)
def upgrade(wait_s: float) -> None:
    from db.migrate import upgrade as do_upgrade
    from db.session import make_engine, wait_for_database

    settings = load_settings()
    engine = make_engine(settings.db_url)
    wait_for_database(engine, timeout=wait_s)
    do_upgrade(engine)
    click.echo(f"database at head: {engine.url.render_as_string(hide_password=True)}")


@cli.command(help="Run one read-only SQL statement and print the rows.")
@click.argument("sql")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["table", "csv", "json"]),
    default="table",
    show_default=True,
)
def query(sql: str, fmt: str) -> None:
    from db.query import run_query, to_csv, to_json, to_table

    result = run_query(load_settings().db_url, sql)
    if fmt == "json":
        click.echo(to_json(result))
    elif fmt == "csv":
        click.echo(to_csv(result), nl=False)
    else:
        import sys

        from rich.console import Console

        # Piped output gets a wide page instead of rich's 80 columns, so cells don't fold.
        width = None if sys.stdout.isatty() else 400
        Console(soft_wrap=False, width=width).print(to_table(result))
        click.echo(f"({len(result.rows)} row{'s' if len(result.rows) != 1 else ''})")


if __name__ == "__main__":
    run(cli, "python -m db")
