"""The store's verbs on SQLite and PostgreSQL: batches, videos, attempts, reports, counts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import func, inspect, select, text

from db import store
from db.models import Batch, Hazard, Report, Submission, Video, VideoState
from db.session import make_engine, session_scope
from models.schema import parse_report

ROOT = Path(__file__).resolve().parents[1]
TIMESTAMPS = [0.25, 0.75, 1.25, 1.75, 2.25, 2.75, 3.25, 3.75]


def report_text() -> str:
    return json.dumps(
        {
            "schema_version": 1,
            "scene_description": "Wet street at night, a van ahead, a pedestrian at a crossing.",
            "driving_parameters": {
                "road_type": "urban",
                "lane_count": 2,
                "ego_lane_position": "right",
                "traffic_light_state": "green",
                "pedestrian_on_road": True,
                "closest_vehicle_distance": "near",
                "ego_vehicle_speed": "moderate",
                "road_curvature": "gentle",
                "weather": "rain",
                "visibility": "poor",
                "time_of_day": "night",
                "traffic_density": "heavy",
                "risk_factor": "critical",
            },
            "hazards": [
                {"kind": "pedestrian", "description": "pedestrian on the crossing", "frame": 2},
                {"kind": "vehicle", "description": "van braking hard", "frame": 7},
                {"kind": "road", "description": "standing water", "frame": 0},
            ],
            "risk_assessment": "Brake now and give way to the pedestrian.",
        }
    )


def new_report(video_id: int, *, raw_text: str | None = None, **overrides) -> store.NewReport:
    """What a worker hands the store, from a parsed model answer."""
    raw = report_text() if raw_text is None else raw_text
    parsed = parse_report(raw, frames=len(TIMESTAMPS))
    fields = {
        "video_id": video_id,
        "model": "tiny-qwen3-vl",
        "adapter": "",
        "prompt_version": 1,
        "schema_version": 1,
        "raw_text": raw,
        "report": parsed.report,
        "error": parsed.error,
        "frame_timestamps": TIMESTAMPS,
        "tokens_in": 1200,
        "tokens_out": 180,
        "latency_s": 0.75,
        "worker_host": "gpu-1",
        "hazards": (parsed.report or {}).get("hazards", []),
    }
    fields.update(overrides)
    return store.NewReport(**fields)


def add_videos(session, batch_id: int | None, *states: VideoState, prefix: str = "v") -> list[int]:
    ids = []
    for i, state in enumerate(states):
        video = store.add_video(
            session=session,
            path=f"/data/{prefix}{i}.mp4",
            sha256=f"{prefix}{i}".ljust(64, "0"),
            bytes=1000 + i,
            state=state,
            batch_id=batch_id,
            frames=8,
        )
        if batch_id is not None:
            store.add_submission(
                session=session,
                batch_id=batch_id,
                path=video.path,
                video_id=video.id,
                outcome="queued",
            )
        ids.append(video.id)
    return ids


@pytest.fixture
def video_id(migrated) -> int:
    """One queued video of one batch, committed."""
    _engine, factory = migrated
    with session_scope(factory) as session:
        batch = store.create_batch(session=session, frames=8, priority=0, inputs=1, note="")
        [vid] = add_videos(session, batch.id, VideoState.QUEUED)
    return vid


def count(factory, model) -> int:
    with factory() as session:
        return session.scalar(select(func.count()).select_from(model))


# --- producer side ------------------------------------------------------------------------


def test_batch_video_and_submission_are_stored(migrated):
    _engine, factory = migrated
    with session_scope(factory) as session:
        batch = store.create_batch(session=session, frames=12, priority=3, inputs=2, note="night")
        assert batch.id is not None  # flushed: ids are usable before commit
        video = store.add_video(
            session=session,
            path="/data/a.mp4",
            sha256="a" * 64,
            bytes=123456,
            duration=9.5,
            codec="h264",
            width=1280,
            height=720,
            fps=30.0,
            state=VideoState.QUEUED,
            batch_id=batch.id,
        )
        assert video.id is not None
        store.add_submission(
            session=session,
            batch_id=batch.id,
            path="/data/a.mp4",
            video_id=video.id,
            outcome="queued",
        )
        store.add_submission(
            session=session,
            batch_id=batch.id,
            path="/link/a.mp4",
            video_id=video.id,
            outcome="duplicate",
        )
        batch_id, vid = batch.id, video.id

    with factory() as session:
        batch = session.get(Batch, batch_id)
        assert (batch.frames, batch.priority, batch.inputs, batch.note) == (12, 3, 2, "night")
        assert batch.created_at is not None
        video = store.find_video(session=session, sha256="a" * 64)
        assert video.id == vid
        assert (video.path, video.bytes, video.codec, video.width, video.height) == (
            "/data/a.mp4",
            123456,
            "h264",
            1280,
            720,
        )
        assert video.state == VideoState.QUEUED
        assert video.attempts == 0
        subs = session.scalars(select(Submission).order_by(Submission.id)).all()
        assert [(s.path, s.video_id, s.outcome) for s in subs] == [
            ("/data/a.mp4", vid, "queued"),
            ("/link/a.mp4", vid, "duplicate"),
        ]
        assert store.find_video(session=session, sha256="b" * 64) is None
        assert store.latest_batch_id(session=session) == batch_id


def test_video_state_is_stored_as_the_plain_string(migrated, video_id):
    engine, _factory = migrated
    with engine.connect() as conn:
        assert conn.execute(text("SELECT state FROM videos")).scalar_one() == "queued"


# --- worker side --------------------------------------------------------------------------


def test_start_attempt_counts_attempts_and_marks_running(migrated, video_id):
    _engine, factory = migrated
    for attempt in (1, 2):
        with session_scope(factory) as session:
            video = store.start_attempt(session=session, video_id=video_id, worker=f"gpu-{attempt}")
            assert video.id == video_id
        with factory() as session:
            video = session.get(Video, video_id)
            assert video.state == VideoState.RUNNING
            assert video.attempts == attempt
            assert video.worker == f"gpu-{attempt}"
            assert video.started_at is not None


def test_start_attempt_on_a_missing_or_finished_video(migrated, video_id):
    _engine, factory = migrated
    with session_scope(factory) as session:
        assert store.start_attempt(session=session, video_id=video_id + 100, worker="w") is None
        session.get(Video, video_id).state = VideoState.DONE
    with session_scope(factory) as session:
        video = store.start_attempt(session=session, video_id=video_id, worker="w")
        assert video.state == VideoState.DONE
    with factory() as session:
        video = session.get(Video, video_id)
        assert (video.state, video.attempts, video.worker) == (VideoState.DONE, 0, None)


def test_record_report_stores_flat_columns_and_hazards(migrated, video_id):
    _engine, factory = migrated
    with session_scope(factory) as session:
        store.start_attempt(session=session, video_id=video_id, worker="gpu-1")
    with session_scope(factory) as session:
        report, created = store.record_report(session=session, new=new_report(video_id))
        assert created is True
        report_id = report.id

    with factory() as session:
        row = session.get(Report, report_id)
        assert row.valid is True
        assert row.error is None
        assert row.raw_text == report_text()
        assert row.report == json.loads(report_text())
        assert (row.model, row.adapter, row.prompt_version, row.schema_version) == (
            "tiny-qwen3-vl",
            "",
            1,
            1,
        )
        flat = {name: getattr(row, name) for name in store.FLAT_FIELDS}
        assert flat == {
            "risk_factor": "critical",
            "road_type": "urban",
            "weather": "rain",
            "visibility": "poor",
            "time_of_day": "night",
            "traffic_density": "heavy",
            "pedestrian_on_road": True,
        }
        assert row.frame_timestamps == TIMESTAMPS
        assert (row.tokens_in, row.tokens_out, row.latency_s, row.worker_host) == (
            1200,
            180,
            0.75,
            "gpu-1",
        )
        hazards = session.scalars(select(Hazard).order_by(Hazard.id)).all()
        assert [(h.kind, h.frame, h.timestamp_s) for h in hazards] == [
            ("pedestrian", 2, TIMESTAMPS[2]),
            ("vehicle", 7, TIMESTAMPS[7]),
            ("road", 0, TIMESTAMPS[0]),
        ]
        assert {h.report_id for h in hazards} == {report_id}
        assert {h.video_id for h in hazards} == {video_id}
        assert hazards[1].description == "van braking hard"
        video = session.get(Video, video_id)
        assert video.state == VideoState.DONE
        assert video.reason is None
        assert video.finished_at is not None


def test_flat_columns_filter_in_plain_sql(migrated, video_id):
    engine, factory = migrated
    with session_scope(factory) as session:
        store.record_report(session=session, new=new_report(video_id))
    with engine.connect() as conn:
        kinds = conn.execute(
            text(
                "SELECT h.kind, count(*) FROM reports r JOIN hazards h ON h.report_id = r.id "
                "WHERE r.risk_factor = 'critical' AND r.pedestrian_on_road "
                "GROUP BY h.kind ORDER BY h.kind"
            )
        ).all()
    assert [tuple(k) for k in kinds] == [("pedestrian", 1), ("road", 1), ("vehicle", 1)]


def test_hazard_frame_without_a_timestamp_is_stored_with_null_time(migrated, video_id):
    _engine, factory = migrated
    new = new_report(video_id, frame_timestamps=TIMESTAMPS[:4])  # frame 7 has no timestamp
    with session_scope(factory) as session:
        store.record_report(session=session, new=new)
    with factory() as session:
        times = session.execute(select(Hazard.frame, Hazard.timestamp_s).order_by(Hazard.id)).all()
    assert [tuple(t) for t in times] == [(2, TIMESTAMPS[2]), (7, None), (0, TIMESTAMPS[0])]


def test_record_report_twice_keeps_the_first_report(migrated, video_id):
    _engine, factory = migrated
    with session_scope(factory) as session:
        first, created = store.record_report(session=session, new=new_report(video_id))
        assert created is True
        first_id = first.id
    # A redelivered task: same key, a different answer this time.
    other = report_text().replace("Brake now", "Slow down")
    with session_scope(factory) as session:
        again, created = store.record_report(
            session=session, new=new_report(video_id, raw_text=other, worker_host="gpu-2")
        )
        assert created is False
        assert again.id == first_id
    assert count(factory, Report) == 1
    assert count(factory, Hazard) == 3
    with factory() as session:
        row = session.get(Report, first_id)
        assert row.raw_text == report_text()
        assert row.worker_host == "gpu-1"
        assert session.get(Video, video_id).state == VideoState.DONE


def test_record_report_twice_in_one_session(migrated, video_id):
    _engine, factory = migrated
    with session_scope(factory) as session:
        first, created_first = store.record_report(session=session, new=new_report(video_id))
        second, created_second = store.record_report(session=session, new=new_report(video_id))
    assert (created_first, created_second) == (True, False)
    assert second.id == first.id
    assert count(factory, Report) == 1
    assert count(factory, Hazard) == 3


def test_another_adapter_or_prompt_version_is_another_report(migrated, video_id):
    _engine, factory = migrated
    keys = [
        {},
        {"adapter": "night-lora"},
        {"prompt_version": 2},
        {"model": "Qwen/Qwen3-VL-4B-Instruct"},
    ]
    for key in keys:
        with session_scope(factory) as session:
            _, created = store.record_report(session=session, new=new_report(video_id, **key))
            assert created is True, key
    assert count(factory, Report) == len(keys)
    assert count(factory, Hazard) == 3 * len(keys)


def test_invalid_report_is_stored_with_its_raw_text_and_no_hazards(migrated, video_id):
    _engine, factory = migrated
    raw = "I think the road is wet { but no JSON here"
    new = new_report(video_id, raw_text=raw)
    assert new.report is None and new.error  # parse_report refused it
    with session_scope(factory) as session:
        report, created = store.record_report(session=session, new=new)
        assert created is True
        report_id = report.id
    with factory() as session:
        row = session.get(Report, report_id)
        assert row.valid is False
        assert row.raw_text == raw
        assert row.error == new.error
        assert row.report is None
        assert all(getattr(row, name) is None for name in store.FLAT_FIELDS)
        assert row.frame_timestamps == TIMESTAMPS
        # An invalid report is still a finished video: the answer is kept for inspection.
        assert session.get(Video, video_id).state == VideoState.DONE
    assert count(factory, Hazard) == 0


def test_record_report_is_undone_with_the_callers_transaction(migrated, video_id):
    _engine, factory = migrated
    with factory() as session:
        store.record_report(session=session, new=new_report(video_id))
        session.rollback()
    assert count(factory, Report) == 0
    assert count(factory, Hazard) == 0
    with factory() as session:
        assert session.get(Video, video_id).state == VideoState.QUEUED


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_concurrent_deliveries_keep_one_report(migrated, video_id):
    """Two workers store the same report at once: the second waits, then keeps the first."""
    engine, factory = migrated
    first = factory()
    second = factory()
    outcome: dict = {}

    def deliver_again():
        try:
            report, created = store.record_report(
                session=second, new=new_report(video_id, worker_host="gpu-2")
            )
            second.commit()
            outcome["result"] = (report.id, created, report.worker_host)
        except Exception as e:  # surfaced by the assertion below
            outcome["error"] = e

    try:
        report, created = store.record_report(session=first, new=new_report(video_id))
        assert created is True
        thread = threading.Thread(target=deliver_again)
        thread.start()
        # Wait until the second insert is blocked on the first one's unique key.
        deadline = time.monotonic() + 10
        with engine.connect() as watcher:
            while time.monotonic() < deadline:
                waiting = watcher.execute(text("SELECT count(*) FROM pg_locks WHERE NOT granted"))
                if waiting.scalar_one() > 0:
                    break
                watcher.rollback()
                time.sleep(0.02)
            else:
                pytest.fail("the second delivery never waited for the first")
        first.commit()
        thread.join(timeout=10)
        assert not thread.is_alive()
        assert "error" not in outcome, outcome.get("error")
        assert outcome["result"] == (report.id, False, "gpu-1")
    finally:
        first.close()
        second.close()
    assert count(factory, Report) == 1
    assert count(factory, Hazard) == 3


def test_record_failure_marks_a_running_video_failed(migrated, video_id):
    _engine, factory = migrated
    with session_scope(factory) as session:
        store.start_attempt(session=session, video_id=video_id, worker="w")
    with session_scope(factory) as session:
        store.record_failure(session=session, video_id=video_id, reason="the file is gone")
        store.record_failure(session=session, video_id=video_id + 100, reason="no such video")
    with factory() as session:
        video = session.get(Video, video_id)
        assert (video.state, video.reason) == (VideoState.FAILED, "the file is gone")
        assert video.finished_at is not None


def test_record_failure_does_not_overwrite_a_done_video(migrated, video_id):
    _engine, factory = migrated
    with session_scope(factory) as session:
        store.record_report(session=session, new=new_report(video_id))
    with session_scope(factory) as session:
        store.record_failure(session=session, video_id=video_id, reason="soft time limit")
    with factory() as session:
        video = session.get(Video, video_id)
        assert video.state == VideoState.DONE
        assert video.reason is None
    assert count(factory, Report) == 1


def test_requeue_video_sends_a_failed_video_round_again(migrated, video_id):
    _engine, factory = migrated
    with session_scope(factory) as session:
        store.record_failure(session=session, video_id=video_id, reason="decoder error")
    with session_scope(factory) as session:
        batch = store.create_batch(session=session, frames=12, priority=5, inputs=1, note="retry")
        video = session.get(Video, video_id)
        store.requeue_video(
            session=session,
            video=video,
            batch_id=batch.id,
            frames=12,
            priority=5,
            sampling="events",
        )
        batch_id = batch.id
    with factory() as session:
        video = session.get(Video, video_id)
        assert (video.state, video.reason, video.finished_at) == (VideoState.QUEUED, None, None)
        assert (video.batch_id, video.frames, video.priority) == (batch_id, 12, 5)
        assert video.sampling == "events"


# --- counts -------------------------------------------------------------------------------


def test_state_counts_for_all_and_per_batch(migrated):
    _engine, factory = migrated
    Q, R, D, F, X = (
        VideoState.QUEUED,
        VideoState.RUNNING,
        VideoState.DONE,
        VideoState.FAILED,
        VideoState.REJECTED,
    )
    with session_scope(factory) as session:
        one = store.create_batch(session=session, frames=8, priority=0, inputs=5, note="one")
        two = store.create_batch(session=session, frames=8, priority=0, inputs=4, note="two")
        ids_one = add_videos(session, one.id, Q, Q, R, D, X, prefix="a")
        ids_two = add_videos(session, two.id, D, F, F, X, prefix="b")
        session.get(Video, ids_one[4]).reason = "not a video: no video stream"
        for vid, reason in zip(ids_two[1:3], ["gone", "decoder error"], strict=True):
            session.get(Video, vid).reason = reason
        # The second batch also resubmits a video of the first (a duplicate).
        store.add_submission(
            session=session, batch_id=two.id, path="/again.mp4", video_id=ids_one[0], outcome="dup"
        )
        batch_one, batch_two = one.id, two.id

    with factory() as session:
        everything = store.state_counts(session=session)
        first = store.state_counts(session=session, batch_id=batch_one)
        second = store.state_counts(session=session, batch_id=batch_two)
        empty = store.state_counts(session=session, batch_id=batch_two + 1)
        rejected = store.rejected_in_batch(session=session, batch_id=batch_one)
        failed = store.failed_in_batch(session=session, batch_id=batch_two)

    assert everything.counts == {Q: 2, R: 1, D: 2, F: 2, X: 2}
    assert (everything.total, everything.pending) == (9, 3)
    assert first.counts == {Q: 2, R: 1, D: 1, F: 0, X: 1}
    assert (first.total, first.pending) == (5, 3)
    assert second.counts == {Q: 1, R: 0, D: 1, F: 2, X: 1}
    assert (second.total, second.pending) == (5, 1)
    assert empty.total == 0 and empty.counts == dict.fromkeys(VideoState, 0)
    assert rejected == [("/data/a4.mp4", "not a video: no video stream")]
    assert failed == [("/data/b1.mp4", "gone"), ("/data/b2.mp4", "decoder error")]


def test_state_counts_throughput_window(migrated, video_id):
    _engine, factory = migrated
    with factory() as session:
        assert store.state_counts(session=session).finished_recently == 0
    with session_scope(factory) as session:
        store.start_attempt(session=session, video_id=video_id, worker="w")
    with session_scope(factory) as session:
        store.record_report(session=session, new=new_report(video_id))
    with factory() as session:
        counts = store.state_counts(session=session)
        assert counts.finished_recently == 1
        assert counts.first_started is not None
        assert counts.last_finished >= counts.first_started
        future = store.state_counts(session=session, window=-timedelta(hours=1))
        assert future.finished_recently == 0


# --- migrations ---------------------------------------------------------------------------


def test_db_upgrade_cli_is_idempotent(db_url, tmp_path):
    env = {**os.environ, "FLEETSCRIBE_DATABASE_URL": db_url, "FLEETSCRIBE_HOME": str(tmp_path)}
    for _ in range(2):
        out = subprocess.run(
            [sys.executable, "-m", "db", "upgrade", "--wait", "5"],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert out.returncode == 0, out.stderr
        assert out.stdout.startswith("database at head"), out.stdout
        assert "Traceback" not in out.stderr
    engine = make_engine(db_url)
    try:
        tables = set(inspect(engine).get_table_names())
        assert {
            "videos",
            "reports",
            "hazards",
            "batches",
            "submissions",
            "alembic_version",
        } <= tables
        with engine.connect() as conn:
            versions = conn.execute(text("SELECT version_num FROM alembic_version")).all()
        assert len(versions) == 1
    finally:
        engine.dispose()


def _connect_params(url: str) -> dict:
    """What make_engine's engine hands the PostgreSQL driver for `url` (no connection made)."""
    from sqlalchemy import event

    engine = make_engine(url)
    seen: dict = {}

    @event.listens_for(engine, "do_connect")
    def _record(dialect, record, cargs, cparams):
        seen.update(cparams)
        raise ConnectionAbortedError("recorded; not connecting")

    with pytest.raises(ConnectionAbortedError):
        engine.connect()
    engine.dispose()
    return seen


def test_postgres_connections_are_bounded_and_a_url_keeps_its_own_bounds():
    bounded = _connect_params("postgresql://postgres@127.0.0.1:5432/fleetscribe")
    assert bounded["connect_timeout"] == 10
    assert (bounded["keepalives"], bounded["keepalives_idle"]) == (1, 30)
    own = _connect_params("postgresql://postgres@127.0.0.1:5432/fleetscribe?connect_timeout=3")
    assert own["connect_timeout"] == "3"  # the URL's, as libpq reads it
    assert own["keepalives"] == 1


def _idle_in_transaction_timeout(url: str) -> str:
    engine = make_engine(url)
    with engine.connect() as conn:
        shown = conn.execute(text("SHOW idle_in_transaction_session_timeout")).scalar_one()
    engine.dispose()
    return shown


def test_postgres_ends_a_transaction_whose_client_went_silent(pg_url):
    """Every connection the engine makes has the server end a transaction left idle for
    5 minutes (a client that vanished holding row locks); a URL may set its own."""
    assert _idle_in_transaction_timeout(pg_url) == "5min"
    own = "?options=-c%20idle_in_transaction_session_timeout%3D0"
    assert _idle_in_transaction_timeout(pg_url + own) == "0"


def test_a_postgres_that_takes_the_connection_and_never_answers_is_given_up_on():
    """A server that accepts the TCP connection and never speaks (a frozen host, a proxy
    with no backend): the connect fails after the default connect_timeout (10 s) instead of
    holding its thread (a worker's slot, or Celery's consumer in task_received) for ever."""
    import socket

    from sqlalchemy.exc import OperationalError

    with socket.create_server(("127.0.0.1", 0)) as silent:  # listens, never accepts or speaks
        port = silent.getsockname()[1]
        engine = make_engine(f"postgresql://postgres@127.0.0.1:{port}/x")
        began = time.monotonic()
        with pytest.raises(OperationalError, match="timeout"):
            engine.connect()
        engine.dispose()
    assert 9 < time.monotonic() - began < 30
