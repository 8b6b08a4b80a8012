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
    if postgres:
        connection.execute(text("SELECT pg_advisory_lock(:k)"), {"k": _MIGRATION_LOCK})
        connection.commit()
    try:
        context.configure(
            connection=connection,
            target_metadata=Base.metadata,
            render_as_batch=connection.dialect.name == "sqlite",
            compare_type=True,
        )
        with context.begin_transaction():
            context.run_migrations()
    finally:
        if postgres:
            connection.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": _MIGRATION_LOCK})
            connection.commit()


if context.is_offline_mode():
    raise SystemExit("fleetscribe migrations run online only: use `python -m db upgrade`")
run_migrations_online()
