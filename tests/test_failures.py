"""Failures are easy to see: `producer failures` lists failed and rejected videos with their
reasons (counts first) in three formats, and `producer status` shows the broker's queues."""

from __future__ import annotations

import csv
import io
import json
import sqlite3
from pathlib import Path

import pytest
import redis
from sqlalchemy import text
from test_cli_slips import run_cli

from db import store
from db.models import Video
from db.session import make_engine, make_sessionmaker, session_scope
from producer.clips import make_video

# Redis databases 10-12 are this module's (the suite's fixture uses 15).
REDIS_URL = "redis://127.0.0.1:6379/11"
DECODE_REASON = "frame decoding took longer than 4 s, twice; killed"


def _clip(path: Path, seed: int) -> Path:
    return make_video(path, seconds=1, fps=8, width=96, height=64, seed=seed)


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def failures_store(request, tmp_path_factory):
    """A store, made through the CLI from generated files: batch 1 has a good clip, two
    empty files, a text file and a missing path; batch 2 an empty file; then the good clip
    fails in a worker (recorded as a worker records it). Built once per database for the
    module: its tests only list it (`producer failures` reads). Yields (env, engine, the
    folder holding the inputs)."""
    root = tmp_path_factory.mktemp(f"failures-{request.param}")
    if request.param == "sqlite":
        db_url = f"sqlite:///{root / 'fleetscribe.db'}"
    else:
        db_url = request.getfixturevalue("module_pg_url")
    env = {"FLEETSCRIBE_DATABASE_URL": db_url}
    assert run_cli(["db", "upgrade", "--wait", "5"], root, env).returncode == 0
    first, second = root / "first", root / "second"
    good = _clip(first / "good.mp4", seed=1)
    (first / "empty_a.mp4").write_bytes(b"")
    (first / "empty_b.mkv").write_bytes(b"")
    (first / "notes.mp4").write_text("not a video at all\n")
    second.mkdir()
    (second / "empty_c.mp4").write_bytes(b"")
    one = run_cli(["producer", "enqueue", str(first), str(first / "gone.mp4")], root, env)
    assert one.returncode == 1, one.stdout + one.stderr  # gone.mp4 does not exist
    two = run_cli(["producer", "enqueue", str(second)], root, env)
    assert two.returncode == 0, two.stdout + two.stderr
    engine = make_engine(db_url)
    with session_scope(make_sessionmaker(engine)) as session:
        video = session.query(Video).filter(Video.path == str(good)).one()
        video.attempts = 2
        store.record_failure(session=session, video_id=video.id, reason=DECODE_REASON)
    yield env, engine, root
    engine.dispose()


def _reference(engine, where: str = "", params: dict | None = None):
    """What the listing must show, read with plain SQL: (reason counts, rows)."""
    scope = "state IN ('failed', 'rejected')" + (f" AND {where}" if where else "")
    with engine.connect() as conn:
        counts = conn.execute(
            text(
                f"SELECT reason, count(*) AS n FROM videos WHERE {scope} "
                "GROUP BY reason ORDER BY n DESC, reason"
            ),
            params or {},
        ).all()
        rows = conn.execute(
            text(f"SELECT id, state, path, reason, attempts FROM videos WHERE {scope} ORDER BY id"),
            params or {},
        ).all()
    return [(r, n) for r, n in counts], [tuple(r) for r in rows]


def test_failures_json_has_counts_by_reason_then_every_video(failures_store, tmp_path):
    env, engine, _ = failures_store
    out = run_cli(["producer", "failures", "--format", "json"], tmp_path, env)
    assert out.returncode == 0, out.stderr
    listing = json.loads(out.stdout)
    counts, rows = _reference(engine)
    assert counts == [
        ("empty file (0 bytes)", 3),
        (DECODE_REASON, 1),
        ("no such file", 1),
        ("not a video: ffmpeg found no known container format", 1),
    ]
    assert [(r["reason"], r["videos"]) for r in listing["reasons"]] == counts
    assert [
        (v["video_id"], v["state"], v["path"], v["reason"], v["attempts"])
        for v in listing["videos"]
    ] == rows
    assert all(v["finished_at"] for v in listing["videos"])
    assert [v["state"] for v in listing["videos"]].count("failed") == 1


def test_failures_csv_parses_back_to_the_rows(failures_store, tmp_path):
    env, engine, _ = failures_store
    out = run_cli(["producer", "failures", "--format", "csv"], tmp_path, env)
    assert out.returncode == 0, out.stderr
    header, *body = list(csv.reader(io.StringIO(out.stdout)))
    assert header == ["video_id", "state", "path", "reason", "attempts", "finished_at"]
    _counts, rows = _reference(engine)
    assert [(int(r[0]), r[1], r[2], r[3], int(r[4])) for r in body] == rows


def test_failures_table_shows_counts_then_rows(failures_store, tmp_path):
    env, engine, _ = failures_store
    out = run_cli(["producer", "failures"], tmp_path, env)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    counts, rows = _reference(engine)
    # the counts table comes first, most first; then one row per video, then the total
    at = [next(i for i, line in enumerate(lines) if reason in line) for reason, _ in counts]
    assert at == sorted(at)
    for i, (_reason, n) in zip(at, counts, strict=True):
        assert f"│ {n} " in lines[i], lines[i]
    paths = [next(i for i, line in enumerate(lines) if path in line) for _, _, path, _, _ in rows]
    assert at[-1] < paths[0] and paths == sorted(paths)
    assert lines[-1] == "1 failed, 5 rejected (all batches)"


@pytest.mark.parametrize("failures_store", ["sqlite"], indirect=True)
def test_failures_lists_a_page_and_counts_the_rest(failures_store, tmp_path):
    """--limit keeps the listing short on a store with tens of thousands of failures;
    the counts, and the totals line, stay whole."""
    env, engine, _ = failures_store
    _counts, rows = _reference(engine)
    out = run_cli(["producer", "failures", "--limit", "2"], tmp_path, env)
    assert out.returncode == 0, out.stderr
    listed = [path for _, _, path, _, _ in rows if path in out.stdout]
    assert listed == [path for _, _, path, _, _ in rows[:2]]
    assert f"... and {len(rows) - 2} more (--limit 0 lists them all)" in out.stdout
    assert out.stdout.splitlines()[-1] == "1 failed, 5 rejected (all batches)"
    every = run_cli(["producer", "failures", "--limit", "0", "--format", "json"], tmp_path, env)
    assert len(json.loads(every.stdout)["videos"]) == len(rows)


@pytest.mark.parametrize("failures_store", ["sqlite"], indirect=True)
def test_failures_filter_by_reason_and_batch(failures_store, tmp_path):
    env, engine, inputs = failures_store

    def listed(*args: str) -> dict:
        out = run_cli(["producer", "failures", *args, "--format", "json"], tmp_path, env)
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)

    empty = listed("--reason", "EMPTY FILE")  # any case
    counts, rows = _reference(engine, "lower(reason) LIKE '%empty file%'")
    assert (
        [(r["reason"], r["videos"]) for r in empty["reasons"]]
        == counts
        == [("empty file (0 bytes)", 3)]
    )
    assert [v["video_id"] for v in empty["videos"]] == [r[0] for r in rows]
    # a reason's text is matched as text: % and _ are no wildcards
    assert listed("--reason", "%") == {"reasons": [], "videos": []}
    batch2 = listed("--batch", "2")
    assert [(v["path"], v["reason"]) for v in batch2["videos"]] == [
        (str(inputs / "second" / "empty_c.mp4"), "empty file (0 bytes)")
    ]
    none = run_cli(["producer", "failures", "--batch", "2", "--reason", "killed"], tmp_path, env)
    assert none.stdout.splitlines() == [
        "no failed or rejected videos (batch 2, reason containing 'killed')"
    ]
    missing = run_cli(["producer", "failures", "--batch", "7"], tmp_path, env)
    assert missing.returncode == 2
    assert missing.stderr.splitlines() == ["error: no batch 7 (the newest is 2)"]


# --- producer status: the broker's queues ---------------------------------------------------


@pytest.fixture
def redis_db():
    client = redis.Redis.from_url(REDIS_URL)
    client.flushdb()
    yield client
    client.flushdb()
    client.close()


def test_status_shows_the_redis_queues_with_their_priority_lists(redis_db, tmp_path):
    env = {"FLEETSCRIBE_BROKER_URL": REDIS_URL}
    low = [_clip(tmp_path / "low" / f"{i}.mp4", seed=i) for i in range(2)]
    high = _clip(tmp_path / "high" / "urgent.mp4", seed=9)
    assert run_cli(["producer", "enqueue", *map(str, low)], tmp_path, env).returncode == 0
    sent = run_cli(["producer", "enqueue", str(high), "--priority", "5"], tmp_path, env)
    assert sent.returncode == 0, sent.stderr
    # what kombu keeps, read from Redis itself: one list per priority
    assert (redis_db.llen("describe"), redis_db.llen("describe:5")) == (2, 1)

    out = run_cli(["producer", "status"], tmp_path, env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[-3:] == [
        "queue describe: 3 messages waiting (describe 2, describe:5 1)",
        "queue train: 0 messages waiting",
        "taken by workers, not yet acknowledged: 0 messages",
    ]


def test_status_counts_the_filesystem_broker_folder(tmp_path):
    clips = [_clip(tmp_path / "v" / f"{i}.mp4", seed=i) for i in range(3)]
    assert run_cli(["producer", "enqueue", *map(str, clips)], tmp_path).returncode == 0
    folder = tmp_path / "home" / "broker"
    files = sorted(p.name for p in folder.iterdir() if p.name.endswith(".describe.msg"))
    assert len(files) == 3
    out = run_cli(["producer", "status"], tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[-2:] == [
        "queue describe: 3 messages waiting",
        "queue train: 0 messages waiting",
    ]
    # the store agrees: three videos queued
    conn = sqlite3.connect(tmp_path / "home" / "fleetscribe.db")
    try:
        assert conn.execute("SELECT count(*) FROM videos WHERE state = 'queued'").fetchone() == (3,)
    finally:
        conn.close()


def test_status_with_a_broker_that_does_not_answer_still_shows_the_store(tmp_path):
    env = {"FLEETSCRIBE_BROKER_URL": "redis://127.0.0.1:1/0"}
    out = run_cli(["producer", "status"], tmp_path, env)
    assert out.returncode == 0, out.stderr
    assert "queued" in out.stdout
    last = out.stdout.splitlines()[-1]
    assert last.startswith("queues: unknown (the broker did not answer ("), last
