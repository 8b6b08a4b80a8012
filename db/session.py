"""Engines and sessions. Nothing here runs at import time: callers make them after any fork."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from db.errors import DatabaseUnavailable


def make_engine(url: str, **kwargs) -> Engine:
    """An engine with the settings fleetscribe relies on for each backend."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 30}, **kwargs)
        event.listen(engine, "connect", _sqlite_pragmas)
        event.listen(engine, "begin", _sqlite_begin)
        return engine
    if parsed.get_backend_name() == "postgresql" and parsed.drivername == "postgresql":
        # psycopg 3 is the driver we install; plain postgresql:// would look for psycopg2.
        url = parsed.set(drivername="postgresql+psycopg")
    return create_engine(url, pool_pre_ping=True, **kwargs)


def _sqlite_begin(conn) -> None:
    # pysqlite would only BEGIN before the first write, so a SAVEPOINT could open (and its
    # RELEASE commit) the transaction by itself; SQLAlchemy's documented fix. IMMEDIATE
    # takes the write lock up front: a read transaction that later writes cannot wait for
    # the lock (SQLite answers "database is locked" at once, busy_timeout or not), and a
    # worker's task threads write concurrently. Transactions here are short.
    conn.exec_driver_sql("BEGIN IMMEDIATE")


def _sqlite_pragmas(dbapi_conn, _record) -> None:
    dbapi_conn.isolation_level = None  # we emit BEGIN ourselves (see _sqlite_begin)
    # WAL lets the producer read while a worker writes; busy_timeout rides out the
    # short write locks of several worker processes on one file.
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


def make_sessionmaker(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


@contextmanager
def session_scope(factory: sessionmaker[Session]) -> Iterator[Session]:
    """One transaction: committed if the block succeeds, rolled back if it raises."""
    session = factory()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def wait_for_database(engine: Engine, *, timeout: float = 60.0) -> None:
    """Block until the database answers, or raise DatabaseUnavailable after `timeout` s."""
    deadline = time.monotonic() + timeout
    delay = 0.25
    while True:
        try:
            with engine.connect() as conn:
                conn.execute(text("SELECT 1"))
            return
        except OperationalError as e:
            if time.monotonic() >= deadline:
                reason = str(e.orig).strip().splitlines()[0] if e.orig else str(e)
                raise DatabaseUnavailable(
                    f"database {engine.url.render_as_string(hide_password=True)} "
                    f"did not answer in {timeout:.0f} s: {reason}"
                ) from None
            time.sleep(delay)
            delay = min(delay * 2, 5.0)
