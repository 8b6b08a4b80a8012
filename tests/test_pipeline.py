"""End to end: `producer enqueue --wait` against a real Celery worker process.

Runs twice: on Redis + PostgreSQL (this machine's real servers) and on the embedded
default (SQLite + the server-less filesystem broker).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager, suppress
from pathlib import Path

import av
import numpy as np
import pytest
from helpers import upgrade_url
from report_checks import assert_valid_stored_report
from sqlalchemy import func, select

from db.models import Report, Submission, Video, VideoState
from db.session import make_engine, make_sessionmaker
from producer.clips import make_video

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]
FRAMES = 4


def _env(home: Path, broker: str, database: str, model: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEETSCRIBE_")}
    env.update(
        FLEETSCRIBE_HOME=str(home),
        FLEETSCRIBE_BROKER_URL=broker,
        FLEETSCRIBE_DATABASE_URL=database,
        FLEETSCRIBE_MODEL=str(model),
        FLEETSCRIBE_QUANT="fp32",
        FLEETSCRIBE_FRAMES=str(FRAMES),
        FLEETSCRIBE_MAX_NEW_TOKENS="24",
        HF_HUB_OFFLINE="1",
        PYTHONUNBUFFERED="1",
    )
    return env


@contextmanager
def running_worker(
    env: dict[str, str],
    log: Path,
    concurrency: int | None = None,
    name: str | None = None,
    loglevel: str | None = None,
):
    """A real `python -m worker` process, stopped with SIGTERM (warm shutdown) afterwards.
    The store is upgraded first: only `python -m db upgrade` changes a configured schema."""
    upgrade_store(env)
    with open(log, "wb") as out:
        proc = _start_worker(env, out, concurrency=concurrency, name=name, loglevel=loglevel)
        try:
            yield proc
        finally:
            _stop_workers([proc])


@contextmanager
def running_workers(env: dict[str, str], logs: dict[str, Path]):
    """One `python -m worker` process per node name in `logs` (its log file), started
    together after one store upgrade and stopped together (SIGTERM to all, then waited
    for): {node: process}."""
    upgrade_store(env)
    procs: dict[str, subprocess.Popen] = {}
    try:
        for node, log in logs.items():
            with open(log, "wb") as out:  # the child keeps its own copy of the descriptor
                procs[node] = _start_worker(env, out, name=f"{node}@%h")
        yield procs
    finally:
        _stop_workers(list(procs.values()))


def _start_worker(
    env: dict[str, str],
    out,
    *,
    concurrency: int | None = None,
    name: str | None = None,
    loglevel: str | None = None,
) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "worker"]
    cmd += ["--loglevel", loglevel] if loglevel else []
    cmd += [f"--concurrency={concurrency}"] if concurrency else []
    cmd += [f"--name={name}"] if name else []
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    _STARTED.append(proc)
    return proc


def _stop_workers(procs: list[subprocess.Popen]) -> None:
    """SIGTERM (warm shutdown) to each, then wait for each; killed after 60 s."""
    for proc in procs:
        proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        with suppress(ValueError):
            _STARTED.remove(proc)


# The worker processes started by this module's helpers and not yet stopped.
_STARTED: list[subprocess.Popen] = []


def _audio_only(path: Path) -> Path:
    with av.open(str(path), "w") as out:
        stream = out.add_stream("aac", rate=16000)
        stream.layout = "mono"
        for i in range(20):
            frame = av.AudioFrame.from_ndarray(
                np.zeros((1, 1024), dtype=np.float32), format="fltp", layout="mono"
            )
            frame.sample_rate = 16000
            frame.pts = i * 1024
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return path


def _inputs(folder: Path) -> tuple[list[Path], dict[str, str], tuple[Path, Path]]:
    """Good videos, bad files with the reason each must get, and one duplicate pair."""
    folder.mkdir()
    good = [
        make_video(folder / "a_h264.mp4", codec="libx264", seed=1),
        make_video(folder / "b_vp9.webm", codec="libvpx-vp9", seed=2),
        make_video(folder / "c_vfr.mkv", codec="libx264", vfr=True, seed=3),
        make_video(folder / "d_phone.mov", codec="libx264", rotation=90, seed=4),
        make_video(folder / "sub" / "e_mpeg4.avi", codec="mpeg4", seed=5),
    ]
    dup = folder / "sub" / "a_copy_under_other_name.mp4"
    shutil.copy(good[0], dup)
    (folder / "empty.mp4").write_bytes(b"")
    (folder / "text.mp4").write_text("this is not a video\n")
    whole = (folder / "a_h264.mp4").read_bytes()
    (folder / "truncated.mp4").write_bytes(whole[: len(whole) // 2])
    _audio_only(folder / "audio_only.mkv")
    (folder / "notes.txt").write_text("sidecar file: not picked up from a directory")
    bad = {
        "empty.mp4": "empty file",
        "text.mp4": "not a video",
        "truncated.mp4": "truncated",
        "audio_only.mkv": "audio only",
    }
    return good, bad, (good[0], dup)


def upgrade_store(env: dict[str, str]) -> None:
    """The database `env` names brought to head as `python -m db upgrade` does (a no-op
    once at head). A URL given in `env` itself is upgraded in this process (the same
    db.migrate.upgrade, without a second of interpreter and import start-up per worker
    started); any other (the embedded default, a URL in a secrets folder) through the CLI.
    The command itself is tested in test_migrations.py and test_cli_slips.py."""
    url = env.get("FLEETSCRIBE_DATABASE_URL", "")
    if url.startswith(("sqlite:", "postgresql:", "postgresql+")) and (
        "FLEETSCRIBE_SECRETS_DIR" not in env
    ):
        upgrade_url(url)
        return
    out = _run(["db", "upgrade"], env)
    assert out.returncode == 0, out.stdout + out.stderr


def _run(args: list[str], env: dict[str, str], timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.parametrize("backend", ["redis+postgresql", "embedded"])
def test_enqueue_wait_describes_every_good_file_once(backend, request, tmp_path, tiny_model):
    if backend == "embedded":
        broker, database = "filesystem://", request.getfixturevalue("sqlite_url")
    else:
        broker, database = request.getfixturevalue("redis_url"), request.getfixturevalue("pg_url")
    env = _env(tmp_path / "home", broker, database, tiny_model)
    good, bad, (original, copy) = _inputs(tmp_path / "videos")

    with running_worker(env, tmp_path / "worker.log"):
        first = _run(["producer", "enqueue", str(tmp_path / "videos"), "--wait"], env)
        assert first.returncode == 0, (
            first.stdout + first.stderr + (tmp_path / "worker.log").read_text()
        )
        # The same archive again: nothing new is described, rejections stand.
        second = _run(["producer", "enqueue", str(tmp_path / "videos"), "--wait"], env)
        assert second.returncode == 0, second.stdout + second.stderr

    for name, reason in bad.items():
        assert name in first.stdout and reason in first.stdout, first.stdout
    assert "0 videos sent" in second.stdout

    engine = make_engine(database)
    with make_sessionmaker(engine)() as session:
        videos = {Path(v.path).name: v for v in session.scalars(select(Video))}
        # one row per distinct content: 5 good + 4 bad; the copy shares its original's row
        assert len(videos) == len(good) + len(bad)
        for path in good:
            video = videos[path.name]
            assert video.state == VideoState.DONE, (video.path, video.reason)
            assert video.attempts == 1
            reports = session.scalars(select(Report).where(Report.video_id == video.id)).all()
            assert len(reports) == 1
            report = reports[0]
            assert report.model == str(tiny_model)
            assert report.prompt_version >= 1 and report.schema_version == 1
            assert 1 <= len(report.frame_timestamps) <= FRAMES
            assert report.frame_timestamps == sorted(report.frame_timestamps)
            assert report.tokens_in > 0 and report.tokens_out > 0
            # _env leaves FLEETSCRIBE_CONSTRAINED unset, so the worker decodes under the
            # report grammar: every answer is a valid report, stored as its raw text parses
            assert "FLEETSCRIBE_CONSTRAINED" not in env
            assert_valid_stored_report(session, report)
        for name, reason in bad.items():
            assert videos[name].state == VideoState.REJECTED
            assert reason in (videos[name].reason or "")
        assert session.scalar(select(func.count()).select_from(Report)) == len(good)

        # both names of the duplicated content point at the one video and its one report
        subs = session.execute(
            select(Submission.path, Submission.video_id, Submission.outcome).where(
                Submission.path.in_([str(original), str(copy)]), Submission.batch_id == 1
            )
        ).all()
        assert len(subs) == 2 and subs[0].video_id == subs[1].video_id
        assert {s.outcome for s in subs} == {"queued", "duplicate"}
        assert "notes.txt" not in {Path(p).name for p in session.scalars(select(Submission.path))}
    engine.dispose()


def _states(database: str) -> dict[str, int]:
    engine = make_engine(database)
    with make_sessionmaker(engine)() as session:
        rows = session.execute(select(Video.state, func.count()).group_by(Video.state)).all()
    engine.dispose()
    return {state.value: n for state, n in rows}


def _wait_for(check, timeout: float, what: str, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            _dump_threads()
            pytest.fail(f"timed out waiting for {what}\n{log.read_text()[-6000:]}")
        time.sleep(0.1)


def _dump_threads() -> None:
    """Before a wait fails: every live worker started here logs the stack of each of its
    threads (Celery's SIGUSR1 handler), so the failure shows where a worker was stuck."""
    live = [proc for proc in _STARTED if proc.poll() is None]
    for proc in live:
        proc.send_signal(signal.SIGUSR1)
    if live:
        time.sleep(2)


def test_a_worker_killed_mid_batch_loses_nothing_and_doubles_nothing(
    tmp_path, tiny_model, redis_url, pg_url
):
    env = _slow_env(tmp_path, redis_url, pg_url, tiny_model)
    folder = tmp_path / "videos"
    count = 12
    for i in range(count):
        make_video(folder / f"clip_{i:02d}.mp4", seconds=1, fps=8, width=96, height=64, seed=i)
    log = tmp_path / "worker.log"
    with running_worker(env, log) as first:
        sent = _run(["producer", "enqueue", str(folder)], env)
        assert sent.returncode == 0, sent.stdout + sent.stderr
        _wait_for(
            lambda: (s := _states(pg_url)).get("done", 0) >= 2 and s.get("running", 0) >= 1,
            120,
            "a batch in flight",
            log,
        )
        first.kill()  # SIGKILL: no warm shutdown, its reserved messages stay unacknowledged
        first.wait()
    interrupted = _states(pg_url)
    assert interrupted.get("done", 0) < count
    with running_worker(env, tmp_path / "worker2.log"):
        _wait_for(lambda: _states(pg_url).get("done") == count, 180, "every video done", log)

    _one_report_each(pg_url, count)
    engine = make_engine(pg_url)
    with make_sessionmaker(engine)() as session:
        attempts = session.scalars(select(Video.attempts)).all()
    engine.dispose()
    assert sum(attempts) > count  # the killed worker's videos really were run again


def test_a_pickle_message_is_refused_and_never_runs(tmp_path, tiny_model, redis_url, sqlite_url):
    from broker.celery_app import make_celery
    from config.settings import Settings

    env = _env(tmp_path / "home", redis_url, sqlite_url, tiny_model)
    env.update(FLEETSCRIBE_CONSTRAINED="false", FLEETSCRIBE_MAX_NEW_TOKENS="4")
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    folder = tmp_path / "videos"
    make_video(folder / "good.mp4", seconds=1, fps=8, width=96, height=64, seed=1)
    log = tmp_path / "worker.log"
    with running_worker(env, log):
        # Sent the way Celery sends, declaring the queue, but serialised with pickle and
        # carrying a payload that would run a command if it were ever unpickled.
        app = make_celery(Settings(broker_url=redis_url))
        app.send_task(
            "fleetscribe.describe",
            kwargs={"video_id": Evil(), "path": "/x.mp4"},
            queue="describe",
            serializer="pickle",
            task_id="evil-1",
        )
        # A good video after it is still described: the worker survived the bad message.
        done = _run(["producer", "enqueue", str(folder), "--wait"], env)
        assert done.returncode == 0, done.stdout + done.stderr + log.read_text()[-3000:]
    assert not marker.exists()
    text = log.read_text()
    assert "untrusted content" in text and "pickle" in text, text[-3000:]


LOAD_VIDEOS = 2000
LOAD_WORKERS = 3
# Each worker reserves 2 x FLEETSCRIBE_BATCH_SIZE = 64 messages at most (prefetch multiplier
# 1 per threads-pool slot) and takes more only as its batches of 32 finish. So a worker that
# got only its first reservation, or stopped early, holds 64 (3.2% of 2,000). Each of the
# three must describe at least 10% (200, over three reservations' worth): it came back for
# work again and again through the run. A fair share is a third (667); 10% still holds for
# a worker going at a third of the others' speed, as the OS splits 2 cores between three
# busy processes and whatever else runs beside the test.
LOAD_MIN_SHARE = 0.10


def _ready(log: Path, node: str) -> bool:
    """Whether the Celery worker `node` (its name before the @) logged that it consumes."""
    text = log.read_text(errors="replace") if log.exists() else ""
    return any(
        f"{node}@" in line and line.rstrip().endswith("ready.") for line in text.splitlines()
    )


def test_two_thousand_videos_through_three_workers_spread_over_all_none_lost_none_doubled(
    tmp_path, tiny_model, redis_url, pg_url
):
    import socket

    from producer.clips import distinct_clips

    env = _env(tmp_path / "home", redis_url, pg_url, tiny_model)
    env.update(
        FLEETSCRIBE_CONSTRAINED="false",
        FLEETSCRIBE_MAX_NEW_TOKENS="2",
        FLEETSCRIBE_FRAMES="2",
        FLEETSCRIBE_BATCH_SIZE="32",
        # One intra-op thread per worker: three workers with torch's default of one thread
        # per core would run six OpenMP threads on this 2-core machine, and the tiny model's
        # microsecond ops then wait on each other's cores (several times slower, and uneven).
        # A worker's GPU does this work in production; here each gets its core's share.
        OMP_NUM_THREADS="1",
    )
    folder = tmp_path / "videos"
    began = time.monotonic()
    # 2,000 distinct files (the producer dedupes by sha256), in 20 subfolders: 16 encoded
    # clips, each file one of them with bytes of its own (helpers.distinct_clips)
    distinct_clips(folder, LOAD_VIDEOS, seconds=0.5, fps=4, width=64, height=48)
    clips_s = time.monotonic() - began
    logs = {f"load{n}": tmp_path / f"worker{n}.log" for n in range(1, LOAD_WORKERS + 1)}
    began = time.monotonic()
    with running_workers(env, logs) as procs:
        # Every worker consumes before the first message is sent: a share is then a
        # worker's pace, not how late its model loaded.
        for node, log in logs.items():
            _wait_for(lambda node=node, log=log: _ready(log, node), 180, f"{node} ready", log)
        ready_s = time.monotonic() - began
        began = time.monotonic()
        done = _run(["producer", "enqueue", str(folder), "--wait"], env, timeout=900)
        elapsed = time.monotonic() - began
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]

    engine = make_engine(pg_url)
    with make_sessionmaker(engine)() as session:
        states = dict(
            session.execute(select(Video.state, func.count()).group_by(Video.state)).all()
        )
        per_video = dict(
            session.execute(select(Report.video_id, func.count()).group_by(Report.video_id)).all()
        )
        per_worker = dict(
            session.execute(
                select(Report.worker_host, func.count()).group_by(Report.worker_host)
            ).all()
        )
    engine.dispose()
    assert states == {VideoState.DONE: LOAD_VIDEOS}  # none lost, failed or stuck (--wait: exit 0)
    assert len(per_video) == LOAD_VIDEOS and set(per_video.values()) == {1}  # none doubled
    # reports name their worker as host:pid; each `python -m worker` here is one process
    host = socket.gethostname()
    hosts = {f"{host}:{proc.pid}": node for node, proc in procs.items()}
    assert set(per_worker) == set(hosts), (per_worker, hosts)  # all three worked, no other
    shares = {hosts[h]: n for h, n in sorted(per_worker.items())}
    assert min(shares.values()) >= LOAD_MIN_SHARE * LOAD_VIDEOS, shares
    assert sum(shares.values()) == LOAD_VIDEOS
    print(
        f"\n{LOAD_VIDEOS} videos in {elapsed:.0f} s ({LOAD_VIDEOS / elapsed * 60:.0f}/min; "
        f"clips written in {clips_s:.1f} s, workers ready in {ready_s:.0f} s), per worker {shares}"
    )


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start_redis(port: int, folder: Path) -> subprocess.Popen:
    """A redis-server of the test's own, persisting every write (AOF, fsync always)."""
    import redis

    folder.mkdir(parents=True, exist_ok=True)
    server = subprocess.Popen(
        [
            shutil.which("redis-server") or "redis-server",
            "--port",
            str(port),
            "--dir",
            str(folder),
            "--appendonly",
            "yes",
            "--appendfsync",
            "always",
            "--save",
            "",
        ],
        stdout=subprocess.DEVNULL,
    )
    client = redis.Redis(port=port)
    deadline = time.monotonic() + 20
    while True:
        try:
            client.ping()
            return server
        except redis.ConnectionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def _slow_env(tmp_path: Path, broker: str, database: str, model: Path) -> dict[str, str]:
    env = _env(tmp_path / "home", broker, database, model)
    env.update(
        FLEETSCRIBE_CONSTRAINED="false",
        FLEETSCRIBE_MAX_NEW_TOKENS="300",
        FLEETSCRIBE_MIN_NEW_TOKENS="300",  # slow enough to be interrupted in the middle
        FLEETSCRIBE_BATCH_SIZE="2",
        FLEETSCRIBE_VISIBILITY_TIMEOUT="5",
    )
    return env


def _one_report_each(database: str, count: int) -> None:
    engine = make_engine(database)
    with make_sessionmaker(engine)() as session:
        per_video = session.execute(
            select(Report.video_id, func.count()).group_by(Report.video_id)
        ).all()
    engine.dispose()
    assert len(per_video) == count and all(n == 1 for _, n in per_video)


def test_a_redis_restart_mid_run_loses_nothing(tmp_path, tiny_model, pg_url):
    port = _free_port()
    server = _start_redis(port, tmp_path / "redis")
    env = _slow_env(tmp_path, f"redis://127.0.0.1:{port}/0", pg_url, tiny_model)
    count = 12
    folder = tmp_path / "videos"
    for i in range(count):
        make_video(folder / f"clip_{i:02d}.mp4", seconds=1, fps=8, width=96, height=64, seed=i)
    log = tmp_path / "worker.log"
    try:
        with running_worker(env, log):
            sent = _run(["producer", "enqueue", str(folder)], env)
            assert sent.returncode == 0, sent.stdout + sent.stderr
            _wait_for(lambda: _states(pg_url).get("done", 0) >= 2, 120, "two videos done", log)
            server.terminate()  # a clean stop writes the AOF; queued messages survive
            server.wait()
            time.sleep(2)
            server = _start_redis(port, tmp_path / "redis")
            _wait_for(lambda: _states(pg_url).get("done") == count, 180, "every video done", log)
    finally:
        server.terminate()
        server.wait()
    _one_report_each(pg_url, count)
    assert "Connection to broker lost" in log.read_text() or "Cannot connect" in log.read_text()


class CuttableProxy:
    """A TCP proxy to PostgreSQL that the test can cut (every connection dropped, new ones
    refused) and restore, to play a database that goes away for a while.

    Every socket is shut down before it is closed: closing alone sends nothing while the
    other direction's thread is still blocked reading it, and PostgreSQL then kept a cut
    connection's transaction open, with the row lock it held (a redelivered video then
    waited on that lock for ever)."""

    def __init__(self, target_port: int):
        import socket
        import threading

        self.port = _free_port()
        self.target = ("127.0.0.1", target_port)
        self._socket, self._threading = socket, threading
        self._lock = threading.Lock()
        self._open: list = []
        self._listener = None
        self.restore()

    def restore(self) -> None:
        listener = self._socket.create_server(("127.0.0.1", self.port), reuse_port=False)
        with self._lock:
            self._listener = listener
        self._threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def cut(self) -> None:
        with self._lock:
            # shutdown, not only close: it stops the listening and wakes the blocked accept
            _shut(self._listener)
            self._listener = None
            for sock in self._open:
                _shut(sock)
            self._open.clear()

    def _accept(self, listener) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # cut
            upstream = self._socket.create_connection(self.target)
            with self._lock:
                if self._listener is not listener:  # accepted as the cut came: dropped too
                    _shut(client)
                    _shut(upstream)
                    return
                self._open += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                self._threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src, dst) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            _shut(src)
            _shut(dst)


def _shut(sock) -> None:
    """Shut a socket down (the peer sees the end even while another thread reads it), then
    close it."""
    import socket

    with suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    with suppress(OSError):
        sock.close()


def test_a_database_outage_mid_run_is_retried_until_it_is_back(
    tmp_path, tiny_model, redis_url, pg_url
):
    from sqlalchemy.engine import make_url

    url = make_url(pg_url)
    proxy = CuttableProxy(url.port or 5432)
    through_proxy = url.set(port=proxy.port).render_as_string(hide_password=False)
    env = _slow_env(tmp_path, redis_url, through_proxy, tiny_model)
    count = 10
    folder = tmp_path / "videos"
    for i in range(count):
        make_video(folder / f"clip_{i:02d}.mp4", seconds=1, fps=8, width=96, height=64, seed=i)
    log = tmp_path / "worker.log"
    with running_worker(env, log):
        sent = _run(
            ["producer", "enqueue", str(folder)], dict(env, FLEETSCRIBE_DATABASE_URL=pg_url)
        )
        assert sent.returncode == 0, sent.stdout + sent.stderr
        _wait_for(lambda: _states(pg_url).get("done", 0) >= 2, 120, "two videos done", log)
        proxy.cut()
        time.sleep(6)  # the database is unreachable for the worker meanwhile
        proxy.restore()
        _wait_for(lambda: _states(pg_url).get("done") == count, 240, "every video done", log)
    _one_report_each(pg_url, count)
    assert "database unavailable" in log.read_text()  # it retried rather than failing
    assert _states(pg_url) == {"done": count}
