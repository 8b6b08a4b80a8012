"""`db query` is read-only on both databases, whatever SQL it is given."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from sqlalchemy import func, inspect, select
from sqlalchemy.engine import make_url

from db.errors import DatabaseUnavailable, QueryError, ReadOnlyViolation
from db.models import Batch, Hazard, Report, Video, VideoState
from db.query import run_query
from db.store import NewReport, add_video, create_batch, record_report

ROOT = Path(__file__).resolve().parents[1]
REFUSED = (ReadOnlyViolation, QueryError)
SQLITE = pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
POSTGRES = pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)


@pytest.fixture
def store(migrated):
    """A migrated database with a batch, three videos, one report and its hazards."""
    engine, factory = migrated
    with factory() as session:
        batch = create_batch(session=session, frames=4, priority=0, inputs=3, note="q")
        ids = [
            add_video(
                session=session,
                path=f"/data/{name}.mp4",
                sha256=name * 64,
                state=VideoState.QUEUED,
                batch_id=batch.id,
            ).id
            for name in "abc"
        ]
        record_report(
            session=session,
            new=NewReport(
                video_id=ids[0],
                model="tiny",
                adapter="",
                prompt_version=1,
                schema_version=1,
                raw_text="{}",
                report={"driving_parameters": {"risk_factor": "high", "weather": "rain"}},
                error=None,
                frame_timestamps=[0.0, 1.0, 2.0, 3.0],
                tokens_in=10,
                tokens_out=5,
                latency_s=0.5,
                worker_host="host",
                hazards=[
                    {"kind": "pedestrian", "description": "crossing", "frame": 1},
                    {"kind": "vehicle", "description": "braking", "frame": 3},
                ],
            ),
        )
        session.commit()
    return engine, factory


def snapshot(engine, factory) -> dict:
    """Everything a write could change: tables, the videos columns, rows and their values."""
    with factory() as session:
        counts = {
            model.__tablename__: session.scalar(select(func.count()).select_from(model))
            for model in (Batch, Video, Report, Hazard)
        }
        videos = session.execute(select(Video.id, Video.path, Video.state).order_by(Video.id)).all()
    insp = inspect(engine)
    return {
        "tables": sorted(insp.get_table_names()),
        "video_columns": [c["name"] for c in insp.get_columns("videos")],
        "counts": counts,
        "videos": [tuple(row) for row in videos],
    }


def test_select_returns_columns_and_rows(store, db_url):
    result = run_query(db_url, "SELECT id, path, state FROM videos ORDER BY id")
    assert result.columns == ["id", "path", "state"]
    assert result.rows == [
        (1, "/data/a.mp4", "done"),
        (2, "/data/b.mp4", "queued"),
        (3, "/data/c.mp4", "queued"),
    ]


def test_select_with_join_group_by_and_cte(store, db_url):
    result = run_query(
        db_url,
        "WITH h AS (SELECT kind, video_id FROM hazards) "
        "SELECT v.path, count(*) AS n FROM h JOIN videos v ON v.id = h.video_id "
        "GROUP BY v.path ORDER BY v.path",
    )
    assert result.columns == ["path", "n"]
    assert result.rows == [("/data/a.mp4", 2)]


def test_select_of_nothing_has_columns_and_no_rows(store, db_url):
    result = run_query(db_url, "SELECT id FROM videos WHERE path = 'nowhere'")
    assert result.columns == ["id"]
    assert result.rows == []


WRITES = [
    "INSERT INTO batches (created_at, frames, priority, inputs, note) "
    "VALUES ('2024-01-01', 1, 0, 0, 'x')",
    "UPDATE videos SET state = 'failed'",
    "DELETE FROM hazards",
    "DELETE FROM videos WHERE id = 3",
    "DROP TABLE hazards",
    "DROP TABLE videos",
    "CREATE TABLE evil (id INTEGER)",
    "CREATE INDEX ix_evil ON videos (path)",
    "ALTER TABLE videos ADD COLUMN evil INTEGER",
    "ALTER TABLE videos RENAME TO videos_old",
    "SELECT 1; DROP TABLE videos",
    "SELECT 1; DELETE FROM videos",
    "DELETE FROM videos; SELECT 1",
]


def assert_all_refused(store, db_url: str, statements: list[str]) -> None:
    """Each statement is refused with a one-line error and leaves the database as it was."""
    engine, factory = store
    before = snapshot(engine, factory)
    assert before["counts"] == {"batches": 1, "videos": 3, "reports": 1, "hazards": 2}
    problems = []
    for sql in statements:
        try:
            run_query(db_url, sql)
        except REFUSED as e:
            if "\n" in str(e) or not str(e):
                problems.append(f"{sql!r}: not a one-line message: {e!r}")
        else:
            problems.append(f"{sql!r}: accepted")
        if snapshot(engine, factory) != before:
            problems.append(f"{sql!r}: changed the database")
            break
    assert problems == []


def test_writes_are_refused_and_change_nothing(store, db_url):
    assert_all_refused(store, db_url, WRITES)


@pytest.mark.parametrize(
    "sql",
    ["INSERT INTO videos (path, state) VALUES ('/x', 'queued')", "DROP TABLE videos"],
)
def test_plain_writes_are_refused_as_read_only(store, db_url, sql):
    with pytest.raises(ReadOnlyViolation, match=r"^refused: .*read-only"):
        run_query(db_url, sql)


def test_two_statements_are_refused_as_one_statement_at_a_time(store, db_url):
    with pytest.raises(QueryError, match="one statement at a time"):
        run_query(db_url, "SELECT 1; SELECT 2")


POSTGRES_TRICKS = [
    "WITH gone AS (DELETE FROM videos RETURNING id) SELECT count(*) FROM gone",
    "WITH moved AS (UPDATE videos SET state = 'failed' RETURNING id) SELECT * FROM moved",
    "WITH x AS (INSERT INTO batches (created_at, frames, priority, inputs, note) "
    "VALUES (now(), 1, 0, 0, 'x') RETURNING id) SELECT * FROM x",
    "SET default_transaction_read_only = off; DELETE FROM videos",
    "SET default_transaction_read_only = off; DROP TABLE videos",
    "SET transaction_read_only = off; DELETE FROM videos",
    "COMMIT; DELETE FROM videos",
    "ROLLBACK; BEGIN READ WRITE; DROP TABLE videos; COMMIT",
    "SELECT set_config('transaction_read_only', 'off', false)",
    "SELECT nextval('videos_id_seq')",
    "TRUNCATE videos CASCADE",
]


@POSTGRES
def test_postgres_tricks_are_refused_and_change_nothing(store, db_url):
    assert_all_refused(store, db_url, POSTGRES_TRICKS)


@POSTGRES
def test_postgres_writing_cte_is_refused_as_read_only(store, db_url):
    with pytest.raises(ReadOnlyViolation):
        run_query(db_url, "WITH gone AS (DELETE FROM videos RETURNING id) SELECT * FROM gone")


@POSTGRES
def test_postgres_sequence_does_not_advance(store, db_url):
    with pytest.raises(REFUSED):
        run_query(db_url, "SELECT nextval('videos_id_seq')")
    _engine, factory = store
    with factory() as session:
        video = add_video(session=session, path="/d.mp4", sha256="d" * 64, state=VideoState.QUEUED)
        assert video.id == 4


@pytest.fixture
def server_dir():
    """A folder the PostgreSQL server process could write to (if it runs on this host)."""
    folder = Path(tempfile.mkdtemp(prefix="fleetscribe-query-", dir="/tmp"))
    folder.chmod(0o777)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@POSTGRES
@pytest.mark.parametrize("target", ["file", "program"])
def test_postgres_copy_to_the_server_is_refused(store, db_url, server_dir, target):
    written = server_dir / "out.txt"
    sql = {
        "file": f"COPY videos TO '{written}'",
        "program": f"COPY (SELECT 1) TO PROGRAM 'touch {written}'",
    }[target]
    try:
        with pytest.raises(REFUSED):
            run_query(db_url, sql)
    finally:
        assert not written.exists(), f"the database server wrote {written}"


SQLITE_TRICKS = [
    "PRAGMA journal_mode=DELETE",
    "PRAGMA query_only=0",
    "PRAGMA query_only=OFF",
    "PRAGMA foreign_keys=OFF",
    "PRAGMA user_version=7",
    "PRAGMA writable_schema=ON",
    "VACUUM",
    "REINDEX",
    "ANALYZE",
    "BEGIN IMMEDIATE",
]


@SQLITE
def test_sqlite_pragmas_and_maintenance_are_refused(store, db_url):
    assert_all_refused(store, db_url, SQLITE_TRICKS)
    # The file itself keeps its journal mode and user_version (read without fleetscribe's
    # connect hook, which would set WAL again).
    conn = sqlite3.connect(make_url(db_url).database)
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 0
    finally:
        conn.close()


@SQLITE
def test_sqlite_attach_is_refused_and_creates_no_file(store, db_url, tmp_path):
    other = tmp_path / "other.db"
    before = snapshot(*store)
    with pytest.raises(ReadOnlyViolation):
        run_query(db_url, f"ATTACH DATABASE '{other}' AS other")
    with pytest.raises(REFUSED):
        run_query(db_url, f"VACUUM INTO '{tmp_path / 'copy.db'}'")
    assert not other.exists()
    assert not (tmp_path / "copy.db").exists()
    assert snapshot(*store) == before


@SQLITE
def test_sqlite_schema_pragmas_are_allowed(store, db_url):
    result = run_query(db_url, "PRAGMA table_info(videos)")
    assert "name" in result.columns
    assert "sha256" in [row[result.columns.index("name")] for row in result.rows]


@SQLITE
def test_sqlite_table_list_pragma_is_allowed(store, db_url):
    result = run_query(db_url, "PRAGMA table_list")
    names = [row[result.columns.index("name")] for row in result.rows]
    assert {"videos", "reports", "hazards"} <= set(names)


def test_missing_sqlite_file_is_unavailable_and_not_created(tmp_path):
    missing = tmp_path / "nowhere" / "fleetscribe.db"
    with pytest.raises(DatabaseUnavailable, match="read-only"):
        run_query(f"sqlite:///{missing}", "SELECT 1")
    assert not missing.exists()


def test_unreachable_postgres_is_unavailable():
    with pytest.raises(DatabaseUnavailable, match="cannot connect to PostgreSQL") as failed:
        run_query("postgresql://postgres@127.0.0.1:1/fleetscribe", "SELECT 1")
    assert "\n" not in str(failed.value)


def test_sqlite_in_memory_database_is_a_query_error():
    with pytest.raises(QueryError, match="SQLite file"):
        run_query("sqlite://", "SELECT 1")


@pytest.mark.parametrize(
    "sql", ["SELEC id FROM videos", "SELECT FROM WHERE", "SELECT * FROM no_such_table"]
)
def test_bad_sql_is_a_one_line_query_error(store, db_url, sql):
    with pytest.raises(QueryError) as failed:
        run_query(db_url, sql)
    message = str(failed.value)
    assert message.startswith("query failed: ")
    assert "\n" not in message
    assert not isinstance(failed.value, ReadOnlyViolation)


# --- CLI ----------------------------------------------------------------------------------


def db_cli(db_url: str, tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "FLEETSCRIBE_DATABASE_URL": db_url,
        "FLEETSCRIBE_HOME": str(tmp_path / "home"),
        "COLUMNS": "200",
        "NO_COLOR": "1",
        "PYTHONIOENCODING": "utf-8",
    }
    return subprocess.run(
        [sys.executable, "-m", "db", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_cli_refuses_drop_with_one_line_and_no_traceback(store, db_url, tmp_path):
    before = snapshot(*store)
    out = db_cli(db_url, tmp_path, "query", "DROP TABLE videos")
    assert out.returncode != 0
    assert out.stdout == ""
    assert out.stderr.strip().startswith("error: refused")
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert "Traceback" not in out.stderr
    assert snapshot(*store) == before


def test_cli_bad_sql_is_one_line(store, db_url, tmp_path):
    out = db_cli(db_url, tmp_path, "query", "SELEC 1")
    assert out.returncode != 0
    assert out.stderr.strip().startswith("error: query failed")
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr


def test_cli_error_with_brackets_is_printed_verbatim(store, db_url, tmp_path):
    out = db_cli(db_url, tmp_path, "query", 'SELECT * FROM "[/x]"')
    assert "Traceback" not in out.stderr
    assert out.returncode == 2
    assert "[/x]" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr


EXPECTED_ROWS = [["1", "/data/a.mp4", "done"], ["2", "/data/b.mp4", "queued"]]
LISTING = "SELECT id, path, state FROM videos WHERE id < 3 ORDER BY id"


def test_cli_csv_parses_back(store, db_url, tmp_path):
    out = db_cli(db_url, tmp_path, "query", LISTING, "--format", "csv")
    assert out.returncode == 0, out.stderr
    rows = list(csv.reader(io.StringIO(out.stdout)))
    assert rows == [["id", "path", "state"], *EXPECTED_ROWS]


def test_cli_csv_quotes_commas_and_json(store, db_url, tmp_path):
    sql = "SELECT 'a,b \"c\"' AS text, report FROM reports"
    out = db_cli(db_url, tmp_path, "query", sql, "--format", "csv")
    assert out.returncode == 0, out.stderr
    header, row = list(csv.reader(io.StringIO(out.stdout)))
    assert header == ["text", "report"]
    assert row[0] == 'a,b "c"'
    assert json.loads(row[1]) == {"driving_parameters": {"risk_factor": "high", "weather": "rain"}}


def test_cli_json_parses_back(store, db_url, tmp_path):
    out = db_cli(db_url, tmp_path, "query", LISTING, "--format", "json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == [
        {"id": 1, "path": "/data/a.mp4", "state": "done"},
        {"id": 2, "path": "/data/b.mp4", "state": "queued"},
    ]


def test_cli_json_of_timestamps_and_floats(store, db_url, tmp_path):
    sql = "SELECT created_at, latency_s FROM reports"
    out = db_cli(db_url, tmp_path, "query", sql, "--format", "json")
    assert out.returncode == 0, out.stderr
    [row] = json.loads(out.stdout)
    assert row["latency_s"] == 0.5
    assert str(row["created_at"]).startswith("20")


def test_cli_table_parses_back(store, db_url, tmp_path):
    out = db_cli(db_url, tmp_path, "query", LISTING)  # table is the default
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    cells = [
        [cell.strip() for cell in line.strip().strip("│┃|").split("│" if "│" in line else "┃")]
        for line in lines
        if ("│" in line or "┃" in line)
    ]
    assert cells == [["id", "path", "state"], *EXPECTED_ROWS]
    assert lines[-1] == "(2 rows)"
