"""Poison files against a real worker process: each ends failed or rejected with its reason,
within a time limit, and the worker lives on and keeps consuming.

A decoder that blocks for real: the test holds a write lease on an enqueued file, as a file
server holds an SMB oplock or an NFS delegation, so the decoder's open() of it blocks in the
kernel until the lease is broken (after /proc/sys/fs/lease-break-time, 45 s by default).

A decompression bomb: one H.264 keyframe of a still picture and 100,000 frames that repeat
it, 3 MB that decode to 600 GB of pictures; reaching the middle costs 50,000 frames.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import signal
import threading
import time
from contextlib import contextmanager
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
from sqlalchemy import select
from test_pipeline import _env, _run, running_worker, upgrade_store

from broker.celery_app import DESCRIBE_QUEUE, DESCRIBE_TASK, make_celery
from config.settings import Settings
from db import store
from db.migrate import upgrade
from db.models import Video, VideoState
from db.session import make_engine, make_sessionmaker, session_scope
from producer.clips import make_video
from video.errors import VideoError
from video.media import MAX_PIXELS, MAX_SIDE, probe, sample_frames

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
    upgrade_store(env)
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
        assert stuck.reason == "frame decoding took longer than 4 s, twice; killed"
        assert videos["a.mp4"].state.value == "done" and videos["b.mp4"].state.value == "done"

        # the worker lives on and keeps consuming, with a fresh decoding process
        _clip(folder / "after.mp4", seed=9)
        again = _run(["producer", "enqueue", str(folder / "after.mp4"), "--wait"], env)
        assert again.returncode == 0, again.stdout + again.stderr + log.read_text()[-3000:]
        assert _videos(database)["after.mp4"].state.value == "done"
        assert worker.poll() is None


def test_a_file_whose_open_blocks_is_rejected_by_the_producer_and_the_rest_are_sent(poison_env):
    env, folder, database = poison_env
    env["FLEETSCRIBE_PROBE_TIMEOUT_S"] = "3"
    names = ["a.mp4", "stuck.mp4", "b.mp4"]
    for i, name in enumerate(names):
        _clip(folder / name, seed=i)
    with write_lease(folder / "stuck.mp4") as opened:
        # well before the kernel breaks the lease (45 s): the probe must be killed instead
        sent = _run(["producer", "enqueue", str(folder)], env, timeout=40)
        assert opened.is_set()  # the producer really did try to open it, and blocked
    assert sent.returncode == 0, sent.stdout + sent.stderr
    reason = "probing took longer than 3 s, twice; killed"
    assert f"rejected {folder / 'stuck.mp4'}: {reason}" in sent.stdout
    assert "2 videos sent" in sent.stdout
    videos = _videos(database)
    assert (videos["stuck.mp4"].state, videos["stuck.mp4"].reason) == (VideoState.REJECTED, reason)
    assert {videos[n].state for n in ("a.mp4", "b.mp4")} == {VideoState.QUEUED}


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
        assert videos["crash.mp4"].reason == ("frame decoding crashed: its process died of SIGSEGV")

        _clip(folder / "after.mp4", seed=9)
        again = _run(["producer", "enqueue", str(folder / "after.mp4"), "--wait"], env)
        assert again.returncode == 0, again.stdout + again.stderr + log.read_text()[-3000:]
        assert _videos(database)["after.mp4"].state.value == "done"
        assert worker.poll() is None


def write_bomb(path: Path, *, width: int, height: int, frames: int, fps: int = 60) -> Path:
    """A still picture as one keyframe and `frames` - 1 P-frames that change nothing.

    x264 encodes the first 33 frames; its P-frames count frame_num modulo 16, so frames
    17-32 hold one P-frame for each value, and repeating them in order makes a valid
    stream of any length without encoding it (a second for 100,000 frames)."""
    picture = av.VideoFrame.from_ndarray(np.full((height, width, 3), 90, np.uint8), "rgb24")
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {
            "preset": "ultrafast",
            "x264-params": "keyint=infinite:scenecut=0:bframes=0:ref=1",
        }
        cycle = []
        for i in range(33):
            picture.pts = i
            for packet in stream.encode(picture):
                cycle += [bytes(packet)] if packet.pts >= 17 else []
                out.mux(packet)
        for packet in stream.encode(None):
            cycle += [bytes(packet)] if packet.pts >= 17 else []
            out.mux(packet)
        assert len(cycle) == 16
        for i in range(33, frames):
            packet = av.Packet(cycle[(i - 17) % 16])
            packet.pts = packet.dts = i
            packet.time_base = Fraction(1, fps)
            packet.stream = stream
            out.mux(packet)
    return path


BOMB = "too costly to decode"


@pytest.fixture(scope="module")
def bomb(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("bomb")
    return write_bomb(folder / "parked.mp4", width=1920, height=1080, frames=100_000)


def test_a_decompression_bomb_is_refused_by_probe_and_sampling(bomb):
    assert bomb.stat().st_size < 4 * 2**20  # 100,000 frames of 1080p in a few MB
    with av.open(str(bomb)) as container:
        assert container.streams.video[0].frames == 100_000
    with pytest.raises(VideoError, match=f"^{BOMB}.*decompression bomb") as probed:
        probe(bomb)
    assert "without reaching 833.3 s" in str(probed.value)  # the tail check's target
    with pytest.raises(VideoError, match=f"^{BOMB}.*decompression bomb"):
        sample_frames(bomb, 8)


def test_a_picture_over_the_pixel_cap_is_refused_before_decoding(tmp_path):
    """Within MAX_SIDE on each side, but 37.7 megapixels: refused by the producer's probe and
    by sampling (a forged or raced message), with the same reason."""
    side = 6144
    path = tmp_path / "square.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=10)
        stream.width, stream.height, stream.pix_fmt = side, side, "yuv420p"
        stream.options = {"preset": "ultrafast"}
        frame = av.VideoFrame.from_ndarray(np.zeros((side, side, 3), np.uint8), "rgb24")
        frame.pts = 0
        container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    reason = f"resolution {side}x{side} is more than {MAX_PIXELS / 1e6:.1f} megapixels"
    assert side <= MAX_SIDE and side * side > MAX_PIXELS
    for look in (probe, lambda p: sample_frames(p, 4)):
        with pytest.raises(VideoError) as refused:
            look(path)
        assert str(refused.value) == reason


def _send_unprobed(env: dict[str, str], database: str, path: Path) -> int:
    """Record and send `path` without the producer's probe: a forged or raced message."""
    engine = make_engine(database)
    upgrade(engine)
    with session_scope(make_sessionmaker(engine)) as session:
        video_id = store.add_video(
            session=session, path=str(path), sha256=os.urandom(32).hex(), state=VideoState.QUEUED
        ).id
    engine.dispose()
    app = make_celery(Settings(broker_url=env["FLEETSCRIBE_BROKER_URL"]))
    app.send_task(
        DESCRIBE_TASK,
        kwargs={"video_id": video_id, "path": str(path), "frames": None},
        queue=DESCRIBE_QUEUE,
    )
    return video_id


def test_a_decompression_bomb_is_rejected_or_failed_and_the_worker_goes_on(
    poison_env, tmp_path, bomb
):
    env, folder, database = poison_env
    env["FLEETSCRIBE_DECODE_TIMEOUT_S"] = "40"  # the backstop; the decode budget acts first
    folder.mkdir()
    shutil.copy(bomb, folder / "parked.mp4")
    shutil.copy(bomb, folder / "parked_again.mp4")

    # the producer's probe rejects it with the reason
    sent = _run(["producer", "enqueue", str(folder / "parked.mp4")], env)
    assert sent.returncode == 0, sent.stdout + sent.stderr
    assert BOMB in sent.stdout
    videos = _videos(database)
    assert videos["parked.mp4"].state == VideoState.REJECTED
    assert BOMB in videos["parked.mp4"].reason

    # sent to a worker all the same (a forged message), it fails with the reason
    log = tmp_path / "worker.log"
    with running_worker(env, log) as worker:
        forged = _send_unprobed(env, database, folder / "parked_again.mp4")
        deadline = time.monotonic() + 50
        while (video := _video_row(database, forged)).state not in (
            VideoState.FAILED,
            VideoState.DONE,
        ):
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        assert video.state == VideoState.FAILED
        assert video.reason.startswith(BOMB) and "decompression bomb" in video.reason

        _clip(folder / "after.mp4", seed=9)
        again = _run(["producer", "enqueue", str(folder / "after.mp4"), "--wait"], env)
        assert again.returncode == 0, again.stdout + again.stderr + log.read_text()[-3000:]
        assert _videos(database)["after.mp4"].state == VideoState.DONE
        assert worker.poll() is None


def _video_row(database: str, video_id: int) -> Video:
    engine = make_engine(database)
    with make_sessionmaker(engine)() as session:
        video = session.get(Video, video_id)
    engine.dispose()
    return video
