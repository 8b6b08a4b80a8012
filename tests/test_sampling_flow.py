"""The sampling mode from the setting and the CLI to the stored report: `enqueue --sampling`
writes it on the video and its message carries it, the worker samples with it, and the
report stores it (part of its key) with each frame's reason; hazards carry the reason of
the frame they point at. Real Redis, SQLite and PostgreSQL, the tiny model."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import redis
from helpers import upgrade_url
from sqlalchemy import func, select
from test_cli_slips import run_cli

from config.settings import Settings
from db import store
from db.models import Batch, Hazard, Report, Video, VideoState
from db.session import make_engine, make_sessionmaker, session_scope
from models.loader import Quant
from models.prompt import PROMPT_VERSION
from producer.clips import Event, make_video
from producer.enqueue import command_key, inspect_file, record
from video.media import sample_frames
from worker.lifecycle import WorkerRuntime
from worker.pipeline import describe_files, describe_video
from worker.tasks import describe

FRAMES = 3
EVENT = Event(5.1, 0.8)  # a figure crossing the road: with 3 frames, one goes to it


def _event_clip(folder: Path, name: str = "crossing.mp4", seed: int = 5) -> Path:
    return make_video(
        folder / name, seconds=12, fps=10, width=160, height=90, events=[EVENT], seed=seed
    )


def _messages(url: str) -> list[dict]:
    """The kwargs of every describe message waiting in Redis (one list per priority)."""
    client = redis.Redis.from_url(url)
    found = []
    for key in sorted(client.keys("describe*")):
        for raw in client.lrange(key, 0, -1):
            message = json.loads(raw)
            body = message["body"]
            if message["properties"].get("body_encoding") == "base64":
                body = base64.b64decode(body)
            _args, kwargs, _embed = json.loads(body)
            found.append(kwargs)
    client.close()
    return found


# --- the producer: setting, flag, message, fingerprint ------------------------------------


def test_enqueue_stores_the_mode_on_the_video_and_its_message_carries_it(redis_url, tmp_path):
    folder = tmp_path / "videos"
    clips = [
        make_video(folder / f"{n}.mp4", seconds=1, fps=8, width=96, height=64, seed=i)
        for i, n in enumerate("abc")
    ]
    env = {"FLEETSCRIBE_BROKER_URL": redis_url}
    runs = [
        (clips[0], ["--sampling", "uniform"], {}),  # the flag
        (clips[1], [], {}),  # the setting's default
        (clips[2], ["--sampling", "events"], {"FLEETSCRIBE_SAMPLING": "uniform"}),  # flag wins
    ]
    for clip, flags, extra in runs:
        out = run_cli(["producer", "enqueue", str(clip), *flags], tmp_path, {**env, **extra})
        assert out.returncode == 0, out.stdout + out.stderr
        assert "1 videos sent" in out.stdout

    engine = make_engine(f"sqlite:///{tmp_path / 'home' / 'fleetscribe.db'}")
    with make_sessionmaker(engine)() as session:
        videos = {Path(v.path).name: v for v in session.scalars(select(Video))}
        keys = session.scalars(select(Batch.key).order_by(Batch.id)).all()
    engine.dispose()
    assert {name: v.sampling for name, v in videos.items()} == {
        "a.mp4": "uniform",
        "b.mp4": "events",
        "c.mp4": "events",
    }
    sent = {m["video_id"]: m for m in _messages(redis_url)}
    assert {name: sent[v.id]["sampling"] for name, v in videos.items()} == {
        "a.mp4": "uniform",
        "b.mp4": "events",
        "c.mp4": "events",
    }
    assert sent[videos["a.mp4"].id] == {
        "video_id": videos["a.mp4"].id,
        "path": str(clips[0]),
        "frames": 8,
        "sampling": "uniform",
    }
    # the batch's fingerprint is that of the command with its mode
    assert keys[0] == command_key([str(clips[0])], None, frames=8, priority=0, sampling="uniform")
    assert keys[2] == command_key([str(clips[2])], None, frames=8, priority=0, sampling="events")


def test_the_command_fingerprint_differs_between_modes(tmp_path):
    def key(sampling: str) -> str:
        return command_key([str(tmp_path)], None, frames=8, priority=0, sampling=sampling)

    assert key("events") != key("uniform")
    assert key("events") == key("events")  # the same command again resumes its batch


@pytest.mark.parametrize(
    "command",
    [
        ["producer", "enqueue", "clip.mp4"],
        ["producer", "requeue", "--where", "sampling = uniform"],
        ["worker", "describe", "clip.mp4"],
    ],
    ids=["enqueue", "requeue", "worker-describe"],
)
def test_a_bad_sampling_value_is_one_line(command, tmp_path):
    out = run_cli([*command, "--sampling", "scenes"], tmp_path)
    assert out.returncode == 2
    assert out.stdout == ""
    path = " ".join(command[:2])
    assert out.stderr.splitlines() == [
        "error: Invalid value for '--sampling': 'scenes' is not one of 'uniform', 'events'. "
        f"(see python -m {path} --help)"
    ]
    assert not (tmp_path / "home").exists()  # refused before the store was opened


# --- the worker: the tiny model, in process --------------------------------------------


@pytest.fixture
def runtime(request, tiny_model, sqlite_url, tmp_path):
    """A describe worker's runtime on SQLite; its FLEETSCRIBE_SAMPLING is the parameter."""
    settings = Settings(
        home=tmp_path / "home",
        database_url=sqlite_url,
        model=str(tiny_model),
        quant=Quant.FP32,
        frames=FRAMES,
        max_new_tokens=8,
        # One pass with room for the grammar's bound: the tiny model's answers run past
        # the default first pass (768 tokens), and a second pass would decode them all
        # again. Two passes give the same answers (test_grammar.py); these tests are about
        # the frames.
        first_pass_tokens=0,
        video_roots=[tmp_path / "videos"],
        sampling=getattr(request, "param", "uniform"),
    )
    upgrade_url(sqlite_url)
    rt = WorkerRuntime.open(settings)
    yield rt
    rt.close()


def _enqueued(rt: WorkerRuntime, path: Path, sampling: str | None) -> int:
    """Record `path` as `producer enqueue` does (no message sent); its video id."""
    item = inspect_file(str(path), rt.settings)
    assert item.reason is None, item.reason
    _, to_send = record(
        [item], sessions=rt.sessions, frames=FRAMES, priority=0, note="", sampling=sampling
    )
    return to_send[0].id


def _reports(rt: WorkerRuntime, video_id: int) -> dict[str, Report]:
    with session_scope(rt.sessions) as session:
        rows = session.scalars(select(Report).where(Report.video_id == video_id)).all()
        for row in rows:
            _ = row.hazards  # loaded while the session is open
        return {r.sampling: r for r in rows}


def _count(rt: WorkerRuntime, model) -> int:
    with session_scope(rt.sessions) as session:
        return session.scalar(select(func.count()).select_from(model))


def _queued_again(rt: WorkerRuntime, video_id: int) -> None:
    """The video back to queued, as a reaped video whose first message comes back late."""
    with session_scope(rt.sessions) as session:
        session.get(Video, video_id).state = VideoState.QUEUED


def _assert_hazards_carry_their_frames(report: Report) -> None:
    assert report.hazards, "this clip's answer has hazards, so their frames are checked"
    for h in report.hazards:
        frame = report.frames[h.frame]
        assert (h.timestamp_s, h.frame_reason, h.frame_score) == (
            frame["t"],
            frame["reason"],
            frame["score"],
        )


def test_an_events_video_stores_each_frames_reason_and_its_hazards_reasons(runtime, tmp_path):
    path = _event_clip(tmp_path / "videos")
    vid = _enqueued(runtime, path, "events")
    assert describe_video(runtime, video_id=vid, path=str(path), frames=None) == "done"

    report = _reports(runtime, vid)["events"]
    # the frames are the sampler's own choice for this file (run here as the reference)
    reference = sample_frames(path, FRAMES, sampling="events")
    assert report.frames == reference.choices()
    assert report.frame_timestamps == reference.timestamps
    assert [f["reason"] for f in report.frames].count("event") == report.event_frames == 1
    (event,) = [f for f in report.frames if f["reason"] == "event"]
    assert EVENT.covers(event["t"]) and event["score"] > 1
    assert report.sampling_note is None
    _assert_hazards_carry_their_frames(report)


def test_a_uniform_and_an_events_report_of_one_video_stay_side_by_side(
    runtime, redis_url, tmp_path
):
    path = _event_clip(tmp_path / "videos")
    vid = _enqueued(runtime, path, None)  # no mode on the video: the worker's setting
    assert describe_video(runtime, video_id=vid, path=str(path), frames=None) == "done"
    uniform = _reports(runtime, vid)["uniform"]
    assert uniform.event_frames == 0 and uniform.sampling_note is None
    assert uniform.frames == [
        {"t": t, "reason": "uniform", "score": None} for t in sample_frames(path, FRAMES).timestamps
    ]
    _assert_hazards_carry_their_frames(uniform)

    # requeue what was described with uniform frames, with event-aware ones
    env = {
        "FLEETSCRIBE_DATABASE_URL": runtime.settings.db_url,
        "FLEETSCRIBE_BROKER_URL": redis_url,
        "FLEETSCRIBE_MODEL": runtime.settings.model,
        "FLEETSCRIBE_VIDEO_ROOTS": str(tmp_path / "videos"),
    }
    where = ["producer", "requeue", "--where", "sampling = uniform", "--sampling", "events"]
    sent = run_cli(where, tmp_path, env)
    assert sent.returncode == 0, sent.stdout + sent.stderr
    assert f"1 videos sent to the describe queue (prompt v{PROMPT_VERSION}, events sampling)" in (
        sent.stdout
    )
    (message,) = _messages(redis_url)
    assert message == {"video_id": vid, "path": str(path), "frames": FRAMES, "sampling": "events"}
    hazards_before = _count(runtime, Hazard)

    assert describe_video(runtime, **message) == "done"
    both = _reports(runtime, vid)
    assert set(both) == {"uniform", "events"}
    assert both["uniform"].id == uniform.id  # the uniform report stays as it was
    assert both["events"].event_frames == 1
    _assert_hazards_carry_their_frames(both["events"])
    hazards = _count(runtime, Hazard)
    assert hazards == hazards_before + len(both["events"].hazards)

    # the same message again (redelivered after the video was sent again): no third report
    _queued_again(runtime, vid)
    assert describe_video(runtime, **message) == "done"
    assert set(_reports(runtime, vid)) == {"uniform", "events"}
    assert (_count(runtime, Report), _count(runtime, Hazard)) == (2, hazards)
    with session_scope(runtime.sessions) as session:
        video = session.get(Video, vid)
        assert (video.state, video.sampling, video.attempts) == (VideoState.DONE, "events", 3)

    again = run_cli([*where, "--dry-run"], tmp_path, env)
    assert again.returncode == 0, again.stderr
    assert again.stdout.splitlines()[0] == (
        "1 video matches: sampling = uniform (1 report); 0 to describe again: 1 already has "
        f"a report from prompt v{PROMPT_VERSION} (model {runtime.settings.model}, no adapter, "
        "events sampling)"
    )


def test_a_file_with_no_change_curve_is_keyed_on_the_mode_asked(runtime, tmp_path):
    # 8 packets: too few to score change by, so "events" gets uniform frames and says why
    path = make_video(tmp_path / "videos" / "short.mp4", seconds=1, fps=8, width=96, height=64)
    vid = _enqueued(runtime, path, "events")
    assert describe_video(runtime, video_id=vid, path=str(path), frames=None) == "done"
    (report,) = _reports(runtime, vid).values()
    assert report.sampling == "events"  # asked for; what was used, the note and frames say
    assert report.sampling_note == "only 8 packets with timestamps: uniform frames"
    assert [f["reason"] for f in report.frames] == ["uniform"] * FRAMES
    assert report.event_frames == 0
    assert report.frame_timestamps == sample_frames(path, FRAMES).timestamps

    # a redelivered message asks for "events" again and finds that report
    _queued_again(runtime, vid)
    assert describe_video(runtime, video_id=vid, path=str(path), frames=None) == "done"
    assert _count(runtime, Report) == 1


@pytest.mark.parametrize("runtime", ["events"], indirect=True)
def test_an_old_message_without_sampling_gets_the_workers_setting(runtime, tmp_path):
    path = _event_clip(tmp_path / "videos")
    vid = _enqueued(runtime, path, None)  # a video from before sampling modes
    task = SimpleNamespace(app=SimpleNamespace(runtime=runtime))
    old_message = {"video_id": vid, "path": str(path), "frames": None}
    assert describe(task, **old_message) == "done"
    (report,) = _reports(runtime, vid).values()
    assert (report.sampling, report.event_frames) == ("events", 1)


def test_a_message_with_an_unknown_mode_fails_its_video_with_a_reason(runtime, tmp_path):
    path = _event_clip(tmp_path / "videos")
    vid = _enqueued(runtime, path, None)
    assert describe_video(runtime, video_id=vid, path=str(path), frames=None, sampling="x") == (
        "failed"
    )
    with session_scope(runtime.sessions) as session:
        video = session.get(Video, vid)
        assert (video.state, video.reason) == (
            VideoState.FAILED,
            "unknown sampling mode 'x': one of uniform, events",
        )
    assert _count(runtime, Report) == 0


def test_worker_describe_prints_what_the_worker_stores_in_either_mode(runtime, tmp_path):
    path = _event_clip(tmp_path / "videos")
    vid = _enqueued(runtime, path, "events")
    assert describe_video(runtime, video_id=vid, path=str(path), frames=None) == "done"
    (printed,) = describe_files(runtime, [str(path)], frames=FRAMES, sampling="events")
    stored = _reports(runtime, vid)["events"]
    fields = ("sampling", "sampling_note", "frames", "event_frames", "frame_timestamps")
    assert {f: printed[f] for f in fields} == {f: getattr(stored, f) for f in fields}
    hazard_fields = ("kind", "description", "frame", "timestamp_s", "frame_reason", "frame_score")
    assert [{f: h[f] for f in hazard_fields} for h in printed["hazards"]] == [
        {f: getattr(h, f) for f in hazard_fields} for h in stored.hazards
    ]
    (uniform,) = describe_files(runtime, [str(path)], frames=FRAMES)  # the setting: uniform
    assert (uniform["sampling"], uniform["event_frames"]) == ("uniform", 0)


def test_worker_describe_cli_takes_sampling(tiny_model, tmp_path):
    path = _event_clip(tmp_path / "videos")
    env = {
        "FLEETSCRIBE_MODEL": str(tiny_model),
        "FLEETSCRIBE_QUANT": "fp32",
        "FLEETSCRIBE_MAX_NEW_TOKENS": "8",
        "FLEETSCRIBE_FIRST_PASS_TOKENS": "0",  # one pass, as the runtime fixture's
        "FLEETSCRIBE_FRAMES": str(FRAMES),
    }
    out = run_cli(
        ["worker", "describe", str(path), "--sampling", "events", "--json"], tmp_path, env
    )
    assert out.returncode == 0, out.stderr
    (printed,) = [json.loads(line) for line in out.stdout.splitlines()]
    assert printed["frames"] == sample_frames(path, FRAMES, sampling="events").choices()
    assert (printed["sampling"], printed["event_frames"]) == ("events", 1)


# --- the store: the key, and plain SQL over the new columns ------------------------------


def _new_report(video_id: int, sampling: str, frames: list[dict]) -> store.NewReport:
    report = {
        "driving_parameters": {"risk_factor": "high"},
        "hazards": [
            {"kind": "pedestrian", "description": "crossing", "frame": 1},
            {"kind": "vehicle", "description": "braking", "frame": 2},
        ],
    }
    return store.NewReport(
        video_id=video_id,
        model="tiny",
        adapter="",
        prompt_version=PROMPT_VERSION,
        schema_version=1,
        raw_text=json.dumps(report),
        report=report,
        error=None,
        frame_timestamps=[f["t"] for f in frames],
        tokens_in=10,
        tokens_out=5,
        latency_s=0.1,
        worker_host="test",
        hazards=report["hazards"],
        sampling=sampling,
        frames=frames,
    )


UNIFORM = [{"t": t, "reason": "uniform", "score": None} for t in (2.0, 6.0, 10.0)]
EVENTS = [
    {"t": 3.0, "reason": "uniform", "score": 0.72},
    {"t": 5.1, "reason": "event", "score": 1.45},
    {"t": 9.0, "reason": "uniform", "score": 0.9},
]


def test_one_report_per_mode_and_db_query_filters_on_them(migrated, db_url, tmp_path):
    _engine, factory = migrated
    with session_scope(factory) as session:
        vid = store.add_video(
            session=session, path="/v/a.mp4", sha256="a" * 64, state=VideoState.RUNNING
        ).id
    for sampling, frames in (("uniform", UNIFORM), ("events", EVENTS)):
        with session_scope(factory) as session:
            _, created = store.record_report(
                session=session, new=_new_report(vid, sampling, frames)
            )
        assert created, sampling
    with session_scope(factory) as session:  # the same events report again: kept out
        kept, created = store.record_report(session=session, new=_new_report(vid, "events", EVENTS))
        assert not created and kept.sampling == "events"
        for sampling in ("uniform", "events"):
            found = store.find_report(
                session=session,
                video_id=vid,
                model="tiny",
                adapter="",
                prompt_version=PROMPT_VERSION,
                sampling=sampling,
            )
            assert found.sampling == sampling
        assert session.scalar(select(func.count()).select_from(Report)) == 2

    env = {"FLEETSCRIBE_DATABASE_URL": db_url}

    def query(sql: str) -> list[dict]:
        out = run_cli(["db", "query", sql, "--format", "json"], tmp_path, env)
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)

    assert query(
        "SELECT sampling, event_frames FROM reports WHERE sampling = 'events' ORDER BY id"
    ) == [{"sampling": "events", "event_frames": 1}]
    assert query("SELECT count(*) AS n FROM reports WHERE event_frames > 0") == [{"n": 1}]
    assert query(
        "SELECT h.kind, h.timestamp_s, h.frame_score, r.sampling FROM hazards h "
        "JOIN reports r ON r.id = h.report_id WHERE h.frame_reason = 'event'"
    ) == [{"kind": "pedestrian", "timestamp_s": 5.1, "frame_score": 1.45, "sampling": "events"}]
    assert query(
        "SELECT frame_reason, count(*) AS n FROM hazards GROUP BY frame_reason ORDER BY 1"
    ) == [{"frame_reason": "event", "n": 1}, {"frame_reason": "uniform", "n": 3}]
