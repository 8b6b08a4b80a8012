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
from contextlib import contextmanager
from pathlib import Path

import av
import numpy as np
import pytest
from sqlalchemy import func, select

from db.models import Report, Submission, Video, VideoState
from db.session import make_engine, make_sessionmaker
from producer.samples import make_video

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
def running_worker(env: dict[str, str], log: Path, concurrency: int | None = None):
    """A real `python -m worker` process, stopped with SIGTERM (warm shutdown) afterwards."""
    cmd = [sys.executable, "-m", "worker"]
    cmd += [f"--concurrency={concurrency}"] if concurrency else []
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            cmd,
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        try:
            yield proc
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


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
            assert report.valid or report.error  # an invalid answer keeps its reason
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
