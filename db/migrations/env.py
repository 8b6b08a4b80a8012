"""Alembic environment: the engine comes from db.session, the metadata from db.models."""

from alembic import context
from sqlalchemy import text

from db.models import Base
from db.session import make_engine

# Any fixed number: concurrent `db upgrade` runs (several workers starting at once) queue
# on this PostgreSQL advisory lock instead of racing to create the same tables.
_MIGRATION_LOCK = 0x666C656574


def run_migrations_online() -> None:
    connectable = context.config.attributes.get("connection")
    if connectable is not None:
        _run(connectable)
        return
    engine = make_engine(context.config.get_main_option("sqlalchemy.url"))
    try:
        with engine.connect() as connection:
            _run(connection)
    finally:
        engine.dispose()


def _run(connection) -> None:
    postgres = connection.dialect.name == "postgresql"
    sqlite = connection.dialect.name == "sqlite"
    if postgres:
        connection.execute(text("SELECT pg_advisory_lock(:k)"), {"k": _MIGRATION_LOCK})
        connection.commit()
    if sqlite:
        _sqlite_foreign_keys(connection, on=False)
    try:
        context.configure(
            connection=connection,
            target_metadata=Base.metadata,
            render_as_batch=sqlite,
            compare_type=True,
        )
        with context.begin_transaction():
            context.run_migrations()
            if sqlite:
                _check_foreign_keys(connection)
        if sqlite:
            connection.commit()  # alembic leaves SQLite's transaction open (no DDL ones)
    finally:
        if postgres:
            connection.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": _MIGRATION_LOCK})
            connection.commit()
        if sqlite:
            connection.rollback()  # only after a failure: what it changed is undone
            _sqlite_foreign_keys(connection, on=True)


def _sqlite_foreign_keys(connection, *, on: bool) -> None:
    """SQLite's foreign keys off for the migrations, on again after (db/session.py turns
    them on for every connection). A batch migration copies a table, drops it and renames
    the copy; with foreign keys on, that DROP first deletes every row, and the rows of the
    tables pointing at it go too (hazards, ON DELETE CASCADE) or the DROP is refused.
    Deferring them (PRAGMA defer_foreign_keys) does not stop the cascade: checked. The
    pragma is a no-op inside a transaction, so it goes to the driver's connection outside
    the migrations' transaction (SQLite's own procedure for schema changes); a migration
    that copies a table pointed at checks that they are off."""
    connection.connection.driver_connection.execute(f"PRAGMA foreign_keys={'ON' if on else 'OFF'}")


def _check_foreign_keys(connection) -> None:
    """Refuse to commit migrations that left a row pointing at no row (foreign keys were
    off while they ran)."""
    broken = connection.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
    if broken:
        table, rowid, parent, _ = broken[0]
        raise RuntimeError(
            f"the migration left {len(broken)} rows pointing at no row, e.g. {table} row "
            f"{rowid} at {parent}; nothing was changed"
        )


if context.is_offline_mode():
    raise SystemExit("fleetscribe migrations run online only: use `python -m db upgrade`")
run_migrations_online()
