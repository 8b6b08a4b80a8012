"""Poison files against a real worker process: each ends failed or rejected with its reason,
within a time limit, and the worker lives on and keeps consuming.

A decoder that blocks for real: the test holds a write lease on an enqueued file, as a file
server holds an SMB oplock or an NFS delegation, so the decoder's open() of it blocks in the
kernel until the lease is broken (after /proc/sys/fs/lease-break-time, 45 s by default).
"""

from __future__ import annotations

import fcntl
import os
import signal
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
from sqlalchemy import select
from test_pipeline import _env, _run, running_worker

from db.models import Video
from db.session import make_engine, make_sessionmaker
from producer.samples import make_video

pytestmark = pytest.mark.integration


@contextmanager
def write_lease(path: Path):
    """Hold a write lease on `path`; yields an Event set when another process opens it."""
    opened = threading.Event()
    previous = signal.signal(signal.SIGIO, lambda *_: opened.set())  # the lease-break notice
    fd = os.open(path, os.O_WRONLY)
    try:
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_WRLCK)
        yield opened
    finally:
        os.close(fd)  # gives the lease back
        signal.signal(signal.SIGIO, previous)


def _videos(database: str) -> dict[str, Video]:
    engine = make_engine(database)
    with make_sessionmaker(engine)() as session:
        rows = {Path(v.path).name: v for v in session.scalars(select(Video))}
    engine.dispose()
    return rows


def _wait_final(database: str, names: list[str], timeout: float, log: Path) -> dict[str, Video]:
    deadline = time.monotonic() + timeout
    while True:
        videos = _videos(database)
        if all(n in videos and videos[n].state.value in ("done", "failed") for n in names):
            return videos
        if time.monotonic() > deadline:
            states = {n: v.state.value for n, v in videos.items()}
            pytest.fail(f"not final after {timeout} s: {states}\n{log.read_text()[-3000:]}")
        time.sleep(0.2)


def _decoding_children(worker_pid: int) -> list[int]:
    """The worker's decoding processes (spawned by multiprocessing)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (entry / "cmdline").read_bytes()
        except (OSError, IndexError, ValueError):
            continue
        if ppid == worker_pid and b"spawn_main" in cmdline:
            pids.append(int(entry.name))
    return pids


def _blocked_on_lease(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/wchan").read_text() == "__break_lease"
    except OSError:
        return False


@pytest.fixture
def poison_env(tmp_path, tiny_model, redis_url, sqlite_url):
    folder = tmp_path / "videos"
    env = _env(tmp_path / "home", redis_url, sqlite_url, tiny_model)
    env.update(
        FLEETSCRIBE_VIDEO_ROOTS=str(folder),
        FLEETSCRIBE_DECODE_PROCESSES="2",
        FLEETSCRIBE_CONSTRAINED="false",
        FLEETSCRIBE_MAX_NEW_TOKENS="4",
    )
    return env, folder, sqlite_url


def _clip(path: Path, seed: int) -> Path:
    return make_video(path, seconds=1, fps=8, width=96, height=64, seed=seed)


def test_a_decoder_that_blocks_is_killed_and_the_worker_goes_on(poison_env, tmp_path):
    env, folder, database = poison_env
    env["FLEETSCRIBE_DECODE_TIMEOUT_S"] = "4"
    names = ["a.mp4", "stuck.mp4", "b.mp4"]
    for i, name in enumerate(names):
        _clip(folder / name, seed=i)
    sent = _run(["producer", "enqueue", str(folder)], env)  # hashes and probes each file
    assert sent.returncode == 0, sent.stdout + sent.stderr

    log = tmp_path / "worker.log"
    with write_lease(folder / "stuck.mp4") as opened, running_worker(env, log) as worker:
        videos = _wait_final(database, names, 40, log)  # < the kernel's 45 s lease break
        assert opened.is_set()  # the decoder really did try to open it, and blocked
        stuck = videos["stuck.mp4"]
        assert stuck.state.value == "failed"
        assert stuck.reason == "frame decoding took longer than 4 s; killed"
        assert videos["a.mp4"].state.value == "done" and videos["b.mp4"].state.value == "done"

        # the worker lives on and keeps consuming, with a fresh decoding process
        _clip(folder / "after.mp4", seed=9)
        again = _run(["producer", "enqueue", str(folder / "after.mp4"), "--wait"], env)
        assert again.returncode == 0, again.stdout + again.stderr + log.read_text()[-3000:]
        assert _videos(database)["after.mp4"].state.value == "done"
        assert worker.poll() is None


def test_a_decoder_crash_fails_its_video_only(poison_env, tmp_path):
    env, folder, database = poison_env
    env["FLEETSCRIBE_DECODE_TIMEOUT_S"] = "60"
    _clip(folder / "crash.mp4", seed=1)
    sent = _run(["producer", "enqueue", str(folder)], env)
    assert sent.returncode == 0, sent.stdout + sent.stderr

    log = tmp_path / "worker.log"
    with write_lease(folder / "crash.mp4") as opened, running_worker(env, log) as worker:
        assert opened.wait(40), log.read_text()[-3000:]
        deadline = time.monotonic() + 10
        while not (blocked := [p for p in _decoding_children(worker.pid) if _blocked_on_lease(p)]):
            assert time.monotonic() < deadline, "no decoding process is blocked on the file"
            time.sleep(0.1)
        # the decoder dies as it would of a segmentation fault
        os.kill(blocked[0], signal.SIGSEGV)
        videos = _wait_final(database, ["crash.mp4"], 30, log)
        assert videos["crash.mp4"].state.value == "failed"
        assert videos["crash.mp4"].reason == (
            "frame decoding crashed: the decoding process died of SIGSEGV"
        )

        _clip(folder / "after.mp4", seed=9)
        again = _run(["producer", "enqueue", str(folder / "after.mp4"), "--wait"], env)
        assert again.returncode == 0, again.stdout + again.stderr + log.read_text()[-3000:]
        assert _videos(database)["after.mp4"].state.value == "done"
        assert worker.poll() is None
