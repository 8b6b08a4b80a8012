"""`training export`: reviewed reports and their re-sampled frames become a dataset, on
SQLite and PostgreSQL, with real videos; the condition language it shares with requeue."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from datasets import load_from_disk

from config.errors import ExpectedError
from db import store
from db.models import Report, VideoState
from db.session import session_scope
from models.schema import parse_report
from producer.clips import Event, make_video, read_time
from training.data import FEATURES
from training.export import ExportError, export
from video.media import sample_frames

SECONDS = 1.5
MAX_SIDE = 48  # below the clips' 64 px: the frames are scaled as the worker scales them


def report_dict(risk: str, frames: int, *, scene: str = "A car ahead on a straight road.") -> dict:
    """A schema-v1 report as a worker stores it (through parse_report)."""
    raw = {
        "schema_version": 1,
        "scene_description": scene,
        "driving_parameters": {
            "road_type": "highway",
            "lane_count": 3,
            "ego_lane_position": "middle",
            "traffic_light_state": "none",
            "pedestrian_on_road": False,
            "closest_vehicle_distance": "near",
            "ego_vehicle_speed": "fast",
            "road_curvature": "straight",
            "weather": "clear",
            "visibility": "good",
            "time_of_day": "day",
            "traffic_density": "light",
            "risk_factor": risk,
        },
        "hazards": [{"kind": "vehicle", "description": "car braking", "frame": frames - 1}],
        "risk_assessment": "Keep the distance and be ready to brake.",
    }
    parsed = parse_report(json.dumps(raw), frames=frames)
    assert parsed.valid, parsed.error
    return parsed.report


def clip(directory: Path, name: str, seed: int, **kwargs) -> Path:
    return make_video(
        directory / name, seconds=SECONDS, fps=10, width=64, height=48, seed=seed, **kwargs
    )


def described(
    sessions,
    path: Path,
    *,
    k: int,
    risk: str = "high",
    prompt_version: int = 1,
    valid: bool = True,
    timestamps: list[float] | None = None,
    video_id: int | None = None,
    sampling: str = "uniform",
) -> tuple[int, int]:
    """(video id, report id) of `path` stored as a describe worker stores it: its size when
    enqueued, a report with the timestamps of the k frames the worker's sampler took (by
    `sampling`)."""
    sampled = sample_frames(path, k, sampling=sampling)
    times = timestamps if timestamps is not None else sampled.timestamps
    with session_scope(sessions) as session:
        if video_id is None:
            video_id = store.add_video(
                session=session,
                path=str(path),
                sha256=hashlib.sha256(path.read_bytes()).hexdigest(),
                bytes=path.stat().st_size,
                state=VideoState.QUEUED,
                frames=k,
            ).id
        report = report_dict(risk, k) if valid else None
        row, _ = store.record_report(
            session=session,
            new=store.NewReport(
                video_id=video_id,
                model="tiny-qwen3-vl",
                adapter="",
                prompt_version=prompt_version,
                schema_version=1,
                raw_text=json.dumps(report) if valid else "{not json",
                report=report,
                error=None if valid else "not JSON: Expecting property name",
                frame_timestamps=times,
                tokens_in=900,
                tokens_out=150,
                latency_s=0.5,
                worker_host="gpu-1",
                hazards=(report or {}).get("hazards", []),
                sampling=sampling,
                frames=sampled.choices() if timestamps is None else [],
            ),
        )
        return video_id, row.id


def run(sessions, where: str, out: Path, roots: list[Path], **kwargs):
    return export(
        sessions=sessions, where_text=where, out=out, max_side=MAX_SIDE, roots=roots, **kwargs
    )


@pytest.fixture
def videos(tmp_path) -> Path:
    return tmp_path / "videos"


def test_matching_reports_are_written_with_the_frames_they_describe(migrated, videos, tmp_path):
    _engine, sessions = migrated
    a, b = clip(videos, "a.mp4", 1), clip(videos, "b.mkv", 2)
    va, ra = described(sessions, a, k=4)
    vb, rb = described(sessions, b, k=3)
    described(sessions, b, k=3, risk="low", prompt_version=2, video_id=vb)  # does not match
    vc, rc = described(sessions, clip(videos, "c.mp4", 3), k=5, prompt_version=2)
    out = tmp_path / "train-high"

    result = run(sessions, "risk_factor = high", out, [videos])

    assert (result.rows, result.skipped, result.out) == (3, [], out)
    assert result.report_ids == [ra, rb, rc]
    data = load_from_disk(str(out))
    assert data.features == FEATURES and len(data) == 3
    with session_scope(sessions) as session:
        stored = [session.get(Report, r) for r in (ra, rb, rc)]
        expected = [(r.report, r.frame_timestamps) for r in stored]
    for row, path, vid, (report, times) in zip(
        data, (a, b, videos / "c.mp4"), (va, vb, vc), expected, strict=True
    ):
        assert row["source"] == f"video:{vid}"
        assert row["timestamps"] == times
        reference = sample_frames(path, len(times), max_side=MAX_SIDE)
        assert reference.timestamps == times
        assert len(row["images"]) == len(times)
        for image, frame, t in zip(row["images"], reference.frames, times, strict=True):
            assert image.mode == "RGB"
            assert np.array_equal(np.asarray(image), frame)  # PNG in the dataset: lossless
            assert abs(read_time(np.asarray(image), SECONDS) - t) < 0.05  # its drawn clock
        assert json.loads(row["report"]) == report
        # in the schema's field order on both backends (JSONB keeps keys in its own order)
        assert row["report"] == json.dumps(report_dict("high", len(times)))

    manifest = json.loads((out / "export.json").read_text())
    assert manifest == {
        "where": "risk_factor = high",
        "rows": 3,
        "report_ids": [ra, rb, rc],
        "skipped": [],
        "max_side": MAX_SIDE,
        "schema_version": 1,
    }
    assert not list(tmp_path.glob(".train-high.partial-*"))


def test_videos_that_cannot_be_read_as_described_are_skipped_with_their_reason(
    migrated, videos, tmp_path
):
    _engine, sessions = migrated
    good, _ = described(sessions, clip(videos, "good.mp4", 1), k=3)
    gone_path = clip(videos, "gone.mp4", 2)
    gone, _ = described(sessions, gone_path, k=3)
    gone_path.unlink()
    changed_path = clip(videos, "changed.mp4", 3)
    changed, _ = described(sessions, changed_path, k=3)
    was = changed_path.stat().st_size
    clip(videos, "changed.mp4", 3, codec="mpeg4")  # another file at the same path
    now = changed_path.stat().st_size
    outside_path = clip(tmp_path / "elsewhere", "outside.mp4", 4)
    outside, _ = described(sessions, outside_path, k=3)
    moved_path = clip(videos, "moved.mp4", 5)
    moved, moved_report = described(sessions, moved_path, k=2, timestamps=[0.1, 0.2])
    sampled_at = sample_frames(moved_path, 2).timestamps
    out = tmp_path / "out"

    result = run(sessions, "risk_factor = high", out, [videos])

    assert result.rows == 1
    assert result.skipped == [
        (gone, "the file is gone since it was enqueued"),
        (changed, f"the file changed since it was enqueued ({now} bytes, was {was})"),
        (outside, f"outside FLEETSCRIBE_VIDEO_ROOTS: {outside_path}"),
        (
            moved,
            f"its frames are no longer those of report {moved_report}: sampled at "
            f"[{sampled_at[0]:g}, {sampled_at[1]:g}] s, the report has [0.1, 0.2] s",
        ),
    ]
    assert [row["source"] for row in load_from_disk(str(out))] == [f"video:{good}"]
    manifest = json.loads((out / "export.json").read_text())
    assert manifest["skipped"] == [{"video_id": v, "reason": r} for v, r in result.skipped]


def test_invalid_reports_are_never_exported(migrated, videos, tmp_path):
    _engine, sessions = migrated
    va, ra = described(sessions, clip(videos, "a.mp4", 1), k=3)
    described(sessions, clip(videos, "b.mp4", 2), k=3, valid=False)
    out = tmp_path / "out"

    result = run(sessions, "prompt_version = 1", out, [videos])  # matches both reports

    assert (result.rows, result.report_ids, result.skipped) == (1, [ra], [])
    assert [row["source"] for row in load_from_disk(str(out))] == [f"video:{va}"]
    with pytest.raises(ExportError) as e:
        run(sessions, "valid = false", tmp_path / "invalid", [videos])
    assert str(e.value) == "no valid report matches 'valid = false'"


def test_refusals_are_one_line_each(migrated, videos, tmp_path):
    from db.conditions import BadCondition

    _engine, sessions = migrated
    gone_path = clip(videos, "gone.mp4", 1)
    gone, _ = described(sessions, gone_path, k=3, risk="critical")
    gone_path.unlink()
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    a_file = tmp_path / "a-file"
    a_file.write_text("")

    cases = [
        (
            "risk_factor = critical",
            busy,
            f"{busy} exists and is not empty; export into a new directory",
        ),
        ("risk_factor = critical", a_file, f"{a_file} exists and is not a directory"),
        ("risk_factor = high", tmp_path / "o1", "no valid report matches 'risk_factor = high'"),
        (
            "risk_factor = critical",
            tmp_path / "o2",
            "none of the 1 valid reports matching 'risk_factor = critical' can be exported:"
            f" video {gone}: the file is gone since it was enqueued",
        ),
    ]
    for where, out, message in cases:
        with pytest.raises(ExportError) as e:
            run(sessions, where, out, [videos])
        assert str(e.value) == message and isinstance(e.value, ExpectedError)
    with pytest.raises(BadCondition) as e:
        run(sessions, "path = /etc/passwd", tmp_path / "o3", [videos])
    assert str(e.value).startswith("unknown field 'path'; fields: prompt_version, ")
    assert (busy / "keep.txt").read_text() == "mine"
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()
    assert not list(tmp_path.glob(".*.partial-*"))


def test_an_empty_out_directory_is_used_and_a_killable_sampler_gives_the_same_rows(
    sqlite_url, videos, tmp_path
):
    from db.migrate import upgrade
    from db.session import make_engine, make_sessionmaker
    from video.processes import FrameSampler

    engine = make_engine(sqlite_url)
    upgrade(engine)
    sessions = make_sessionmaker(engine)
    described(sessions, clip(videos, "a.mp4", 1), k=4)
    here, there = tmp_path / "here", tmp_path / "there"
    there.mkdir()
    sampler = FrameSampler(processes=1, timeout_s=60, memory_gib=0)
    try:
        run(sessions, "risk_factor = high", here, [videos])
        run(sessions, "risk_factor = high", there, [videos], sampler=sampler)
    finally:
        sampler.close()
        engine.dispose()
    one, two = load_from_disk(str(here)), load_from_disk(str(there))
    assert one["timestamps"] == two["timestamps"] and one["report"] == two["report"]
    for x, y in zip(one[0]["images"], two[0]["images"], strict=True):
        assert np.array_equal(np.asarray(x), np.asarray(y))


def test_the_condition_language_moved_to_db_and_requeue_still_reads_it():
    from db import conditions
    from producer import requeue

    assert requeue.parse_where is conditions.parse_where
    assert requeue.BadCondition is conditions.BadCondition
    assert requeue.FIELDS is conditions.FIELDS
    assert issubclass(conditions.BadCondition, ExpectedError)
    for text, message in [
        ("  ", "--where is empty; e.g. --where 'prompt_version < 2'"),
        (
            "prompt_version",
            "cannot read 'prompt_version': write FIELD OP VALUE, e.g. prompt_version < 2",
        ),
        ("valid = maybe", "valid is true or false, not 'maybe'"),
        ("prompt_version < two", "prompt_version is a whole number, not 'two'"),
        ("model = x';--", 'model: "x\';--" is not a plain value'),
    ]:
        with pytest.raises(conditions.BadCondition) as e:
            conditions.parse_where(text)
        assert str(e.value) == message
    compiled = conditions.parse_where("risk_factor = 'high' and valid = true").compile()
    assert "high" not in str(compiled)  # values travel as bound parameters, never as SQL
    assert list(compiled.params.values()) == ["high"]


def test_the_export_command_writes_a_set_that_training_reads(sqlite_url, videos, tmp_path):
    """`python -m training export` end to end: the command (its decoding in killable
    processes), its one-line refusal, and a set `prepare_dataset` loads for training."""
    import os
    import subprocess
    import sys

    from db.migrate import upgrade
    from db.session import make_engine, make_sessionmaker
    from training.data import prepare_dataset

    engine = make_engine(sqlite_url)
    upgrade(engine)
    sessions = make_sessionmaker(engine)
    videos.mkdir()
    for i, risk in enumerate(["high", "high", "low"]):
        described(sessions, clip(videos, f"v{i}.mp4", seed=i), k=3, risk=risk)
    engine.dispose()
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEETSCRIBE_")}
    env.update(FLEETSCRIBE_DATABASE_URL=sqlite_url, FLEETSCRIBE_FRAME_MAX_SIDE=str(MAX_SIDE))
    root = Path(__file__).resolve().parents[1]

    def command(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "training", "export", *args],
            cwd=root, env=env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip

    out = tmp_path / "reviewed"
    done = command("--where", "risk_factor = high", str(out))
    assert done.returncode == 0, done.stderr
    assert f"wrote 2 rows to {out} (0 skipped)" in done.stdout
    data = prepare_dataset(out, heldout_fraction=0.5, seed=0)
    assert (len(data.train), len(data.heldout), data.skipped) == (1, 1, [])
    refused = command("--where", "risk_factor = high", str(out))
    assert refused.returncode == 2
    assert refused.stderr.strip().endswith("exists and is not empty; export into a new directory")


def test_a_report_of_event_frames_is_exported_with_those_frames(migrated, videos, tmp_path):
    _engine, sessions = migrated
    path = make_video(
        videos / "crossing.mp4", seconds=12, fps=10, width=160, height=90, seed=5,
        events=[Event(5.1, 0.8)],
    )  # fmt: skip
    events = sample_frames(path, 3, sampling="events").timestamps
    assert events != sample_frames(path, 3).timestamps  # else this would show nothing
    _, report_id = described(sessions, path, k=3, sampling="events")
    out = tmp_path / "train-events"

    result = run(sessions, "sampling = events", out, [videos])

    assert (result.rows, result.skipped, result.report_ids) == (1, [], [report_id])
    (row,) = load_from_disk(str(out))
    assert row["timestamps"] == pytest.approx(events)
