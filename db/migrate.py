"""Schema migrations, driven from code so no alembic.ini is needed: `upgrade` (what
`python -m db upgrade` runs) and `check_revision` (what every other command runs: it
refuses a database whose schema is not the one this code needs, and changes nothing)."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util.exc import CommandError
from sqlalchemy import Connection, Engine, inspect

from db.errors import SchemaMismatch

MIGRATIONS = Path(__file__).with_name("migrations")
UPGRADE_COMMAND = "python -m db upgrade"


def alembic_config(url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    # ConfigParser interpolation would choke on a '%' in a password.
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def _scripts() -> ScriptDirectory:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    return ScriptDirectory.from_config(cfg)


def head_revision() -> str:
    """The newest revision of the migrations shipped with this code."""
    head = _scripts().get_current_head()
    assert head is not None, "no migrations"
    return head


def current_revision(connection: Connection) -> str | None:
    """The revision the database is at; None if it has none (empty, or not fleetscribe's)."""
    return MigrationContext.configure(connection).get_current_revision()


def _known(revision: str) -> bool:
    try:
        return _scripts().get_revision(revision) is not None
    except CommandError:
        return False


def check_revision(engine: Engine) -> None:
    """Refuse (SchemaMismatch, one line saying what to run) a database that is not at the
    revision this code needs: older, newer, empty or not fleetscribe's. Reads only."""
    head = head_revision()
    with engine.connect() as connection:
        current = current_revision(connection)
        tables = inspect(connection).get_table_names() if current is None else []
        connection.rollback()
    if current == head:
        return
    where = engine.url.render_as_string(hide_password=True)
    if current is None and tables:
        raise SchemaMismatch(
            f"database {where} has tables but no fleetscribe revision (no alembic_version "
            f"row): not a fleetscribe store, or one made without migrations; this "
            f"fleetscribe needs revision {head}"
        )
    if current is None:
        raise SchemaMismatch(
            f"database {where} is empty; this fleetscribe needs revision {head}: "
            f"run {UPGRADE_COMMAND}"
        )
    if not _known(current):
        raise SchemaMismatch(
            f"database {where} is at revision {current}, which this fleetscribe does not "
            f"know (its newest is {head}): a newer fleetscribe upgraded it; run that version"
        )
    raise SchemaMismatch(
        f"database {where} is at revision {current}; this fleetscribe needs {head}: "
        f"run {UPGRADE_COMMAND}"
    )


def upgrade(engine: Engine, revision: str = "head") -> tuple[str | None, str | None]:
    """Bring the database at `engine` to `revision` (default: the newest); returns the
    revisions (before, after). A database at a revision this code does not know (a newer
    fleetscribe upgraded it) is refused with SchemaMismatch, not downgraded."""
    cfg = alembic_config(engine.url.render_as_string(hide_password=False))
    with engine.connect() as connection:
        before = current_revision(connection)
        connection.rollback()
        if before is not None and not _known(before):
            where = engine.url.render_as_string(hide_password=True)
            raise SchemaMismatch(
                f"database {where} is at revision {before}, which this fleetscribe does not "
                f"know (its newest is {head_revision()}): a newer fleetscribe upgraded it"
            )
        cfg.attributes["connection"] = connection
        command.upgrade(cfg, revision)
        connection.commit()
        after = current_revision(connection)
        connection.rollback()
    return before, after
