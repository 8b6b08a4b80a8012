"""Every video accounted for: the outbox, worker heartbeats, shutdowns that invent no
failure, and the watchdog on the GPU thread. Real processes, Redis and PostgreSQL."""

from __future__ import annotations

import base64
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from unittest import mock

import pytest
from helpers import start_enqueue, upgrade_url
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

from db.models import Report, Video, VideoState
from db.session import make_engine, make_sessionmaker
from producer.clips import make_video

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]


def _clips(folder: Path, count: int) -> None:
    for i in range(count):
        make_video(folder / f"clip_{i:02d}.mp4", seconds=1, fps=8, width=96, height=64, seed=i)


def _videos(database: str) -> list[Video]:
    engine = make_engine(database)
    with make_sessionmaker(engine)() as session:
        rows = session.scalars(select(Video).order_by(Video.id)).all()
    engine.dispose()
    return list(rows)


class HangingBroker:
    """A TCP server that accepts connections and never answers: a broker that hung."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.accepted: list[socket.socket] = []
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted.append(conn)  # held open, never read, never answered

    def close(self) -> None:
        for conn in self.accepted:
            conn.close()
        self.sock.close()


def test_a_producer_killed_while_the_broker_hangs_strands_nothing(
    tmp_path, tiny_model, redis_url, pg_url
):
    """SIGKILL the producer while the broker accepts and never answers: its videos stay
    queued with no confirmed message; enqueueing the same folder once the real Redis is
    back sends them again, and each is described exactly once."""
    folder = tmp_path / "videos"
    _clips(folder, 3)
    hung = HangingBroker()
    env = _env(tmp_path / "home", f"redis://127.0.0.1:{hung.port}/0", pg_url, tiny_model)
    env.update(FLEETSCRIBE_CONSTRAINED="false", FLEETSCRIBE_MAX_NEW_TOKENS="4")
    upgrade_store(env)
    producer = start_enqueue(env, folder)
    try:
        deadline = time.monotonic() + 120
        while len(_videos(pg_url)) < 3 or not hung.accepted:
            assert producer.poll() is None, "the producer ended; it should hang on the broker"
            assert time.monotonic() < deadline, "the producer never recorded its videos"
            time.sleep(0.2)
        time.sleep(2)
        assert producer.poll() is None  # still waiting for the broker
        producer.kill()
        producer.wait()
    finally:
        hung.close()
    stranded = _videos(pg_url)
    assert [(v.state, v.published_at) for v in stranded] == [(VideoState.QUEUED, None)] * 3

    env["FLEETSCRIBE_BROKER_URL"] = redis_url  # the broker is back
    listed = _run(["producer", "reap", "--dry-run"], env)
    assert "3 queued, not sent (the backlog)" in listed.stdout, listed.stdout + listed.stderr
    log = tmp_path / "worker.log"
    with running_worker(env, log):
        again = _run(["producer", "enqueue", str(folder), "--wait"], env)
        assert again.returncode == 0, again.stdout + again.stderr + log.read_text()[-3000:]
    # The stranded rows are backlog: this producer's feeder sends them (outcome `resent`,
    # or `already_queued` when its first feed ran before it recorded the folder again).
    assert "3 videos sent" in again.stdout, again.stdout + log.read_text()[-4000:]
    assert re.search(r"(resent|already_queued) +│ +3", again.stdout), again.stdout
    assert all(v.state == VideoState.DONE and v.published_at for v in _videos(pg_url))
    _one_report_each(pg_url, 3)


def test_a_killed_workers_videos_come_back_within_two_minutes(
    tmp_path, tiny_model, redis_url, pg_url
):
    """40 videos; SIGKILL a busy worker and start another: its lapsed heartbeat has its
    videos sent again at once, not after Redis's visibility timeout (30 minutes here)."""
    count = 40
    folder = tmp_path / "videos"
    _clips(folder, count)
    env = _env(tmp_path / "home", redis_url, pg_url, tiny_model)
    env.update(
        FLEETSCRIBE_CONSTRAINED="false",
        FLEETSCRIBE_MAX_NEW_TOKENS="64",
        FLEETSCRIBE_MIN_NEW_TOKENS="64",  # short answers, but a batch lasts a moment
        FLEETSCRIBE_BATCH_SIZE="4",
        FLEETSCRIBE_HEARTBEAT_S="2",
        FLEETSCRIBE_SWEEP_S="3",
        FLEETSCRIBE_VISIBILITY_TIMEOUT="1800",
    )
    log = tmp_path / "worker.log"
    with running_worker(env, log) as first:  # upgrades the store before the worker starts
        sent = _run(["producer", "enqueue", str(folder)], env)
        assert sent.returncode == 0, sent.stdout + sent.stderr
        _wait_for(
            lambda: (s := _states(pg_url)).get("done", 0) >= 8 and s.get("running", 0) >= 1,
            120,
            "a worker busy mid-run",
            log,
        )
        first.kill()  # SIGKILL: its reserved messages stay unacknowledged for 30 minutes
        first.wait()
    killed_at = time.monotonic()
    held = _states(pg_url).get("running", 0)
    assert held >= 1
    with running_worker(env, tmp_path / "worker2.log") as second:
        _wait_for(
            lambda: _states(pg_url).get("done") == count,
            120,
            "every video done",
            tmp_path / "worker2.log",
        )
        took = time.monotonic() - killed_at
        assert second.poll() is None
    assert took < 120
    _one_report_each(pg_url, count)
    # the new worker's sweep gave the dead worker's videos back (their own messages from
    # Redis's unacked set, or new ones, also for a message it popped and never recorded),
    # not Redis's visibility timeout
    swept = (tmp_path / "worker2.log").read_text()
    assert re.search(
        r"restoring [1-9]\d* messages held by a dead worker|sending again [1-9]\d* orphaned",
        swept,
    ), swept[-3000:]


def test_a_message_popped_by_a_worker_killed_before_recording_it_is_sent_again(
    tmp_path, tiny_model, redis_url, pg_url
):
    """kombu pops a message (BRPOP) before it records it as handed out: a worker killed in
    between takes it with it, and no visibility timeout brings it back. `reap` finds the
    video the store says was sent but the broker holds nowhere, and sends it again; one
    the broker counts as handed out is not taken for lost."""
    import json

    import redis

    folder = tmp_path / "videos"
    _clips(folder, 3)
    env = _env(tmp_path / "home", redis_url, pg_url, tiny_model)
    env.update(FLEETSCRIBE_HEARTBEAT_S="0.2")  # a lapse of 0.6 s
    upgrade_store(env)
    sent = _run(["producer", "enqueue", str(folder)], env)
    assert "3 videos sent" in sent.stdout, sent.stdout + sent.stderr
    client = redis.Redis.from_url(redis_url)
    lost = json.loads(client.rpop("describe"))  # the killed worker's pop, never recorded
    held = json.loads(client.rpop("describe"))  # a live worker's, recorded as handed out
    client.hset("unacked", "live-tag", json.dumps([held, "describe", "describe"]))
    client.zadd("unacked_index", {"live-tag": time.time()})
    lost_kwargs = json.loads(base64.b64decode(lost["body"]))[1]
    time.sleep(1)  # both messages confirmed longer ago than the lapse

    dry = _run(["producer", "reap", "--dry-run"], env)
    assert "0 running on a dead worker, 1 sent but gone from the broker" in dry.stdout, (
        dry.stdout + dry.stderr
    )
    line = f"vanished {lost_kwargs['path']} (video {lost_kwargs['video_id']})"
    assert line in dry.stdout, dry.stdout
    assert client.llen("describe") == 1  # a dry run sends nothing

    # Unlike a dry run, `reap` restores what is held for a video no live worker claimed.
    again = _run(["producer", "reap"], env)
    assert "1 messages held by a dead worker put back" in again.stdout, again.stdout
    assert "1 sent but gone from the broker" in again.stdout, again.stdout + again.stderr
    assert "1 videos sent" in again.stdout, again.stdout
    waiting = [json.loads(raw) for raw in client.lrange("describe", 0, -1)]
    ids = sorted(json.loads(base64.b64decode(m["body"]))[1]["video_id"] for m in waiting)
    assert ids == sorted(v.id for v in _videos(pg_url))  # each video's message once
    assert all(v.state == VideoState.QUEUED and v.published_at for v in _videos(pg_url))
    after = _run(["producer", "reap", "--dry-run"], env)
    assert "0 sent but gone from the broker" in after.stdout, after.stdout


def test_the_broker_is_listed_only_when_its_count_says_a_message_is_missing(redis_url):
    """Every worker's sweep asks the broker which sent videos it lost: while the queue's
    count covers them the lists are not read (a fleet's window is thousands of messages);
    once one is gone, it is named, and a handed-out one is not."""
    import json

    import redis
    from redis.client import Pipeline

    from broker.celery_app import DESCRIBE_TASK, make_celery
    from broker.unacked import missing_from_broker
    from config.settings import Settings

    settings = Settings(broker_url=redis_url)
    app = make_celery(settings)
    for video_id in (1, 2, 3, 4):
        app.send_task(DESCRIBE_TASK, kwargs={"video_id": video_id}, queue="describe")
    app.close()
    client = redis.Redis.from_url(redis_url)
    taken = json.loads(client.rpop("describe"))  # handed out and recorded, as a worker does
    client.hset("unacked", "tag-1", json.dumps([taken, "describe", "describe"]))
    listed = mock.patch.object(Pipeline, "lrange", autospec=True, side_effect=Pipeline.lrange)
    with listed as lrange:
        assert missing_from_broker(settings, [1, 2, 3, 4]) == []
        assert lrange.call_count == 0  # counted, not listed
        lost = json.loads(base64.b64decode(json.loads(client.rpop("describe"))["body"]))
        assert missing_from_broker(settings, [1, 2, 3, 4]) == [lost[1]["video_id"]]
        assert lrange.call_count > 0
    assert missing_from_broker(Settings(broker_url="memory://"), [1]) is None


@pytest.mark.parametrize("signals", [1, 2], ids=["warm", "cold"])
def test_a_shutdown_invents_no_failure(signals, tmp_path, tiny_model, redis_url, pg_url):
    """SIGINT once (warm: in-flight work finishes) or twice (cold: it is cut short) on a
    busy worker, then a new worker: every video done once, none ever marked failed."""
    count = 12
    folder = tmp_path / "videos"
    _clips(folder, count)
    env = _env(tmp_path / "home", redis_url, pg_url, tiny_model)
    env.update(
        FLEETSCRIBE_CONSTRAINED="false",
        FLEETSCRIBE_MAX_NEW_TOKENS="200",
        FLEETSCRIBE_MIN_NEW_TOKENS="200",  # slow enough to be cut in the middle
        FLEETSCRIBE_BATCH_SIZE="2",
        FLEETSCRIBE_HEARTBEAT_S="2",
        FLEETSCRIBE_SWEEP_S="3",
    )
    log = tmp_path / "worker.log"
    with running_worker(env, log) as first:  # upgrades the store before the worker starts
        sent = _run(["producer", "enqueue", str(folder)], env)
        assert sent.returncode == 0, sent.stdout + sent.stderr
        _wait_for(lambda: _states(pg_url).get("running", 0) >= 2, 120, "videos in flight", log)
        for _ in range(signals):
            first.send_signal(signal.SIGINT)
            time.sleep(0.5)
        code = first.wait(timeout=120)
    text = log.read_text()
    assert "internal error" not in text and "cannot schedule new futures" not in text, text[-3000:]
    assert "Traceback" not in text, text[-3000:]
    assert code in (0, 1), text[-2000:]  # 1: Celery's exit code of a cold shutdown
    assert _states(pg_url).get("failed", 0) == 0
    with running_worker(env, tmp_path / "worker2.log"):
        _wait_for(
            lambda: _states(pg_url).get("done") == count,
            180,
            "every video done",
            tmp_path / "worker2.log",
        )
    _one_report_each(pg_url, count)
    assert all(v.reason is None for v in _videos(pg_url))


def test_a_redelivered_message_runs_a_video_failed_by_the_worker_again(
    tmp_path, tiny_model, sqlite_url
):
    """`failed` with an internal error is the worker's fault: its redelivered message runs
    it again; `failed` for the file's own reason stays failed."""
    from config.settings import Settings
    from db import store
    from db.session import session_scope
    from producer.enqueue import inspect_file, record
    from worker.lifecycle import WorkerRuntime
    from worker.pipeline import describe_video

    settings = Settings(
        home=tmp_path / "home",
        database_url=sqlite_url,
        model=str(tiny_model),
        quant="fp32",
        frames=2,
        max_new_tokens=4,
        constrained=False,
    )
    paths = [
        make_video(tmp_path / f"{n}.mp4", seconds=1, fps=8, width=96, height=64, seed=i)
        for i, n in enumerate(("bug", "file"))
    ]
    upgrade_url(sqlite_url)
    with WorkerRuntime.open(settings) as rt:
        items = [inspect_file(str(p), settings) for p in paths]
        _, videos = record(items, sessions=rt.sessions, frames=2, priority=0, note="")
        bug, bad_file = (v.id for v in videos)
        with session_scope(rt.sessions) as session:
            store.record_failure(
                session=session, video_id=bug, reason="internal error: KeyError: 'x'"
            )
            store.record_failure(session=session, video_id=bad_file, reason="no decodable frame")
        assert describe_video(rt, video_id=bug, path=str(paths[0]), frames=None) == "done"
        assert describe_video(rt, video_id=bad_file, path=str(paths[1]), frames=None) == "failed"
        with session_scope(rt.sessions) as session:
            assert session.get(Video, bug).attempts == 1
            assert session.scalar(select(func.count()).select_from(Report)) == 1
            assert session.get(Video, bad_file).reason == "no decodable frame"


class HangingRunner:
    """A stand-in for the model runner whose batch never ends (a hung kernel)."""

    first_pass_tokens = answer_tokens = 8

    def __init__(self) -> None:
        self.started = threading.Event()

    def batch_limit(self, tokens, answer_tokens=None) -> int:
        return 4

    def generate(self, prepared, ready=None, upcoming=None):
        self.started.set()
        threading.Event().wait()  # for ever


class _Prepared:
    tokens = 10


def test_the_watchdog_calls_a_stuck_batch_stuck():
    from worker.batcher import Batcher

    runner = HangingRunner()
    stalls: list[str] = []
    batcher = Batcher(runner, wait_s=0.01, stall_s=1.0, on_stall=stalls.append)
    batcher.submit(_Prepared())
    assert runner.started.wait(10)
    deadline = time.monotonic() + 30
    while not stalls and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(stalls) == 1
    assert stalls[0].startswith("GPU batch of 1 videos running for ")
    assert "past its limit of 1 s (FLEETSCRIBE_GPU_STALL_S=1" in stalls[0]


STUCK_WORKER = """
import logging, sys
sys.path[:0] = [{tests!r}]
from test_delivery import HangingRunner, _Prepared
from worker.batcher import Batcher
logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
batcher = Batcher(HangingRunner(), wait_s=0.01, stall_s=1.0)
future = batcher.submit(_Prepared())
future.result()  # never: the watchdog ends the process first
"""


def test_a_stuck_batch_ends_the_process_with_one_line():
    """By default the watchdog exits the process (code 70) with one critical line, so its
    messages are redelivered and the supervisor starts a new worker."""
    out = subprocess.run(
        [sys.executable, "-c", STUCK_WORKER.format(tests=str(ROOT / "tests"))],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 70, out.stderr
    critical = [line for line in out.stderr.splitlines() if line.startswith("CRITICAL")]
    assert len(critical) == 1 and "stuck; exiting so its videos are redelivered" in critical[0]
