"""Archive scale: enqueue streams (chunks, the first message within seconds, a killed
producer resumed), SQL holds the backlog and the broker a bounded window, the fast dedupe
key. Real producer processes, Redis and PostgreSQL; the workers' sweep feeds the window."""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

import pytest
import redis
from helpers import start_enqueue
from sqlalchemy import func, select
from test_pipeline import (
    _env,
    _one_report_each,
    _run,
    _states,
    _wait_for,
    running_worker,
    upgrade_store,
)

from broker.celery_app import queue_depths
from config.settings import Settings
from db import store
from db.models import Batch, Submission, Video, VideoState
from db.session import exclusive, make_engine, make_sessionmaker, session_scope
from delivery import outbox
from producer import enqueue as enq
from producer.clips import distinct_clips
from producer.errors import NoInputs

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]


def _sessions(url: str):
    return make_sessionmaker(make_engine(url))


def _count(url: str, query) -> int:
    with session_scope(_sessions(url)) as session:
        return session.scalar(query)


def _describe_messages(redis_url: str) -> int:
    client = redis.Redis.from_url(redis_url)
    try:
        return sum(client.llen(k) for k in client.keys("describe*") if client.type(k) == b"list")
    finally:
        client.close()


def test_the_first_message_leaves_while_the_archive_is_still_being_found(
    tmp_path, tiny_model, redis_url, pg_url
):
    """300 files through the real Enqueue on Redis + PostgreSQL, the listing paused after
    the first 20 until a message has left: the first chunk is recorded (its own
    transaction) and sent while the rest of the archive is not even found; the window is
    never exceeded and the rest waits in SQL."""
    paths = [str(p) for p in distinct_clips(tmp_path / "archive", 300)]
    env = _env(tmp_path / "home", redis_url, pg_url, tiny_model)
    upgrade_store(env)
    settings = Settings(
        broker_url=redis_url, database_url=pg_url, home=tmp_path / "home", queue_window=40
    )
    sessions = _sessions(pg_url)
    first_sent = threading.Event()
    seen: list[tuple[int, int]] = []  # (found, recorded rows) when the first message left

    def feed() -> int:
        sent = outbox.feed(sessions=sessions, settings=settings)
        if sent and not first_sent.is_set():
            rows = _count(pg_url, select(func.count()).select_from(Submission))
            seen.append((job.counts.found, rows))
            first_sent.set()
        return sent

    def listing():
        yield from paths[:20]
        assert first_sent.wait(120), "no message left while the listing was paused"
        yield from paths[20:]

    job = enq.Enqueue(
        sessions=sessions,
        settings=settings,
        frames=4,
        priority=0,
        note="",
        key="test-stream",
        feed=feed,
    )
    summary = job.run(listing())
    assert summary.outcomes[enq.Outcome.QUEUED] == 300
    ((found_then, rows_then),) = seen
    assert found_then <= 20 and 0 < rows_then <= 20
    assert job.counts.first_sent_s is not None
    assert summary.sent == 40 == _describe_messages(redis_url)  # the window, no more
    with session_scope(sessions) as session:
        assert store.backlog_count(session=session) == 260
        assert session.get(Batch, summary.batch_id).completed_at is not None
        assert session.get(Batch, summary.batch_id).inputs == 300


def test_a_killed_producer_is_resumed_by_the_same_command_without_probing_again(
    tmp_path, tiny_model, redis_url, pg_url
):
    """SIGKILL `producer enqueue` once part of a 400-file archive is recorded; the same
    command again resumes the same batch, probes only the rest, and every file ends up
    recorded once."""
    folder = tmp_path / "archive"
    distinct_clips(folder, 400)
    env = _env(tmp_path / "home", redis_url, pg_url, tiny_model)
    env.update(FLEETSCRIBE_PROBE_PROCESSES="1", FLEETSCRIBE_QUEUE_WINDOW="1000")
    upgrade_store(env)
    producer = start_enqueue(env, folder)
    recorded = select(func.count()).select_from(Submission)
    deadline = time.monotonic() + 120
    while _count(pg_url, recorded) < 40:
        assert producer.poll() is None, "the producer finished before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.05)
    producer.send_signal(signal.SIGKILL)
    producer.wait()
    before = _count(pg_url, recorded)
    assert 40 <= before < 400
    assert _count(pg_url, select(Batch.completed_at)) is None  # left unfinished

    again = _run(["producer", "enqueue", str(folder)], env)
    assert again.returncode == 0, again.stdout + again.stderr
    assert f"(resumed: {before} recorded before)" in again.stdout
    assert f"{400 - before} files probed" in again.stdout, again.stdout
    assert _count(pg_url, select(func.count()).select_from(Batch)) == 1
    assert _count(pg_url, recorded) == 400
    assert _count(pg_url, select(func.count(func.distinct(Submission.path)))) == 400
    assert _count(pg_url, select(func.count()).select_from(Video)) == 400
    assert _count(pg_url, select(func.count()).where(Video.state == VideoState.QUEUED)) == 400
    # the same command once more is a new batch: every file already queued, none probed twice
    third = _run(["producer", "enqueue", str(folder)], env)
    assert third.returncode == 0 and "already_queued │    400" in third.stdout, third.stdout


def test_the_broker_holds_a_window_the_workers_sweep_keeps_full(
    tmp_path, tiny_model, redis_url, pg_url
):
    """QUEUE_WINDOW=6: enqueue 30 videos, the broker holds 6 and the store 24 as backlog
    (`producer status` says both); with no producer left, a worker's sweep feeds the rest
    and every video is described once."""
    count = 30
    distinct_clips(tmp_path / "archive", count)
    env = _env(tmp_path / "home", redis_url, pg_url, tiny_model)
    env.update(
        FLEETSCRIBE_QUEUE_WINDOW="6",
        FLEETSCRIBE_CONSTRAINED="false",
        FLEETSCRIBE_MAX_NEW_TOKENS="4",
        FLEETSCRIBE_SWEEP_S="1",
        FLEETSCRIBE_HEARTBEAT_S="1",
        OMP_NUM_THREADS="1",
    )
    upgrade_store(env)
    sent = _run(["producer", "enqueue", str(tmp_path / "archive")], env)
    assert sent.returncode == 0, sent.stdout + sent.stderr
    assert "6 videos sent" in sent.stdout and "24 wait in the backlog" in sent.stdout
    assert _describe_messages(redis_url) == 6
    status = _run(["producer", "status"], env)
    assert "queued: 24 in the backlog (SQL, not sent), 6 sent" in status.stdout, status.stdout
    assert "window holds at most 6 describe messages" in status.stdout
    assert "queue describe: 6 messages waiting" in status.stdout

    log = tmp_path / "worker.log"
    peak = [0]
    stop = threading.Event()

    def watch() -> None:  # the broker never holds more than the window
        while not stop.is_set():
            peak[0] = max(peak[0], _describe_messages(redis_url))
            time.sleep(0.05)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        with running_worker(env, log):
            _wait_for(lambda: _states(pg_url).get("done") == count, 240, "every video", log)
    finally:
        stop.set()
        watcher.join()
    assert peak[0] <= 6
    _one_report_each(pg_url, count)


def test_the_backlog_goes_highest_priority_first_then_oldest(migrated):
    _, sessions = migrated
    with session_scope(sessions) as session:
        batch, _ = store.open_batch(session=session, key=None, frames=4, priority=0, note="")
        for i, priority in enumerate([0, 5, 0, 9, 5]):
            store.add_video(
                session=session,
                path=f"/v{i}.mp4",
                sha256=f"{i:064x}",
                batch_id=batch.id,
                priority=priority,
                state=VideoState.QUEUED,
            )
        sent = store.add_video(
            session=session, path="/sent.mp4", batch_id=batch.id, priority=9,
            state=VideoState.QUEUED, published_at=store.utcnow(),
        )  # fmt: skip
    with session_scope(sessions) as session:
        order = [v.path for v in store.backlog(session=session, limit=10)]
        assert order == ["/v3.mp4", "/v1.mp4", "/v4.mp4", "/v0.mp4", "/v2.mp4"]
        assert [v.path for v in store.backlog(session=session, limit=2)] == order[:2]
        assert store.backlog_count(session=session) == 5
        assert sent.path not in order


def test_one_feeder_at_a_time_on_postgresql(pg_url):
    sessions = _sessions(pg_url)
    with exclusive(sessions, 42) as first:
        with exclusive(sessions, 42) as second:
            assert first and not second
        with exclusive(sessions, 43) as other:
            assert other  # another key is another lock
    with exclusive(sessions, 42) as again:
        assert again  # released with its transaction


def test_the_window_is_sized_from_the_throughput(migrated):
    from datetime import timedelta

    from db.models import Worker

    _, sessions = migrated
    settings = Settings(batch_size=8, queue_window_minutes=5)
    with session_scope(sessions) as session:
        assert outbox.window_size(session=session, settings=settings) == outbox.WINDOW_FLOOR
        for i in range(3):
            session.add(Worker(name=f"w{i}", heartbeat_at=store.utcnow()))
        now = store.utcnow()
        for i in range(2000):  # 2,000 finished in the last 5 minutes: 400 a minute
            session.add(
                Video(
                    path=f"/d{i}.mp4",
                    state=VideoState.DONE,
                    finished_at=now - timedelta(seconds=i % 280),
                )
            )
        session.add(
            Video(path="/old.mp4", state=VideoState.DONE, finished_at=now - timedelta(hours=1))
        )
    with session_scope(sessions) as session:
        assert outbox.window_size(session=session, settings=settings) == 2000  # 400/min x 5
        big_batches = Settings(batch_size=512, queue_window_minutes=5)
        assert outbox.window_size(session=session, settings=big_batches) == 2 * 512 * 3
        fixed = Settings(queue_window=77)
        assert outbox.window_size(session=session, settings=fixed) == 77


@pytest.mark.parametrize("first, then", [("sha256", "fast"), ("fast", "sha256")])
def test_the_two_dedupe_keys_never_disagree(first, then, tmp_path, sqlite_url):
    """The same content enqueued under one key and then under the other is one video;
    copies under the fast key are duplicates; each video records the key that decided."""
    clip = distinct_clips(tmp_path / "a", 1)[0]
    copy = tmp_path / "b" / "copy.mp4"
    copy.parent.mkdir()
    copy.write_bytes(clip.read_bytes())
    other = distinct_clips(tmp_path / "c", 2)[1]
    from db.migrate import upgrade

    engine = make_engine(sqlite_url)
    upgrade(engine)
    sessions = make_sessionmaker(engine)

    def run(key: str, paths: list[Path]) -> enq.EnqueueSummary:
        settings = Settings(database_url=sqlite_url, home=tmp_path / "home", dedupe_key=key)
        job = enq.Enqueue(
            sessions=sessions, settings=settings, frames=4, priority=0, note="", key=None
        )
        return job.run(str(p) for p in paths)

    one = run(first, [clip, copy])
    assert one.outcomes == {enq.Outcome.QUEUED: 1, enq.Outcome.DUPLICATE: 1}
    two = run(then, [copy, other])
    # (no feeder here: the first video is still in the backlog, so it counts as resent)
    assert two.outcomes == {enq.Outcome.RESENT: 1, enq.Outcome.QUEUED: 1}
    with session_scope(sessions) as session:
        videos = session.scalars(select(Video).order_by(Video.id)).all()
        assert len(videos) == 2
        assert [v.dedupe for v in videos] == [first, then]
        assert all(v.fast_key and v.fast_key.startswith("f1:") for v in videos)
        assert (videos[0].sha256 is not None) == (first == "sha256")
    engine.dispose()


def test_a_store_from_before_the_fast_key_is_matched_by_sha256(tmp_path, sqlite_url):
    """A video recorded before fast keys existed (no fast key, only its sha256) is found
    by DEDUPE_KEY=fast: an input of the same size is hashed whole, and the row gains its
    fast key, so the content is not recorded twice."""
    from db.migrate import upgrade

    clip = distinct_clips(tmp_path / "a", 1)[0]
    engine = make_engine(sqlite_url)
    upgrade(engine)
    sessions = make_sessionmaker(engine)
    settings = Settings(database_url=sqlite_url, home=tmp_path / "home", dedupe_key="sha256")
    job = enq.Enqueue(sessions=sessions, settings=settings, frames=4, priority=0, note="", key=None)
    job.run([str(clip)])
    with session_scope(sessions) as session:
        session.execute(Video.__table__.update().values(fast_key=None))  # as 0005 left it
    fast = Settings(database_url=sqlite_url, home=tmp_path / "home", dedupe_key="fast")
    again = enq.Enqueue(sessions=sessions, settings=fast, frames=4, priority=0, note="", key=None)
    summary = again.run([str(clip)])
    assert summary.outcomes == {enq.Outcome.RESENT: 1}  # one video, still in the backlog
    with session_scope(sessions) as session:
        (video,) = session.scalars(select(Video)).all()
        assert video.fast_key is not None and video.dedupe == "sha256"
    engine.dispose()


def test_status_reads_an_unreachable_broker_window_from_the_store(migrated):
    _, sessions = migrated
    settings = Settings(broker_url="memory://", queue_window=3)
    assert queue_depths(settings).unknown
    window = outbox.window(sessions=sessions, settings=settings)
    assert (window.size, window.waiting, window.counted_by) == (3, 0, "store")


def test_discovery_streams_a_large_manifest(tmp_path):
    """The manifest is read a line at a time, and the existence check stops at the first
    input that exists: a bad byte at the end of a 200,000-line manifest is never reached."""
    from producer.discover import any_input_exists, iter_inputs

    manifest = tmp_path / "list.txt"
    real = tmp_path / "real.mp4"
    real.write_bytes(b"x")
    with manifest.open("w") as f:
        f.write(f"{real}\n")
        for i in range(200_000):
            f.write(f"missing/{i}.mp4\n")
    with manifest.open("ab") as f:
        f.write(b"\xff\xfe not utf-8\n")
    assert any_input_exists([], manifest=str(manifest))
    paths = iter_inputs([], manifest=str(manifest))
    assert next(paths) == str(real)
    assert next(paths) == str(tmp_path / "missing/0.mp4")
    with pytest.raises(NoInputs, match="cannot read manifest"):
        list(paths)  # read to the end, the bad line is reached
    assert not any_input_exists([str(tmp_path / "nope.mp4")])
