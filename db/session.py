"""Engines and sessions. Nothing here runs at import time: callers make them after any fork."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from config.settings import Settings
from db.errors import DatabaseRefused, DatabaseUnavailable, SchemaMismatch


def make_engine(url: str, **kwargs) -> Engine:
    """An engine with the settings fleetscribe relies on for each backend."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "postgres":  # Heroku's spelling
        parsed = parsed.set(drivername=parsed.drivername.replace("postgres", "postgresql", 1))
        url = parsed.render_as_string(hide_password=False)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 30}, **kwargs)
        event.listen(engine, "connect", _sqlite_pragmas)
        event.listen(engine, "begin", _sqlite_begin)
        return engine
    if parsed.get_backend_name() != "postgresql":
        return create_engine(url, pool_pre_ping=True, **kwargs)
    if parsed.drivername == "postgresql":
        # psycopg 3 is the driver we install; plain postgresql:// would look for psycopg2.
        url = parsed.set(drivername="postgresql+psycopg")
    # Bounds libpq leaves open: a URL that sets one of these keeps its own value.
    bounds = {k: v for k, v in _PG_CONNECTION_BOUNDS.items() if k not in parsed.query}
    kwargs["connect_args"] = bounds | kwargs.get("connect_args", {})
    engine = create_engine(url, pool_pre_ping=True, **kwargs)
    options = " ".join(_as_tuple(parsed.query.get("options", "")))
    if "idle_in_transaction_session_timeout" not in options:
        # A SET on each new connection rather than a start-up `options` parameter, which
        # PgBouncer refuses unless told to ignore it.
        event.listen(engine, "connect", _end_silent_transactions)
    return engine


def _as_tuple(value) -> tuple:
    return value if isinstance(value, tuple) else (value,)


def _end_silent_transactions(dbapi_conn, _record) -> None:
    with dbapi_conn.cursor() as cur:
        cur.execute(f"SET idle_in_transaction_session_timeout = {_IDLE_IN_XACT_MS}")
    dbapi_conn.commit()


# libpq waits for ever by default: on a server that takes the TCP connection and never
# answers (a frozen host, a proxy with no backend), a worker's connect would hang with the
# slot (or, in Celery's task_received, the whole consumer) it runs in; and a connection
# whose peer vanished without a reset is only found dead by TCP keepalives.
_PG_CONNECTION_BOUNDS = {
    "connect_timeout": 10,  # seconds, for the whole connection start-up
    "keepalives": 1,
    "keepalives_idle": 30,
    "keepalives_interval": 10,
    "keepalives_count": 3,
}
# And the server's side: a client that vanished inside a transaction (a host that crashed,
# a network cut that sent no reset) leaves its backend holding the transaction and its row
# locks until the server's own TCP keepalive gives up (two hours by default); a video's
# redelivered message waits on that lock (SELECT ... FOR UPDATE) the whole time. Our
# transactions are short: one idle for 5 minutes inside one is ended by the server.
_IDLE_IN_XACT_MS = 300_000


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


@contextmanager
def exclusive(factory: sessionmaker[Session], key: int) -> Iterator[bool]:
    """Whether this process is the only one inside the block for `key`, across every
    machine on the same PostgreSQL (a transaction-level advisory lock, taken without
    waiting: False when another holds it). SQLite has no such lock: always True there
    (its writers are serialized by the file's lock)."""
    session = factory()
    try:
        if session.get_bind().dialect.name != "postgresql":
            yield True
            return
        got = session.scalar(text("SELECT pg_try_advisory_xact_lock(:key)"), {"key": key})
        yield bool(got)
    finally:
        session.rollback()  # ends the transaction: the lock is released
        session.close()


def wait_for_database(engine: Engine, *, timeout: float = 60.0) -> None:
    """Block until the database answers, or raise DatabaseUnavailable after `timeout` s.
    A database that answers but cannot be used as configured (no such database, login
    refused, unknown host name) raises DatabaseRefused at once: waiting would not help."""
    deadline = time.monotonic() + timeout
    delay = 0.25
    while True:
        try:
            with engine.connect() as conn:
                conn.execute(text("SELECT 1"))
            return
        except OperationalError as e:
            reason = _reason(e)
            where = engine.url.render_as_string(hide_password=True)
            if _permanent(reason):
                raise DatabaseRefused(f"cannot use database {where}: {reason}") from None
            if time.monotonic() >= deadline:
                raise DatabaseUnavailable(
                    f"database {where} did not answer in {timeout:.0f} s: {reason}"
                ) from None
            time.sleep(delay)
            delay = min(delay * 2, 5.0)


# What libpq and SQLite say when waiting cannot help; anything else (connection refused,
# a timeout, "the database system is starting up", too many clients) is waited out.
_PERMANENT = (
    "does not exist",  # database "x" / role "x"
    "authentication failed",
    "no password supplied",
    "no pg_hba.conf entry",
    "failed to resolve host",
    "could not translate host name",
    "name or service not known",
    "nodename nor servname",
    "invalid dsn",
    "invalid connection option",
    "invalid port",
    "unable to open database file",
)


def _permanent(reason: str) -> bool:
    lowered = reason.lower()
    return any(words in lowered for words in _PERMANENT)


def _reason(e: OperationalError) -> str:
    """The server's or library's own words, one line: 'database "x" does not exist'."""
    text_ = str(e.orig).strip() if e.orig is not None else str(e).strip()
    first = text_.splitlines()[0] if text_ else type(e.orig or e).__name__
    # libpq: 'connection failed: connection to server at "h", port 5432 failed: FATAL:  ...'
    if "FATAL:" in first:
        first = first.split("FATAL:", 1)[1]
    return " ".join(first.split())


# --- opening the store --------------------------------------------------------------------


def embedded_store_file(settings: Settings) -> Path | None:
    """The embedded default's SQLite file (None: a configured database)."""
    if not settings.embedded_store:
        return None
    return Path(make_url(settings.db_url).database or "")


def embedded_store_notice(settings: Settings) -> str | None:
    """The line that says which file the embedded default is (None: a configured database)."""
    path = embedded_store_file(settings)
    if path is None:
        return None
    return f"using the embedded store {shown_path(path)} (FLEETSCRIBE_DATABASE_URL unset)"


def shown_path(path: Path) -> str:
    """`path` as a user reads it: relative to the current folder when inside it."""
    try:
        return str(path.relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def open_store(settings: Settings, *, wait_s: float = 30.0) -> Engine:
    """The store's engine, ready for this code; what every entry point calls to open it.

    Waits up to `wait_s` for a database that does not answer yet. The embedded default
    (FLEETSCRIBE_DATABASE_URL unset: a SQLite file under FLEETSCRIBE_HOME) is created or
    upgraded here, and a line on stderr says which file it is. Any other database must be
    at the revision this code needs already, or SchemaMismatch says to run
    `python -m db upgrade`: only that command changes a configured database's schema (and
    a configured SQLite file that does not exist is not created)."""
    from db.migrate import UPGRADE_COMMAND, check_revision, upgrade

    url = make_url(settings.db_url)
    file = url.database if url.get_backend_name() == "sqlite" else None
    notice = embedded_store_notice(settings)
    if notice:
        new = not Path(file or "").exists()
        print(notice[:-1] + "; made now)" if new else notice, file=sys.stderr, flush=True)
    elif file and file != ":memory:" and not Path(file).exists():
        raise SchemaMismatch(
            f"no database file {file} (FLEETSCRIBE_DATABASE_URL): run {UPGRADE_COMMAND} "
            "to create it, or correct the path"
        )
    engine = make_engine(settings.db_url)
    try:
        wait_for_database(engine, timeout=wait_s)
        if notice:
            upgrade(engine)
        else:
            check_revision(engine)
    except BaseException:
        engine.dispose()
        raise
    return engine
