"""Only `python -m db upgrade` changes a configured database's schema; every other command
refuses one at another revision with one line saying what to run, and `db query` changes
nothing at all (no role, no grant, no table), ever."""

from __future__ import annotations

import uuid
from pathlib import Path

import psycopg
import pytest
from conftest import PG_ADMIN_URL
from sqlalchemy import inspect, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError
from test_cli_slips import notice, run_cli

from db.migrate import head_revision, upgrade
from db.query import QUERY_ROLE
from db.session import make_engine

OLDER = "0002"


def _revision(url: str) -> str | None:
    engine = make_engine(url)
    try:
        if "alembic_version" not in inspect(engine).get_table_names():
            return None
        with engine.connect() as conn:
            return conn.execute(text("SELECT version_num FROM alembic_version")).scalar()
    finally:
        engine.dispose()


def _tables(url: str) -> list[str]:
    engine = make_engine(url)
    try:
        return sorted(inspect(engine).get_table_names())
    finally:
        engine.dispose()


def _shown(url: str) -> str:
    return make_engine(url).url.render_as_string(hide_password=True)


def test_an_older_database_is_refused_until_db_upgrade(db_url, tmp_path):
    engine = make_engine(db_url)
    upgrade(engine, OLDER)
    engine.dispose()
    env = {"FLEETSCRIBE_DATABASE_URL": db_url}
    head = head_revision()
    assert head != OLDER

    for command in (["producer", "status"], ["producer", "failures"]):
        out = run_cli(command, tmp_path, env)
        assert out.returncode == 2, out.stdout + out.stderr
        assert out.stderr.splitlines() == [
            f"error: database {_shown(db_url)} is at revision {OLDER}; this fleetscribe needs "
            f"{head}: run python -m db upgrade"
        ]
    assert _revision(db_url) == OLDER  # refused, and left as it was

    upgraded = run_cli(["db", "upgrade", "--wait", "5"], tmp_path, env)
    assert upgraded.returncode == 0, upgraded.stderr
    assert upgraded.stdout.splitlines() == [
        f"database at head: {_shown(db_url)} (revision {head}, was {OLDER})"
    ]
    assert _revision(db_url) == head
    status = run_cli(["producer", "status"], tmp_path, env)
    assert status.returncode == 0, status.stderr
    assert status.stderr == ""


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_an_empty_database_is_refused_by_every_command_and_left_empty(db_url, tmp_path):
    model = tmp_path / "model"  # enough for the worker's check before it opens the store
    model.mkdir()
    (model / "config.json").write_text("{}")
    env = {"FLEETSCRIBE_DATABASE_URL": db_url, "FLEETSCRIBE_MODEL": str(model)}
    line = (
        f"error: database {_shown(db_url)} is empty; this fleetscribe needs revision "
        f"{head_revision()}: run python -m db upgrade"
    )
    for command in (
        ["producer", "status"],
        ["producer", "requeue", "--where", "prompt_version < 2", "--dry-run"],
        ["producer", "failures"],
        ["worker", "--loglevel", "WARNING"],
    ):
        out = run_cli(command, tmp_path, env)
        assert out.returncode == 2, (command, out.stdout + out.stderr)
        assert [s for s in out.stderr.splitlines() if s.startswith("error:")] == [line], command
        assert "Traceback" not in out.stderr
    assert _tables(db_url) == []


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_an_empty_sqlite_file_is_refused_too(db_url, tmp_path):
    path = make_url(db_url).database
    open(path, "wb").close()
    out = run_cli(["producer", "status"], tmp_path, {"FLEETSCRIBE_DATABASE_URL": db_url})
    assert out.returncode == 2
    assert out.stderr.splitlines() == [
        f"error: database {_shown(db_url)} is empty; this fleetscribe needs revision "
        f"{head_revision()}: run python -m db upgrade"
    ]
    assert _tables(db_url) == []


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_a_database_from_a_newer_fleetscribe_is_refused_and_not_touched(db_url, tmp_path):
    engine = make_engine(db_url)
    upgrade(engine)
    with engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = '0099'"))
    engine.dispose()
    env = {"FLEETSCRIBE_DATABASE_URL": db_url}
    newer = (
        f"database {_shown(db_url)} is at revision 0099, which this fleetscribe does not know "
        f"(its newest is {head_revision()}): a newer fleetscribe upgraded it"
    )
    status = run_cli(["producer", "status"], tmp_path, env)
    assert status.returncode == 2
    assert status.stderr.splitlines() == [f"error: {newer}; run that version"]
    up = run_cli(["db", "upgrade", "--wait", "5"], tmp_path, env)
    assert up.returncode == 2
    assert up.stderr.splitlines() == [f"error: {newer}"]
    assert _revision(db_url) == "0099"


def test_the_embedded_default_makes_and_upgrades_itself(tmp_path):
    home = tmp_path / "home"
    out = run_cli(["producer", "status"], tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stderr.splitlines() == [notice(home, made=True)]
    url = f"sqlite:///{home.resolve() / 'fleetscribe.db'}"
    assert _revision(url) == head_revision()

    # an embedded store left at an older revision (an older fleetscribe made it) upgrades
    older_home = tmp_path / "older"
    older_url = f"sqlite:///{older_home.resolve() / 'fleetscribe.db'}"
    engine = make_engine(older_url)
    upgrade(engine, OLDER)
    engine.dispose()
    out = run_cli(["producer", "status"], tmp_path, {"FLEETSCRIBE_HOME": str(older_home)})
    assert out.returncode == 0, out.stderr
    assert _revision(older_url) == head_revision()


# --- db query changes nothing on PostgreSQL -------------------------------------------------

_SNAPSHOT = {
    "roles": "SELECT rolname, rolsuper, rolinherit, rolcreaterole, rolcreatedb, rolcanlogin "
    "FROM pg_roles ORDER BY rolname",
    "memberships": "SELECT roleid::regrole::text, member::regrole::text FROM pg_auth_members "
    "ORDER BY 1, 2",
    "table_acls": "SELECT c.relname, c.relacl::text FROM pg_class c "
    "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = 'public' ORDER BY 1",
    "schema_acls": "SELECT nspname, nspacl::text FROM pg_namespace ORDER BY 1",
    "database_acl": "SELECT datacl::text FROM pg_database WHERE datname = current_database()",
    "default_acls": "SELECT defaclrole::regrole::text, defaclacl::text FROM pg_default_acl "
    "ORDER BY 1",
    "columns": "SELECT table_name, column_name, data_type FROM information_schema.columns "
    "WHERE table_schema = 'public' ORDER BY 1, 2",
    "revision": "SELECT version_num FROM alembic_version",
}


def _snapshot(url: str, *, ignore_roles: set[str]) -> dict:
    """Roles, memberships, grants and schema, read as the server's superuser. `ignore_roles`:
    roles other tests on the same server may be making meanwhile (theirs, not ours)."""
    conninfo = make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(conninfo) as conn:
        snap = {name: conn.execute(sql).fetchall() for name, sql in _SNAPSHOT.items()}
    snap["roles"] = [r for r in snap["roles"] if r[0] in ignore_roles or not r[0].startswith("ft_")]
    return snap


@pytest.fixture
def login_roles(pg_url):
    """Two LOGIN roles of this test's own: an ordinary reader (SELECT on videos) and one that
    may read the server's files (privileged, but not a member of the query role)."""
    suffix = uuid.uuid4().hex[:8]
    reader, privileged = f"ft_reader_{suffix}", f"ft_files_{suffix}"
    admin = PG_ADMIN_URL.replace("postgresql+psycopg", "postgresql")
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f"CREATE ROLE {reader} LOGIN")
        conn.execute(f"CREATE ROLE {privileged} LOGIN")
        conn.execute(f"GRANT pg_read_server_files TO {privileged}")
    yield reader, privileged
    database = make_url(pg_url).set(drivername="postgresql").render_as_string(False)
    with psycopg.connect(database, autocommit=True) as conn:  # its grants first
        conn.execute(f"DROP OWNED BY {reader}, {privileged}")
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f"DROP ROLE IF EXISTS {reader}")
        conn.execute(f"DROP ROLE IF EXISTS {privileged}")


def _as(url: str, user: str) -> str:
    return make_url(url).set(username=user).render_as_string(hide_password=False)


def test_migration_0003_makes_the_read_only_query_role(pg_url):
    engine = make_engine(pg_url)
    upgrade(engine)
    with engine.connect() as conn:
        can_login, reads_all = conn.execute(
            text(
                "SELECT rolcanlogin, pg_has_role(oid, 'pg_read_all_data', 'MEMBER') "
                "FROM pg_roles WHERE rolname = :role"
            ),
            {"role": QUERY_ROLE},
        ).one()
    engine.dispose()
    assert (can_login, reads_all) == (False, True)


def test_db_query_changes_no_role_grant_or_table(pg_url, login_roles, tmp_path):
    reader, privileged = login_roles
    engine = make_engine(pg_url)
    upgrade(engine)
    with engine.begin() as conn:
        conn.execute(text(f"GRANT SELECT ON videos TO {reader}"))
    engine.dispose()
    keep = {reader, privileged}
    before = _snapshot(pg_url, ignore_roles=keep)
    assert any(role[0] == QUERY_ROLE for role in before["roles"])

    def query(user: str | None, sql: str):
        url = _as(pg_url, user) if user else pg_url
        return run_cli(
            ["db", "query", sql, "--format", "json"], tmp_path, {"FLEETSCRIBE_DATABASE_URL": url}
        )

    # the superuser reads as the query role; an ordinary user as itself
    su = query(None, "SELECT current_user AS who, count(*) AS n FROM videos")
    assert su.returncode == 0, su.stderr
    assert su.stdout.strip() == f'[\n  {{\n    "who": "{QUERY_ROLE}",\n    "n": 0\n  }}\n]'
    plain = query(reader, "SELECT current_user AS who, count(*) AS n FROM videos")
    assert plain.returncode == 0, plain.stderr
    assert plain.stdout.strip() == f'[\n  {{\n    "who": "{reader}",\n    "n": 0\n  }}\n]'
    # a user that may read server files but may not become the query role is refused, and
    # nothing is made for it
    files = query(privileged, "SELECT 1")
    assert files.returncode == 2
    assert files.stderr.splitlines() == [
        "error: refused: the database user may run programs or write files on the server, and "
        f"the read-only role {QUERY_ROLE} is not granted to this user (python -m db upgrade "
        "makes it, as a user that may create roles); connect `db query` as an ordinary user"
    ]
    for write in (
        "CREATE ROLE ft_evil LOGIN",
        "GRANT ALL ON videos TO PUBLIC",
        "DROP TABLE videos",
    ):
        refused = query(None, write)
        assert refused.returncode == 2, write
    assert _snapshot(pg_url, ignore_roles=keep) == before


# --- on a server of the test's own, where the query role does not exist yet ----------------


@pytest.fixture
def private_pg():
    """A PostgreSQL server of the test's own (initdb, trust auth): roles belong to a server,
    and the shared one has had the query role since its first upgrade. Yields its admin
    URL (database postgres)."""
    import glob
    import os
    import shutil
    import subprocess
    import tempfile

    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not found:
        pytest.skip("no initdb on this machine")
    bindir = Path(found[-1]).parent
    folder = Path(tempfile.mkdtemp(prefix="fleetscribe-pg-", dir="/tmp"))
    as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    if as_postgres:
        shutil.chown(folder, "postgres")  # initdb refuses to run as root
    data, port = folder / "data", _free_port()

    def pg(*args: str) -> None:
        subprocess.run([*as_postgres, *args], check=True, capture_output=True, timeout=120)

    pg(str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "--no-sync")
    options = f"-p {port} -k {folder} -c listen_addresses=127.0.0.1 -c fsync=off"
    pg(
        str(bindir / "pg_ctl"),
        "-D",
        str(data),
        "-l",
        str(folder / "log"),
        "-w",
        "-o",
        options,
        "start",
    )
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        pg(str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(folder, ignore_errors=True)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _admin(url: str, *statements: str) -> list:
    """Run each statement as the server's superuser; the rows of each (None: no rows)."""
    results = []
    with psycopg.connect(url, autocommit=True) as conn:
        for sql in statements:
            cur = conn.execute(sql)
            results.append(cur.fetchall() if cur.description else None)
    return results


def test_db_query_never_makes_the_query_role_and_db_upgrade_does(private_pg, tmp_path):
    _admin(private_pg, "CREATE DATABASE fleetscribe")
    url = private_pg.rsplit("/", 1)[0] + "/fleetscribe"
    engine = make_engine(url)
    upgrade(engine, OLDER)  # before 0003: no query role anywhere on this server
    engine.dispose()
    env = {"FLEETSCRIBE_DATABASE_URL": url}
    roles = "SELECT rolname FROM pg_roles ORDER BY 1"
    members = "SELECT roleid, member FROM pg_auth_members ORDER BY 1, 2"
    before = _admin(private_pg, roles, members)
    assert [QUERY_ROLE] not in [list(r) for r in before[0]]

    # the superuser may run programs on the server: without the role it is refused, and
    # the role is not made
    out = run_cli(["db", "query", "SELECT 1"], tmp_path, env)
    assert out.returncode == 2
    assert out.stderr.splitlines() == [
        "error: refused: the database user may run programs or write files on the server, and "
        f"the read-only role {QUERY_ROLE} does not exist (python -m db upgrade makes it, as a "
        "user that may create roles); connect `db query` as an ordinary user"
    ]
    assert _admin(private_pg, roles, members) == before

    # db upgrade makes it; then the superuser's query runs as that role
    assert run_cli(["db", "upgrade", "--wait", "5"], tmp_path, env).returncode == 0
    assert [QUERY_ROLE] in [list(r) for r in _admin(private_pg, roles)[0]]
    after = run_cli(["db", "query", "SELECT current_user AS who", "--format", "csv"], tmp_path, env)
    assert after.returncode == 0, after.stderr
    assert after.stdout.splitlines() == ["who", QUERY_ROLE]


def test_a_migrating_user_that_may_not_make_roles_still_upgrades(private_pg, tmp_path):
    _admin(
        private_pg,
        "CREATE ROLE owner LOGIN",  # no CREATEROLE, no superuser
        "CREATE DATABASE fleetscribe OWNER owner",
    )
    url = private_pg.rsplit("/", 1)[0].replace("postgres@", "owner@") + "/fleetscribe"
    env = {"FLEETSCRIBE_DATABASE_URL": url}
    up = run_cli(["db", "upgrade", "--wait", "5"], tmp_path, env)
    assert up.returncode == 0, up.stderr
    assert _revision(url) == head_revision()
    assert _admin(private_pg, f"SELECT 1 FROM pg_roles WHERE rolname = '{QUERY_ROLE}'") == [[]]
    # an ordinary user needs no query role: it reads as itself
    out = run_cli(["db", "query", "SELECT current_user AS who", "--format", "csv"], tmp_path, env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["who", "owner"]


# --- the models and the migrations agree ----------------------------------------------------


def _key_columns(expression) -> tuple[str, bool]:
    """(column, descending) of one key of a model's index: a column or text('col DESC')."""
    words = str(expression).split(".")[-1].split()
    return words[0], len(words) > 1 and words[1].upper() == "DESC"


def _sorted_alike(conn, diffs: list) -> set[str]:
    """The indexes that autogenerate reports removed and added again on SQLite only because
    SQLAlchemy reflects no sort order there: the stored index has the model's keys and
    directions (PRAGMA index_xinfo), so it is the same index."""
    removed = {d[1].name for d in diffs if isinstance(d, tuple) and d[0] == "remove_index"}
    added = {d[1].name: d[1] for d in diffs if isinstance(d, tuple) and d[0] == "add_index"}
    same = set()
    for name in removed & added.keys():
        stored = [
            (row[2], bool(row[3]))
            for row in conn.exec_driver_sql(f'PRAGMA index_xinfo("{name}")')
            if row[5]  # a key column, not the rowid
        ]
        if stored == [_key_columns(e) for e in added[name].expressions]:
            same.add(name)
    return same


def _differences(url: str) -> list:
    """What alembic's autogenerate finds between the database at `url` and db.models (types
    and server defaults included): nothing, when the migrations build what the models say."""
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    from db.models import Base

    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            context = MigrationContext.configure(
                conn, opts={"compare_type": True, "compare_server_default": True}
            )
            diffs = compare_metadata(context, Base.metadata)
            if conn.dialect.name == "sqlite":
                same = _sorted_alike(conn, diffs)
                diffs = [
                    d
                    for d in diffs
                    if not (
                        isinstance(d, tuple)
                        and d[0] in ("remove_index", "add_index")
                        and d[1].name in same
                    )
                ]
            return diffs
    finally:
        engine.dispose()


def _downgrade(url: str, revision: str) -> None:
    from alembic import command

    from db.migrate import alembic_config

    engine = make_engine(url)
    try:
        cfg = alembic_config(url)
        with engine.connect() as connection:
            cfg.attributes["connection"] = connection
            command.downgrade(cfg, revision)
            connection.commit()
    finally:
        engine.dispose()


def test_the_migrations_build_what_the_models_say(db_url):
    engine = make_engine(db_url)
    upgrade(engine)
    engine.dispose()
    assert _differences(db_url) == []


def test_down_to_0004_and_up_again_keeps_the_rows_and_the_schema(db_url):
    engine = make_engine(db_url)
    upgrade(engine)
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO batches (id, created_at, frames, priority, inputs, note) "
                "VALUES (1, :at, 8, 0, 1, '')"
            ),
            {"at": "2026-01-01 00:00:00"},
        )
        conn.execute(
            text(
                "INSERT INTO videos (id, path, sha256, state, reason, attempts, priority, "
                "batch_id, created_at, updated_at) VALUES (1, '/v/a.mp4', :sha, 'failed', "
                "'decode error', 1, 0, 1, :at, :at)"
            ),
            {"sha": "a" * 64, "at": "2026-01-01 00:00:00"},
        )
        conn.execute(
            text(
                "INSERT INTO submissions (batch_id, path, video_id, outcome, created_at) "
                "VALUES (1, '/v/a.mp4', 1, 'queued', :at)"
            ),
            {"at": "2026-01-01 00:00:00"},
        )
    engine.dispose()

    _downgrade(db_url, "0004")
    assert _revision(db_url) == "0004"
    engine = make_engine(db_url)
    names = {i["name"] for i in inspect(engine).get_indexes("videos")}
    assert "ix_videos_backlog" not in names and "ix_videos_unpublished" in names
    assert upgrade(engine) == ("0004", head_revision())
    with engine.connect() as conn:
        row = conn.execute(text("SELECT path, state, reason FROM videos")).one()
    engine.dispose()
    assert tuple(row) == ("/v/a.mp4", "failed", "decode error")
    assert _differences(db_url) == []


# --- 0007: sampling in the report key, with reports and hazards in the store ----------------


def _at_0006_with_a_report(url: str) -> None:
    """A store at 0006 holding one done video, its report and two hazards."""
    engine = make_engine(url)
    upgrade(engine, "0006")
    at = {"at": "2026-01-01 00:00:00"}
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO batches (id, created_at, frames, priority, inputs, note) "
                "VALUES (1, :at, 8, 0, 1, '')"
            ),
            at,
        )
        conn.execute(
            text(
                "INSERT INTO videos (id, path, sha256, state, attempts, priority, frames, "
                "batch_id, created_at, updated_at) VALUES (1, '/v/a.mp4', :sha, 'done', 1, 0, "
                "2, 1, :at, :at)"
            ),
            {"sha": "a" * 64, **at},
        )
        conn.execute(
            text(
                "INSERT INTO reports (id, video_id, model, adapter, prompt_version, "
                "schema_version, valid, raw_text, report, risk_factor, frame_timestamps, "
                "tokens_in, tokens_out, latency_s, worker_host, created_at) VALUES (1, 1, 'm', "
                "'', 2, 1, true, '{}', '{}', 'high', '[0.5, 1.5]', 10, 5, 0.1, 'h', :at)"
            ),
            at,
        )
        conn.execute(
            text(
                "INSERT INTO hazards (id, report_id, video_id, kind, description, frame, "
                "timestamp_s) VALUES (1, 1, 1, 'pedestrian', 'crossing', 0, 0.5), "
                "(2, 1, 1, 'vehicle', 'braking', 1, 1.5)"
            )
        )
    engine.dispose()


def _rows(url: str) -> dict:
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            return {
                "videos": conn.execute(text("SELECT id, path, state FROM videos")).all(),
                "reports": conn.execute(
                    text("SELECT id, video_id, model, risk_factor FROM reports")
                ).all(),
                "hazards": conn.execute(
                    text("SELECT id, report_id, kind, timestamp_s FROM hazards ORDER BY id")
                ).all(),
            }
    finally:
        engine.dispose()


def test_0006_to_0007_and_back_keeps_reports_and_hazards(db_url):
    _at_0006_with_a_report(db_url)
    before = _rows(db_url)
    assert len(before["hazards"]) == 2

    engine = make_engine(db_url)
    assert upgrade(engine, "0007") == ("0006", "0007")
    with engine.connect() as conn:
        added = conn.execute(
            text("SELECT sampling, sampling_note, frames, event_frames FROM reports")
        ).one()
        hazards = conn.execute(text("SELECT frame_reason, frame_score FROM hazards")).all()
        video = conn.execute(text("SELECT sampling FROM videos")).scalar()
        if conn.dialect.name == "sqlite":  # the pooled connection has its foreign keys back
            assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
    engine.dispose()
    assert tuple(added) == ("uniform", None, None, 0)
    assert [tuple(h) for h in hazards] == [(None, None)] * 2 and video is None
    assert _rows(db_url) == before
    assert _differences(db_url) == []

    _downgrade(db_url, "0006")
    assert _revision(db_url) == "0006"
    assert _rows(db_url) == before
    engine = make_engine(db_url)
    assert "sampling" not in {c["name"] for c in inspect(engine).get_columns("reports")}
    assert upgrade(engine) == ("0006", head_revision())
    engine.dispose()
    assert _rows(db_url) == before
    assert _differences(db_url) == []


def test_the_report_key_holds_both_modes_and_the_downgrade_refuses_to_lose_one(db_url):
    _at_0006_with_a_report(db_url)
    engine = make_engine(db_url)
    upgrade(engine)
    copy = (
        "INSERT INTO reports (id, video_id, model, adapter, prompt_version, schema_version, "
        "valid, raw_text, frame_timestamps, sampling, event_frames, tokens_in, tokens_out, "
        "latency_s, worker_host, created_at) SELECT :id, video_id, model, adapter, "
        "prompt_version, schema_version, valid, raw_text, frame_timestamps, :mode, 1, "
        "tokens_in, tokens_out, latency_s, worker_host, created_at FROM reports WHERE id = 1"
    )
    with engine.begin() as conn:
        conn.execute(text(copy), {"id": 2, "mode": "events"})
    with pytest.raises(IntegrityError, match=r"uq_report_key|UNIQUE"), engine.begin() as conn:
        conn.execute(text(copy), {"id": 3, "mode": "uniform"})  # still one report a mode
    engine.dispose()

    with pytest.raises(RuntimeError, match="1 videos have reports that differ only by sampling"):
        _downgrade(db_url, "0006")
    assert _revision(db_url) == head_revision()
    assert len(_rows(db_url)["reports"]) == 2 and len(_rows(db_url)["hazards"]) == 2
