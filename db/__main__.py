"""python -m db upgrade | python -m db query "SQL" [--format table|csv|json]"""

from __future__ import annotations

import sys

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
    from db.session import embedded_store_notice, make_engine, wait_for_database

    settings = load_settings()
    notice = embedded_store_notice(settings)
    if notice:
        click.echo(notice, err=True)
    engine = make_engine(settings.db_url)
    try:
        wait_for_database(engine, timeout=wait_s)
        before, after = do_upgrade(engine)
    finally:
        engine.dispose()
    was = "unchanged" if before == after else f"was {before or 'empty'}"
    where = engine.url.render_as_string(hide_password=True)
    click.echo(f"database at head: {where} (revision {after}, {was})")


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

    settings = load_settings()
    _check_embedded(settings)
    result = run_query(settings.db_url, sql)
    if fmt == "json":
        click.echo(to_json(result))
    elif fmt == "csv":
        click.echo(to_csv(result), nl=False)
    else:
        from rich.console import Console

        # Piped output gets a wide page instead of rich's 80 columns, so cells don't fold.
        width = None if sys.stdout.isatty() else 400
        Console(soft_wrap=False, width=width).print(to_table(result))
        click.echo(f"({len(result.rows)} row{'s' if len(result.rows) != 1 else ''})")


def _check_embedded(settings) -> None:
    """Say which file the embedded default is; refuse one that does not exist (a query
    from the wrong folder would otherwise read a new, empty store)."""
    from db.errors import DatabaseUnavailable
    from db.session import embedded_store_file, embedded_store_notice, shown_path

    path = embedded_store_file(settings)
    if path is None:
        return
    click.echo(embedded_store_notice(settings), err=True)
    if not path.exists():
        raise DatabaseUnavailable(
            f"no embedded store at {shown_path(path)} (FLEETSCRIBE_DATABASE_URL unset): "
            "nothing was stored under this FLEETSCRIBE_HOME; set FLEETSCRIBE_HOME to the "
            "folder that holds it (make demo: .fleetscribe/demo) or FLEETSCRIBE_DATABASE_URL"
        )


if __name__ == "__main__":
    run(cli, "python -m db")
