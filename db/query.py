"""`python -m db query`: run one SQL statement read-only and render the rows.

Read-only is enforced by the database, not by inspecting the statement text:
SQLite opens the file with ``mode=ro`` and an authorizer that allows reading only;
PostgreSQL runs the statement in a READ ONLY transaction, as a prepared statement (so
a second statement cannot be smuggled in after a semicolon), and rolls it back; a user who
could run programs or touch files on the server reads as the role fleetscribe_query,
which migration 0003 made. Nothing here creates, grants or changes anything.
"""

from __future__ import annotations

import csv
import io
import json
import sqlite3
from dataclasses import dataclass
from datetime import date, datetime
from decimal import Decimal
from typing import Any

from sqlalchemy.engine import make_url

from db.errors import DatabaseUnavailable, QueryError, ReadOnlyViolation

READ_ONLY_MESSAGE = "refused: `db query` is read-only and this statement would change the database"
_STATEMENT_TIMEOUT_MS = 120_000


@dataclass
class QueryResult:
    columns: list[str]
    rows: list[tuple[Any, ...]]


def run_query(url: str, sql: str) -> QueryResult:
    """Run `sql` against the database at `url` without any chance of writing."""
    parsed = make_url(url)
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        return _sqlite_query(parsed.database or "", sql)
    if backend in ("postgresql", "postgres"):  # postgres://: Heroku's spelling
        return _postgres_query(parsed, sql)
    raise QueryError(f"db query supports sqlite and postgresql, not {backend}")


# --- SQLite -------------------------------------------------------------------------------

_SQLITE_ALLOWED = {sqlite3.SQLITE_SELECT, sqlite3.SQLITE_READ, sqlite3.SQLITE_FUNCTION}
_SQLITE_RECURSIVE = getattr(sqlite3, "SQLITE_RECURSIVE", 33)
_SQLITE_READ_PRAGMAS = {"table_info", "table_xinfo", "table_list", "index_list", "index_info"}


def _sqlite_authorizer(action: int, arg1, arg2, _db, _trigger) -> int:
    if action in _SQLITE_ALLOWED or action == _SQLITE_RECURSIVE:
        return sqlite3.SQLITE_OK
    # these only read, whatever table or index they are given (arg2)
    if action == sqlite3.SQLITE_PRAGMA and arg1 in _SQLITE_READ_PRAGMAS:
        return sqlite3.SQLITE_OK
    return sqlite3.SQLITE_DENY


def _sqlite_query(path: str, sql: str) -> QueryResult:
    if not path or path == ":memory:":
        raise QueryError("db query needs a SQLite file, not an in-memory database")
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
    except sqlite3.OperationalError as e:
        raise DatabaseUnavailable(f"cannot open {path} read-only: {e}") from None
    try:
        conn.set_authorizer(_sqlite_authorizer)
        cur = conn.execute(sql)
        columns = [d[0] for d in cur.description or []]
        return QueryResult(columns, [tuple(r) for r in cur.fetchall()])
    except sqlite3.DatabaseError as e:
        message = str(e)
        if "not authorized" in message or "readonly" in message or "read-only" in message:
            raise ReadOnlyViolation(READ_ONLY_MESSAGE) from None
        if "one statement at a time" in message:
            raise QueryError("db query runs one statement at a time") from None
        raise QueryError(f"query failed: {message}") from None
    except sqlite3.Warning as e:  # raised for several statements in one string
        raise QueryError(f"db query runs one statement at a time ({e})") from None
    finally:
        conn.rollback()
        conn.close()


# --- PostgreSQL ---------------------------------------------------------------------------


def _postgres_query(parsed, sql: str) -> QueryResult:
    import psycopg
    from psycopg import errors as pgerrors

    conninfo = parsed.set(drivername="postgresql").render_as_string(hide_password=False)
    try:
        conn = psycopg.connect(
            conninfo,
            connect_timeout=10,
            options=(
                f"-c default_transaction_read_only=on -c statement_timeout={_STATEMENT_TIMEOUT_MS}"
            ),
        )
    except psycopg.OperationalError as e:
        reason = str(e).strip().splitlines()[-1] if str(e).strip() else "no answer"
        raise DatabaseUnavailable(f"cannot connect to PostgreSQL: {reason}") from None
    try:
        conn.read_only = True
        _drop_server_privileges(conn)
        with conn.cursor() as cur:
            cur.execute(sql, prepare=True)  # type: ignore[arg-type]
            if cur.description is None:
                return QueryResult([], [])
            columns = [d.name for d in cur.description]
            return QueryResult(columns, [tuple(r) for r in cur.fetchall()])
    except (pgerrors.ReadOnlySqlTransaction, pgerrors.InsufficientPrivilege):
        raise ReadOnlyViolation(READ_ONLY_MESSAGE) from None
    except pgerrors.SyntaxError as e:
        if "multiple commands" in str(e):
            raise QueryError("db query runs one statement at a time") from None
        raise QueryError(f"query failed: {_first_line(e)}") from None
    except psycopg.Error as e:
        raise QueryError(f"query failed: {_first_line(e)}") from None
    finally:
        conn.rollback()
        conn.close()


QUERY_ROLE = "fleetscribe_query"
_PRIVILEGED = """
SELECT r.rolsuper
    OR pg_has_role(current_user, 'pg_execute_server_program', 'MEMBER')
    OR pg_has_role(current_user, 'pg_write_server_files', 'MEMBER')
    OR pg_has_role(current_user, 'pg_read_server_files', 'MEMBER')
FROM pg_roles r WHERE r.rolname = current_user
"""


def _drop_server_privileges(conn) -> None:
    """A READ ONLY transaction still lets a superuser run COPY ... TO PROGRAM or read server
    files. If the connecting role can do that, the query runs as QUERY_ROLE, a NOLOGIN role
    that can only read table data (pg_read_all_data), made by `python -m db upgrade`
    (migration 0003); without it such a user is refused. Nothing is created here."""
    (privileged,) = conn.execute(_PRIVILEGED).fetchone() or (False,)
    if not privileged:
        return
    row = conn.execute(
        "SELECT pg_has_role(current_user, oid, 'MEMBER') FROM pg_roles WHERE rolname = %s",
        (QUERY_ROLE,),
    ).fetchone()
    if row is None or not row[0]:
        why = "does not exist" if row is None else "is not granted to this user"
        raise ReadOnlyViolation(
            "refused: the database user may run programs or write files on the server, and "
            f"the read-only role {QUERY_ROLE} {why} (python -m db upgrade makes it, as a "
            "user that may create roles); connect `db query` as an ordinary user"
        )
    conn.execute(f"SET ROLE {QUERY_ROLE}")


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


# --- rendering ----------------------------------------------------------------------------


def _plain(value: Any) -> Any:
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, Decimal):
        return float(value)
    if isinstance(value, bytes | memoryview):
        return bytes(value).hex()
    return value


def to_records(result: QueryResult) -> list[dict[str, Any]]:
    """The rows as JSON-ready dicts (timestamps as ISO text, decimals as floats)."""
    return [{c: _plain(v) for c, v in zip(result.columns, row, strict=True)} for row in result.rows]


def to_json(result: QueryResult) -> str:
    return json.dumps(to_records(result), indent=2, ensure_ascii=False, default=str)


def to_csv(result: QueryResult) -> str:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(result.columns)
    for row in result.rows:
        writer.writerow([json.dumps(v) if isinstance(v, dict | list) else _plain(v) for v in row])
    return out.getvalue()


def to_table(result: QueryResult):
    """A rich Table of the rows."""
    from rich.table import Table

    table = Table(show_lines=False, header_style="bold")
    for column in result.columns:
        table.add_column(column, overflow="fold")
    for row in result.rows:
        table.add_row(
            *[
                "" if v is None else json.dumps(v) if isinstance(v, dict | list) else str(_plain(v))
                for v in row
            ]
        )
    return table
