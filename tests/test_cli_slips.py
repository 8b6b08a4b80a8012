"""Slips a user makes, each caught through the real CLI (a subprocess, a clean FLEETSCRIBE_*
environment) with one line saying what is wrong and a non-zero exit; reasons word for word."""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from conftest import PG_ADMIN_URL
from sqlalchemy import inspect

from config.settings import DEFAULT_SAMPLING
from db.migrate import upgrade
from db.models import Video, VideoState
from db.session import make_engine, make_sessionmaker
from db.store import NewReport, add_video, create_batch, record_report
from models.prompt import PROMPT_VERSION
from producer.clips import make_video

ROOT = Path(__file__).resolve().parents[1]


def cli_env(tmp_path: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a fresh shell: no FLEETSCRIBE_* but FLEETSCRIBE_HOME (and `extra`)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEETSCRIBE_")}
    env.update(FLEETSCRIBE_HOME=str(tmp_path / "home"), HF_HUB_OFFLINE="1", NO_COLOR="1")
    env.update(extra or {})
    return env


def run_cli(
    args: list[str], tmp_path: Path, extra: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess:
    """`python -m ARGS...` from the repository root."""
    return subprocess.run(
        [sys.executable, "-m", *args],
        cwd=ROOT,
        env=cli_env(tmp_path, extra),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def error_lines(out: subprocess.CompletedProcess) -> list[str]:
    return [line for line in out.stderr.splitlines() if line.startswith("error:")]


def notice(home: Path, made: bool = False) -> str:
    """The line a command on the embedded default prints first (its file, relative to ROOT
    when inside it)."""
    path = (home / "fleetscribe.db").resolve()
    shown = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
    suffix = "; made now" if made else ""
    return f"using the embedded store {shown} (FLEETSCRIBE_DATABASE_URL unset{suffix})"


# --- B1: postgres:// (Heroku's spelling) ----------------------------------------------------


def test_postgres_scheme_is_postgresql_in_every_command(pg_url, tmp_path):
    heroku = pg_url.replace("postgresql://", "postgres://", 1)
    assert heroku.startswith("postgres://") and heroku != pg_url
    env = {"FLEETSCRIBE_DATABASE_URL": heroku}
    upgraded = run_cli(["db", "upgrade", "--wait", "5"], tmp_path, env)
    assert upgraded.returncode == 0, upgraded.stderr
    status = run_cli(["producer", "status"], tmp_path, env)
    assert status.returncode == 0, status.stderr
    assert "queued" in status.stdout
    query = run_cli(
        ["db", "query", "SELECT count(*) AS n FROM videos", "--format", "json"], tmp_path, env
    )
    assert query.returncode == 0, query.stderr
    assert json.loads(query.stdout) == [{"n": 0}]
    # the schema went to that PostgreSQL database, not to a SQLite file under HOME
    engine = make_engine(pg_url)
    try:
        assert "videos" in inspect(engine).get_table_names()
    finally:
        engine.dispose()
    assert not (tmp_path / "home").exists()


# --- B2: permanent database errors fail at once --------------------------------------------


@pytest.mark.parametrize("command", [["producer", "status"], ["db", "upgrade"]])
def test_a_database_that_does_not_exist_fails_at_once_naming_it(tmp_path, command):
    name = f"fleetscribe_nowhere_{uuid.uuid4().hex[:8]}"
    url = f"{PG_ADMIN_URL.rsplit('/', 1)[0]}/{name}"
    began = time.monotonic()
    out = run_cli(command, tmp_path, {"FLEETSCRIBE_DATABASE_URL": url})
    elapsed = time.monotonic() - began
    assert out.returncode == 2, out.stdout + out.stderr
    shown = make_engine(url).url.render_as_string(hide_password=True)
    assert out.stderr.splitlines() == [
        f'error: cannot use database {shown}: database "{name}" does not exist'
    ]
    assert elapsed < 5, f"took {elapsed:.1f} s: it waited instead of failing"


def test_an_unknown_host_name_fails_at_once(tmp_path):
    url = "postgresql://postgres@no-such-host.invalid:5432/fleetscribe"
    began = time.monotonic()
    out = run_cli(["producer", "status"], tmp_path, {"FLEETSCRIBE_DATABASE_URL": url})
    assert out.returncode == 2
    [line] = out.stderr.splitlines()
    assert line.startswith(
        "error: cannot use database postgresql+psycopg://postgres@no-such-host.invalid:5432/"
        "fleetscribe: failed to resolve host 'no-such-host.invalid'"
    ), line
    assert time.monotonic() - began < 5


def test_a_refused_connection_is_waited_for_then_one_line(tmp_path):
    url = "postgresql://postgres@127.0.0.1:1/fleetscribe"
    began = time.monotonic()
    out = run_cli(["db", "upgrade", "--wait", "2"], tmp_path, {"FLEETSCRIBE_DATABASE_URL": url})
    elapsed = time.monotonic() - began
    assert out.returncode == 2
    [line] = out.stderr.splitlines()
    assert line.startswith(
        "error: database postgresql+psycopg://postgres@127.0.0.1:1/fleetscribe did not answer "
        "in 2 s: "
    ), line
    assert elapsed >= 2, "a refused connection is transient: it is retried until --wait"


# --- B3: unknown FLEETSCRIBE_* variables ----------------------------------------------------


def test_unknown_variables_are_warned_about_and_the_command_runs(tmp_path):
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    out = run_cli(
        ["producer", "status"],
        tmp_path,
        {
            "FLEETSCRIBE_QAUNT": "nf5",
            "FLEETSCRIBE_FRAME": "4",
            "FLEETSCRIBE_NOTHING_LIKE_IT": "1",
            # known names without being Settings fields: no warning
            "FLEETSCRIBE_SECRETS_DIR": str(secrets),
            "FLEETSCRIBE_TEST_PG": PG_ADMIN_URL,
            "FLEETSCRIBE_TEST_REDIS": "redis://127.0.0.1:6379/11",
        },
    )
    assert out.returncode == 0, out.stderr
    assert "queued" in out.stdout
    assert out.stderr.splitlines() == [
        "warning: FLEETSCRIBE_FRAME is not a fleetscribe setting (did you mean "
        "FLEETSCRIBE_FRAMES?)",
        "warning: FLEETSCRIBE_NOTHING_LIKE_IT is not a fleetscribe setting",
        "warning: FLEETSCRIBE_QAUNT is not a fleetscribe setting (did you mean FLEETSCRIBE_QUANT?)",
        notice(tmp_path / "home", made=True),
    ]


# --- B4: URLs with no scheme or an unknown one ----------------------------------------------

_BROKERS = "redis, rediss, filesystem, memory"
_DATABASES = "sqlite, postgresql, postgres"


@pytest.mark.parametrize(
    "variable, value, reason",
    [
        (
            "FLEETSCRIBE_BROKER_URL",
            "amqp//oops",
            f"'amqp//oops' is not a broker URL (no SCHEME://); the scheme is one of {_BROKERS}",
        ),
        (
            "FLEETSCRIBE_BROKER_URL",
            "amqp://guest:s3cret@rabbit//",
            f"unknown scheme 'amqp' in a broker URL: the scheme is one of {_BROKERS}",
        ),
        (
            "FLEETSCRIBE_BROKER_URL",
            "redis//:s3cret@host:6379/0",
            "'redis//:***@host:6379/0' is not a broker URL (no SCHEME://); the scheme is one of "
            f"{_BROKERS}",
        ),
        (
            "FLEETSCRIBE_DATABASE_URL",
            "mysql://fleetscribe@db/fleetscribe",
            f"unknown scheme 'mysql' in a database URL: the scheme is one of {_DATABASES}",
        ),
        (
            "FLEETSCRIBE_DATABASE_URL",
            "localhost/fleetscribe",
            "'localhost/fleetscribe' is not a database URL (no SCHEME://); the scheme is one of "
            f"{_DATABASES}",
        ),
    ],
    ids=["broker-no-separator", "broker-amqp", "broker-password-hidden", "db-mysql", "db-bare"],
)
def test_a_url_without_a_known_scheme_is_a_bad_setting(tmp_path, variable, value, reason):
    for command in (["producer", "status"], ["db", "query", "SELECT 1"]):
        out = run_cli(command, tmp_path, {variable: value})
        assert out.returncode == 2, out.stdout + out.stderr
        assert out.stderr.splitlines() == [f"error: bad setting: {variable}: {reason}"]
        assert "s3cret" not in out.stderr
    assert not (tmp_path / "home").exists()  # refused before anything was made


# --- B5: worker --gpus / --concurrency --------------------------------------------------------


def test_worker_gpu_ids_must_be_numbers(tmp_path):
    out = run_cli(["worker", "--gpus", "abc"], tmp_path)
    assert out.returncode == 2
    assert out.stderr.splitlines() == [
        "error: Invalid value for '--gpus': 'abc': GPU ids are whole numbers, comma-separated "
        "(0,1) (see python -m worker --help)"
    ]
    assert "Traceback" not in out.stderr


def test_worker_gpus_that_torch_does_not_see_are_refused(tmp_path):
    import torch

    seen = torch.cuda.device_count()  # 0 on the CPU machines the suite runs on
    asked = f"{seen},{seen + 1}"
    out = run_cli(["worker", "--gpus", asked], tmp_path)
    assert out.returncode == 2
    count = f"{seen} GPU" + ("" if seen == 1 else "s")
    ids = f" (ids 0-{seen - 1})" if seen > 1 else " (id 0)" if seen == 1 else ""
    assert out.stderr.splitlines() == [
        f"error: --gpus {asked}: GPUs {seen}, {seen + 1} not found: torch sees {count}{ids}"
    ]
    # refused before the store was opened or the model looked for
    assert not (tmp_path / "home").exists()


def test_worker_concurrency_is_at_least_one(tmp_path):
    out = run_cli(["worker", "--concurrency", "0"], tmp_path)
    assert out.returncode == 2
    assert out.stderr.splitlines() == [
        "error: Invalid value for '--concurrency' / '-c': 0 is not in the range x>=1. "
        "(see python -m worker --help)"
    ]


# --- B6: enqueue of paths that do not exist -------------------------------------------------


def test_enqueue_of_a_missing_path_is_one_line_and_exit_2(tmp_path):
    missing = tmp_path / "videos" / "typo.mp4"
    out = run_cli(["producer", "enqueue", str(missing)], tmp_path)
    assert out.returncode == 2
    assert out.stdout == ""
    assert out.stderr.splitlines() == [f"error: no such file: {missing}"]
    assert not (tmp_path / "home").exists()  # no batch, no store


def test_enqueue_of_several_missing_paths_lists_each(tmp_path):
    a, b = tmp_path / "a.mp4", tmp_path / "b.mp4"
    out = run_cli(["producer", "enqueue", str(a), str(b)], tmp_path)
    assert out.returncode == 2
    assert out.stderr.splitlines() == [
        f"error: no such file: {a}",
        f"error: no such file: {b}",
        "error: none of the 2 inputs exist; nothing enqueued",
    ]


def test_enqueue_of_mixed_inputs_sends_the_existing_and_exits_1(tmp_path):
    good = make_video(tmp_path / "videos" / "good.mp4", seconds=1, fps=8, width=96, height=64)
    gone = [tmp_path / "videos" / "gone.mp4", tmp_path / "elsewhere" / "typo.mkv"]
    manifest = tmp_path / "list.txt"
    manifest.write_text(f"{gone[1]}\n")
    out = run_cli(
        ["producer", "enqueue", str(good), str(gone[0]), "--manifest", str(manifest)], tmp_path
    )
    assert out.returncode == 1, out.stdout + out.stderr
    assert "1 videos sent to the describe queue" in out.stdout
    # listed once, on stderr, not among the rejected files on stdout
    assert not [line for line in out.stdout.splitlines() if line.startswith("rejected ")]
    assert error_lines(out) == [f"error: no such file: {p}" for p in gone]
    # the existing input is queued; the missing ones are accounted for as rejected
    conn = sqlite3.connect(tmp_path / "home" / "fleetscribe.db")
    try:
        rows = conn.execute("SELECT path, state, reason FROM videos ORDER BY id").fetchall()
    finally:
        conn.close()
    assert rows == [
        (str(good), "queued", None),
        (str(gone[0]), "rejected", "no such file"),
        (str(gone[1]), "rejected", "no such file"),
    ]


# --- B7: status of a batch that does not exist ----------------------------------------------


def test_status_of_an_unknown_batch_names_the_newest(tmp_path):
    empty = run_cli(["producer", "status", "--batch", "99"], tmp_path)
    assert empty.returncode == 2
    assert error_lines(empty) == ["error: no batch 99 (there is no batch yet)"]
    clip = make_video(tmp_path / "videos" / "a.mp4", seconds=1, fps=8, width=96, height=64)
    for _ in range(2):
        assert run_cli(["producer", "enqueue", str(clip)], tmp_path).returncode == 0
    out = run_cli(["producer", "status", "--batch", "99"], tmp_path)
    assert out.returncode == 2
    assert out.stdout == ""
    assert out.stderr.splitlines() == [
        notice(tmp_path / "home"),
        "error: no batch 99 (the newest is 2)",
    ]
    assert run_cli(["producer", "status", "--batch", "2"], tmp_path).returncode == 0


# --- B8: requeue says why matching reports are not sent -------------------------------------

MODEL = "tiny-model-x"


def _report(video_id: int, *, risk: str, prompt_version: int) -> NewReport:
    return NewReport(
        video_id=video_id,
        model=MODEL,
        adapter="",
        prompt_version=prompt_version,
        schema_version=1,
        raw_text="{}",
        report={"driving_parameters": {"risk_factor": risk}},
        error=None,
        frame_timestamps=[0.0],
        tokens_in=1,
        tokens_out=1,
        latency_s=0.1,
        worker_host="test",
        sampling=DEFAULT_SAMPLING,  # what requeue describes with when no mode is given
    )


@pytest.fixture
def reported(sqlite_url):
    """Four videos with 'critical' reports: two from the current prompt, one from the older
    prompt (done), one from the older prompt but queued again."""
    engine = make_engine(sqlite_url)
    upgrade(engine)
    with make_sessionmaker(engine)() as session:
        batch = create_batch(session=session, frames=1, priority=0, inputs=4, note="")
        ids = [
            add_video(
                session=session,
                path=f"/data/{n}.mp4",
                sha256=n * 64,
                state=VideoState.QUEUED,
                batch_id=batch.id,
            ).id
            for n in "abcd"
        ]
        for vid, version in zip(ids, [PROMPT_VERSION, PROMPT_VERSION, 1, 1], strict=True):
            record_report(
                session=session, new=_report(vid, risk="critical", prompt_version=version)
            )
        record_report(session=session, new=_report(ids[0], risk="low", prompt_version=1))
        session.get(Video, ids[3]).state = VideoState.QUEUED
        session.commit()
    engine.dispose()
    return sqlite_url, ids


def test_requeue_says_how_many_match_and_why_none_is_sent(reported, tmp_path):
    url, _ids = reported
    env = {"FLEETSCRIBE_DATABASE_URL": url, "FLEETSCRIBE_MODEL": MODEL}
    where = f"risk_factor = 'critical' and prompt_version = {PROMPT_VERSION}"
    out = run_cli(["producer", "requeue", "--where", where, "--dry-run"], tmp_path, env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[0] == (
        f"2 videos match: {where} (2 reports); 0 to describe again: 2 already have a report "
        f"from prompt v{PROMPT_VERSION} (model {MODEL}, no adapter)"
    )


def test_requeue_counts_what_goes_again_and_what_is_skipped(reported, tmp_path):
    url, ids = reported
    env = {"FLEETSCRIBE_DATABASE_URL": url, "FLEETSCRIBE_MODEL": MODEL}
    out = run_cli(
        ["producer", "requeue", "--where", "risk_factor = 'critical'", "--dry-run"], tmp_path, env
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [
        "4 videos match: risk_factor = 'critical' (4 reports); 1 to describe again; skipped: "
        f"2 already have a report from prompt v{PROMPT_VERSION} (model {MODEL}, no adapter), "
        "1 is queued",
        f"match /data/c.mp4 (video {ids[2]}, prompt v1)",
        "0 videos sent (dry run)",
    ]


# --- B9: --wait with no worker says so ------------------------------------------------------


def test_wait_with_no_worker_says_so_and_keeps_waiting(tmp_path):
    clip = make_video(tmp_path / "videos" / "a.mp4", seconds=1, fps=8, width=96, height=64)
    proc = subprocess.Popen(
        [sys.executable, "-m", "producer", "enqueue", str(clip), "--wait", "--stall-after", "1"],
        cwd=ROOT,
        env=cli_env(tmp_path),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        lines = []
        deadline = time.monotonic() + 60
        while not any(line.startswith("note:") for line in lines):
            assert time.monotonic() < deadline and proc.poll() is None, lines
            lines.append(proc.stderr.readline().rstrip("\n"))
        time.sleep(1.5)
        assert proc.poll() is None, "it stopped waiting"
        proc.send_signal(signal.SIGINT)  # Ctrl-C
        _out, rest = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130
    [note] = [line for line in lines if line.startswith("note:")]
    assert re.fullmatch(
        r"note: no video of batch 1 started or finished in \d+ s: 1 queued, none running, "
        r"and 1 message waits in queue describe: no worker seems to be consuming it "
        r"\(start one: python -m worker\); still waiting \(Ctrl-C stops waiting, the videos "
        r"stay queued\)",
        note,
    ), note
    assert rest.splitlines()[-1] == "aborted"


# --- B10: the embedded store says which file it is ------------------------------------------


def test_the_embedded_store_names_its_file_and_query_does_not_make_one(tmp_path):
    home = tmp_path / "home"
    query = run_cli(["db", "query", "SELECT count(*) FROM videos"], tmp_path)
    assert query.returncode == 2
    shown = notice(home).split("using the embedded store ")[1].split(" (")[0]
    assert query.stderr.splitlines() == [
        notice(home),
        f"error: no embedded store at {shown} (FLEETSCRIBE_DATABASE_URL unset): nothing was "
        "stored under this FLEETSCRIBE_HOME; set FLEETSCRIBE_HOME to the folder that holds it "
        "(make demo: .fleetscribe/demo) or FLEETSCRIBE_DATABASE_URL",
    ]
    assert not (home / "fleetscribe.db").exists()

    status = run_cli(["producer", "status"], tmp_path)
    assert status.returncode == 0
    assert status.stderr.splitlines() == [notice(home, made=True)]
    again = run_cli(
        ["db", "query", "SELECT count(*) AS n FROM videos", "--format", "json"], tmp_path
    )
    assert again.returncode == 0
    assert again.stderr.splitlines() == [notice(home)]
    assert json.loads(again.stdout) == [{"n": 0}]


def test_a_home_inside_the_repository_is_shown_relative(tmp_path):
    home = ROOT / ".fleetscribe" / f"test-{uuid.uuid4().hex[:8]}"
    try:
        out = run_cli(["producer", "status"], tmp_path, {"FLEETSCRIBE_HOME": str(home)})
        assert out.returncode == 0, out.stderr
        assert out.stderr.splitlines() == [
            f"using the embedded store {home.relative_to(ROOT)}/fleetscribe.db "
            "(FLEETSCRIBE_DATABASE_URL unset; made now)"
        ]
    finally:
        import shutil

        shutil.rmtree(home, ignore_errors=True)


def test_a_configured_sqlite_file_that_does_not_exist_is_not_made(tmp_path):
    path = tmp_path / "store" / "fleetscribe.db"
    out = run_cli(
        ["producer", "status"], tmp_path, {"FLEETSCRIBE_DATABASE_URL": f"sqlite:///{path}"}
    )
    assert out.returncode == 2
    assert out.stderr.splitlines() == [
        f"error: no database file {path} (FLEETSCRIBE_DATABASE_URL): run python -m db upgrade "
        "to create it, or correct the path"
    ]
    assert not path.parent.exists()
