"""The describe task's outcomes, run in-process on SQLite with the tiny model."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import upgrade_url
from report_checks import assert_valid_stored_report
from sqlalchemy import func, select

from config.settings import Settings
from db import store
from db.models import Hazard, Report, Video, VideoState
from db.session import session_scope
from models.loader import Quant
from producer.clips import make_video
from producer.enqueue import inspect_file, record
from worker.lifecycle import WorkerRuntime
from worker.pipeline import describe_video

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def runtime(tiny_model, sqlite_url, tmp_path):
    settings = Settings(
        home=tmp_path / "home",
        database_url=sqlite_url,
        model=str(tiny_model),
        quant=Quant.FP32,
        frames=3,
        max_new_tokens=8,
        # One pass with room for the grammar's bound: the tiny model's answers run past
        # the default first pass (768 tokens), and a second pass would decode them all
        # again. Two passes give the same answers (test_grammar.py).
        first_pass_tokens=0,
        video_roots=[tmp_path / "videos"],
    )
    upgrade_url(sqlite_url)
    rt = WorkerRuntime.open(settings)
    yield rt
    rt.close()


def _enqueued(rt: WorkerRuntime, path: Path) -> int:
    """Record `path` as the producer would (without sending a message); its video id."""
    item = inspect_file(str(path), rt.settings)
    assert item.reason is None, item.reason
    _, to_send = record([item], sessions=rt.sessions, frames=3, priority=0, note="")
    return to_send[0].id


def _video(rt: WorkerRuntime, video_id: int) -> Video:
    with session_scope(rt.sessions) as session:
        return session.get(Video, video_id)


def test_a_redelivered_message_writes_one_report(runtime, tmp_path):
    path = make_video(tmp_path / "videos" / "a.mp4", seed=1)
    vid = _enqueued(runtime, path)
    assert describe_video(runtime, video_id=vid, path=str(path), frames=None) == "done"
    # the same message again, as after a broker redelivery
    assert describe_video(runtime, video_id=vid, path=str(path), frames=None) == "done"
    with session_scope(runtime.sessions) as session:
        assert session.scalar(select(func.count()).select_from(Report)) == 1
        report = session.scalar(select(Report))
        assert report.video_id == vid and len(report.frame_timestamps) == 3
        # under the report grammar (the default) the answer is a valid report; its JSON,
        # flat columns and hazard rows are what its raw text parses to
        parsed = assert_valid_stored_report(session, report)
        assert parsed["hazards"], "this clip's answer has hazards, so their rows are checked"
        # the redelivery added no second set of hazard rows
        hazards = session.scalar(select(func.count()).select_from(Hazard))
        assert hazards == len(parsed["hazards"])
    video = _video(runtime, vid)
    assert video.state == VideoState.DONE and video.attempts == 1 and video.finished_at


def test_a_stored_report_for_a_requeued_video_is_not_duplicated(runtime, tmp_path):
    path = make_video(tmp_path / "videos" / "a.mp4", seed=2)
    vid = _enqueued(runtime, path)
    describe_video(runtime, video_id=vid, path=str(path), frames=None)
    with session_scope(runtime.sessions) as session:  # e.g. a stale 'running' row requeued
        session.get(Video, vid).state = VideoState.QUEUED
    assert describe_video(runtime, video_id=vid, path=str(path), frames=None) == "done"
    with session_scope(runtime.sessions) as session:
        assert session.scalar(select(func.count()).select_from(Report)) == 1


@pytest.mark.parametrize(
    "damage, reason",
    [
        (lambda p: p.unlink(), "the file is gone since it was enqueued"),
        (lambda p: p.write_bytes(p.read_bytes() + b"x"), "the file changed since it was enqueued"),
        (lambda p: p.write_bytes(b"\0" * p.stat().st_size), "not a video"),
    ],
    ids=["deleted", "grown", "overwritten"],
)
def test_a_file_damaged_after_enqueue_fails_with_its_reason(runtime, tmp_path, damage, reason):
    path = make_video(tmp_path / "videos" / "a.mp4", seed=3)
    vid = _enqueued(runtime, path)
    damage(path)
    assert describe_video(runtime, video_id=vid, path=str(path), frames=None) == "failed"
    video = _video(runtime, vid)
    assert video.state == VideoState.FAILED
    assert reason in video.reason
    with session_scope(runtime.sessions) as session:
        assert session.scalar(select(func.count()).select_from(Report)) == 0


def test_a_path_outside_the_video_roots_is_refused(runtime, tmp_path):
    outside = make_video(tmp_path / "elsewhere" / "a.mp4", seed=4)
    inside = tmp_path / "videos"
    inside.mkdir(exist_ok=True)
    link = inside / "link.mp4"
    link.symlink_to(outside)
    item = inspect_file(str(link), runtime.settings)
    assert item.reason and "outside FLEETSCRIBE_VIDEO_ROOTS" in item.reason
    # and a worker given such a path directly (a forged message) refuses it too
    with session_scope(runtime.sessions) as session:
        vid = store.add_video(
            session=session, path=str(link), sha256="f" * 64, state=VideoState.QUEUED
        ).id
    assert describe_video(runtime, video_id=vid, path=str(link), frames=None) == "failed"
    assert "outside FLEETSCRIBE_VIDEO_ROOTS" in _video(runtime, vid).reason


def test_a_message_for_an_unknown_video_is_dropped(runtime):
    assert describe_video(runtime, video_id=999, path="/nope.mp4", frames=None) == "missing"


def _cli(args: list[str], env_extra: dict[str, str], tmp_path: Path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEETSCRIBE_")}
    env.update(FLEETSCRIBE_HOME=str(tmp_path / "home"), HF_HUB_OFFLINE="1", **env_extra)
    return subprocess.run(
        [sys.executable, "-m", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_a_bad_setting_is_one_line_and_exit_2(tmp_path):
    out = _cli(["producer", "status"], {"FLEETSCRIBE_FRAMES": "0"}, tmp_path)
    assert out.returncode == 2
    assert "FLEETSCRIBE_FRAMES" in out.stderr and "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


def test_a_worker_with_a_missing_model_refuses_to_start(tmp_path):
    out = _cli(["worker"], {"FLEETSCRIBE_MODEL": str(tmp_path / "no-model")}, tmp_path)
    assert out.returncode == 2
    assert "does not exist" in out.stderr and "Traceback" not in out.stderr


def test_an_unreachable_database_is_one_line(tmp_path):
    out = _cli(
        ["db", "upgrade", "--wait", "1"],
        {"FLEETSCRIBE_DATABASE_URL": "postgresql://nobody@127.0.0.1:1/none"},
        tmp_path,
    )
    assert out.returncode == 2
    assert "did not answer" in out.stderr and "Traceback" not in out.stderr


def _requeue_env(rt: WorkerRuntime) -> dict[str, str]:
    s = rt.settings
    return {
        "FLEETSCRIBE_DATABASE_URL": s.db_url,
        "FLEETSCRIBE_MODEL": s.model,
        "FLEETSCRIBE_VIDEO_ROOTS": ":".join(str(r) for r in s.video_roots),
    }


def test_reports_of_an_older_prompt_are_listed_and_requeued(runtime, tmp_path):
    from models.prompt import PROMPT_VERSION

    paths = [make_video(tmp_path / "videos" / f"{n}.mp4", seed=10 + i) for i, n in enumerate("abc")]
    ids = [_enqueued(runtime, p) for p in paths]
    for vid, path in zip(ids, paths, strict=True):
        assert describe_video(runtime, video_id=vid, path=str(path), frames=None) == "done"
    old = PROMPT_VERSION - 1
    with session_scope(runtime.sessions) as session:  # a and b were described by the old prompt
        for report in session.scalars(select(Report).where(Report.video_id.in_(ids[:2]))):
            report.prompt_version = old
    env = _requeue_env(runtime)
    where = f"prompt_version < {PROMPT_VERSION}"

    dry = _cli(["producer", "requeue", "--where", where, "--dry-run"], env, tmp_path)
    assert dry.returncode == 0, dry.stderr
    assert "2 videos match" in dry.stdout and "0 videos sent (dry run)" in dry.stdout
    assert str(paths[0]) in dry.stdout and str(paths[2]) not in dry.stdout
    assert _video(runtime, ids[0]).state == VideoState.DONE

    sent = _cli(["producer", "requeue", "--where", where], env, tmp_path)
    assert sent.returncode == 0, sent.stderr
    assert "2 videos sent" in sent.stdout
    assert [_video(runtime, v).state for v in ids] == [
        VideoState.QUEUED,
        VideoState.QUEUED,
        VideoState.DONE,
    ]
    # The worker describes it again with the current prompt; the old report stays beside it.
    assert describe_video(runtime, video_id=ids[0], path=str(paths[0]), frames=None) == "done"
    with session_scope(runtime.sessions) as session:
        versions = session.scalars(
            select(Report.prompt_version).where(Report.video_id == ids[0])
        ).all()
    assert sorted(versions) == [old, PROMPT_VERSION]
    again = _cli(["producer", "requeue", "--where", where, "--dry-run"], env, tmp_path)
    # both still match; a has a current report, b is queued: neither goes again
    assert (
        f"2 videos match: {where} (2 reports); 0 to describe again: 1 already has a report "
        f"from prompt v{PROMPT_VERSION} (model {env['FLEETSCRIBE_MODEL']}, no adapter), "
        "1 is queued"
    ) in again.stdout


@pytest.mark.parametrize(
    "where, message",
    [
        ("prompt_version < two", "whole number"),
        ("prompt_version < 2; DROP TABLE videos", "whole number"),
        ("model = x'; DELETE FROM reports; --", "not a plain value"),
        ("1 = 1", "unknown field"),
        ("path = /etc/passwd", "unknown field"),
        ("valid = maybe", "true or false"),
        ("prompt_version", "cannot read"),
    ],
)
def test_a_bad_requeue_condition_is_one_line_and_runs_nothing(runtime, tmp_path, where, message):
    out = _cli(["producer", "requeue", "--where", where], _requeue_env(runtime), tmp_path)
    assert out.returncode == 2
    assert message in out.stderr and "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


def test_a_video_left_running_by_a_dead_worker_is_reaped_and_described_once(runtime, tmp_path):
    from datetime import timedelta

    from db.models import Worker, utcnow

    stale_path = make_video(tmp_path / "videos" / "stale.mp4", seed=30)
    busy_path = make_video(tmp_path / "videos" / "busy.mp4", seed=31)
    stale, busy = _enqueued(runtime, stale_path), _enqueued(runtime, busy_path)
    with session_scope(runtime.sessions) as session:
        # the dead worker's last heartbeat was 2 hours ago; the live one beat just now
        session.add(Worker(name="gone-host:4242", heartbeat_at=utcnow() - timedelta(hours=2)))
        session.add(Worker(name="live-host:1", heartbeat_at=utcnow()))
        for vid, worker in ((stale, "gone-host:4242"), (busy, "live-host:1")):
            video = session.get(Video, vid)
            video.state, video.worker = VideoState.RUNNING, worker
            video.started_at, video.attempts = utcnow() - timedelta(seconds=5), 1
    env = _requeue_env(runtime)

    dry = _cli(["producer", "reap", "--dry-run"], env, tmp_path)
    assert dry.returncode == 0, dry.stderr
    assert "0 queued, not sent (the backlog), 1 running on a dead worker" in dry.stdout
    assert f"orphaned {stale_path} (video {stale}, worker gone-host:4242)" in dry.stdout
    assert str(busy_path) not in dry.stdout
    assert "0 videos sent (dry run)" in dry.stdout
    assert _video(runtime, stale).state == VideoState.RUNNING  # a dry run changes nothing

    sent = _cli(["producer", "reap"], env, tmp_path)
    assert sent.returncode == 0, sent.stderr
    assert "1 videos sent" in sent.stdout
    assert _video(runtime, stale).state == VideoState.QUEUED
    assert _video(runtime, stale).published_at is not None  # its new message is confirmed
    assert _video(runtime, busy).state == VideoState.RUNNING  # its worker is alive
    assert describe_video(runtime, video_id=stale, path=str(stale_path), frames=None) == "done"
    # Its first message coming back late changes nothing: still one report.
    assert describe_video(runtime, video_id=stale, path=str(stale_path), frames=None) == "done"
    with session_scope(runtime.sessions) as session:
        reports = session.scalars(select(Report).where(Report.video_id == stale)).all()
    assert len(reports) == 1 and _video(runtime, stale).attempts == 2
    again = _cli(["producer", "reap", "--dry-run"], env, tmp_path)
    assert "0 running on a dead worker" in again.stdout
    # --after also takes a live worker's video that has run too long
    longer = _cli(["producer", "reap", "--after", "1", "--dry-run"], env, tmp_path)
    assert f"stale {busy_path} (video {busy}, worker live-host:1)" in longer.stdout


def test_a_fifo_named_like_a_video_is_rejected_without_blocking(runtime, tmp_path):
    folder = tmp_path / "videos"
    folder.mkdir(exist_ok=True)
    fifo = folder / "camera.mp4"
    os.mkfifo(fifo)  # opening it to read would block until a writer comes: never
    good = make_video(folder / "good.mp4", seed=40)
    out = _cli(["producer", "enqueue", str(fifo), str(good)], _requeue_env(runtime), tmp_path)
    assert out.returncode == 0, out.stderr
    assert f"rejected {fifo}: not a regular file" in out.stdout
    assert "1 videos sent" in out.stdout
