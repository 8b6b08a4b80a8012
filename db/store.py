"""Data-access verbs. Each takes the session as a keyword; the caller owns the transaction."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, insert, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from db.models import (
    FINAL_STATES,
    Batch,
    Hazard,
    Report,
    Submission,
    Video,
    VideoState,
    Worker,
    utcnow,
)

# The report's enum fields copied into their own columns for plain SQL filters.
FLAT_FIELDS = (
    "risk_factor",
    "road_type",
    "weather",
    "visibility",
    "time_of_day",
    "traffic_density",
    "pedestrian_on_road",
)


# --- producer side ------------------------------------------------------------------------


def create_batch(*, session: Session, frames: int, priority: int, inputs: int, note: str) -> Batch:
    batch = Batch(frames=frames, priority=priority, inputs=inputs, note=note)
    session.add(batch)
    session.flush()
    return batch


def open_batch(
    *, session: Session, key: str | None, frames: int, priority: int, note: str
) -> tuple[Batch, int]:
    """The unfinished batch of the same command (`key`) to resume, with the number of
    inputs it recorded, or a new batch and 0."""
    if key is not None:
        batch = session.scalar(
            select(Batch)
            .where(Batch.key == key, Batch.completed_at.is_(None))
            .order_by(Batch.id.desc())
            .limit(1)
        )
        if batch is not None:
            recorded = session.scalar(select(func.count()).where(Submission.batch_id == batch.id))
            return batch, recorded or 0
    batch = Batch(frames=frames, priority=priority, inputs=0, note=note, key=key)
    session.add(batch)
    session.flush()
    return batch, 0


def complete_batch(*, session: Session, batch_id: int) -> None:
    """Every input of the batch is recorded: a later run of the command is a new batch."""
    session.execute(update(Batch).where(Batch.id == batch_id).values(completed_at=utcnow()))


def count_inputs(*, session: Session, batch_id: int, added: int) -> None:
    session.execute(update(Batch).where(Batch.id == batch_id).values(inputs=Batch.inputs + added))


def recorded_paths(*, session: Session, batch_id: int, paths: list[str]) -> set[str]:
    """Which of `paths` the batch already has a submission for."""
    if not paths:
        return set()
    return set(
        session.scalars(
            select(Submission.path).where(
                Submission.batch_id == batch_id, Submission.path.in_(paths)
            )
        )
    )


def find_video(*, session: Session, sha256: str) -> Video | None:
    return session.scalar(select(Video).where(Video.sha256 == sha256))


def videos_by_sha256(*, session: Session, sha256s: set[str]) -> dict[str, Video]:
    """The stored videos with these sha256s."""
    if not sha256s:
        return {}
    rows = session.scalars(select(Video).where(Video.sha256.in_(sha256s)))
    return {v.sha256: v for v in rows}


def videos_by_fast_key(*, session: Session, fast_keys: set[str]) -> dict[str, list[Video]]:
    """The stored videos with these fast keys, oldest first under each (more than one
    only after a collision)."""
    if not fast_keys:
        return {}
    out: dict[str, list[Video]] = {}
    query = select(Video).where(Video.fast_key.in_(fast_keys)).order_by(Video.id)
    for v in session.scalars(query):
        out.setdefault(v.fast_key, []).append(v)
    return out


def submitted_videos(*, session: Session, batch_id: int, ids: set[int]) -> set[int]:
    """Which of these videos an input of the batch already was."""
    if not ids:
        return set()
    return set(
        session.scalars(
            select(Submission.video_id)
            .where(Submission.batch_id == batch_id, Submission.video_id.in_(ids))
            .distinct()
        )
    )


def add_submissions(*, session: Session, rows: list[dict[str, Any]]) -> None:
    """One submission per input, in one statement."""
    if rows:
        now = utcnow()
        session.execute(insert(Submission), [{"created_at": now, **row} for row in rows])


def sizes_without_fast_key(*, session: Session, sizes: set[int]) -> set[int]:
    """Of these file sizes, those of videos recorded without a fast key."""
    if not sizes:
        return set()
    return set(
        session.scalars(
            select(Video.bytes).where(Video.bytes.in_(sizes), Video.fast_key.is_(None)).distinct()
        )
    )


def add_video(*, session: Session, **fields: Any) -> Video:
    video = Video(**fields)
    session.add(video)
    session.flush()
    return video


def add_submission(
    *, session: Session, batch_id: int, path: str, video_id: int, outcome: str
) -> Submission:
    sub = Submission(batch_id=batch_id, path=path, video_id=video_id, outcome=outcome)
    session.add(sub)
    return sub


def requeue_video(
    *,
    session: Session,
    video: Video,
    batch_id: int,
    frames: int,
    priority: int,
    sampling: str | None,
):
    """Put a video back to `queued` in `batch_id` (failed, requeued by prompt version or
    sampling, or left running by a dead worker), to be described with `frames` frames
    chosen by `sampling` (None: the worker's setting); the caller sends its message."""
    resend(session=session, video=video)  # queued, held by no worker, message unsent
    video.reason = None
    video.batch_id = batch_id
    video.frames = frames
    video.sampling = sampling
    video.priority = priority
    video.finished_at = None


# --- the outbox ---------------------------------------------------------------------------


def mark_published(*, session: Session, video_ids: list[int]) -> None:
    """The broker confirmed these videos' messages."""
    if video_ids:
        session.execute(
            update(Video)
            .where(Video.id.in_(video_ids), Video.state == VideoState.QUEUED)
            .values(published_at=utcnow())
        )


def _in_backlog():
    return (Video.state == VideoState.QUEUED) & Video.published_at.is_(None)


def backlog(*, session: Session, limit: int) -> list[Video]:
    """The next `limit` videos of the backlog (queued, message not sent): highest priority
    first, then oldest (the index ix_videos_backlog in that order)."""
    if limit <= 0:
        return []
    return list(
        session.scalars(
            select(Video)
            .where(_in_backlog())
            .order_by(Video.priority.desc(), Video.id)
            .limit(limit)
        )
    )


def backlog_count(*, session: Session, batch_id: int | None = None) -> int:
    """Queued videos whose message is not sent (all, or those one batch submitted)."""
    query = select(func.count()).select_from(Video).where(_in_backlog())
    if batch_id is not None:
        query = query.where(Video.id.in_(_batch_video_ids(batch_id)))
    return session.scalar(query) or 0


def batch_backlog_ids(*, session: Session, batch_id: int) -> list[int]:
    """The backlog of one batch, in the order the feeder sends it."""
    return list(
        session.scalars(
            select(Video.id)
            .where(_in_backlog(), Video.id.in_(_batch_video_ids(batch_id)))
            .order_by(Video.priority.desc(), Video.id)
        )
    )


def _sent_unclaimed(published_before: datetime | None):
    sent = (
        (Video.state == VideoState.QUEUED)
        & Video.published_at.is_not(None)
        & Video.worker.is_(None)
    )
    return sent if published_before is None else sent & (Video.published_at < published_before)


def sent_unclaimed(*, session: Session, published_before: datetime) -> list[tuple[int, bool]]:
    """Queued videos whose message was confirmed and that no worker has claimed (each one's
    message should be on the broker, waiting or handed out): the id of each, and whether
    it was confirmed before `published_before`."""
    older = Video.published_at < published_before
    rows = session.execute(select(Video.id, older).where(_sent_unclaimed(None)).order_by(Video.id))
    return [(video_id, bool(old)) for video_id, old in rows]


def still_sent_unclaimed(
    *, session: Session, video_ids: list[int], published_before: datetime
) -> list[Video]:
    """Of these videos, those still sent, unclaimed and confirmed before
    `published_before`, locked."""
    if not video_ids:
        return []
    return list(
        session.scalars(
            select(Video)
            .where(Video.id.in_(video_ids), _sent_unclaimed(published_before))
            .order_by(Video.id)
            .with_for_update(skip_locked=True)
        )
    )


def sent_not_taken(*, session: Session) -> int:
    """Queued videos whose message is sent and taken by no worker yet: what the broker
    should hold, for a broker that cannot be asked (the in-memory one)."""
    return (
        session.scalar(
            select(func.count())
            .select_from(Video)
            .where(
                Video.state == VideoState.QUEUED,
                Video.published_at.is_not(None),
                Video.worker.is_(None),
            )
        )
        or 0
    )


def live_workers(*, session: Session, lapsed_before: datetime) -> int:
    return session.scalar(select(func.count()).select_from(_alive(lapsed_before).subquery())) or 0


def finished_since(*, session: Session, since: datetime) -> int:
    """Videos done or failed since `since`: the fleet's recent throughput."""
    return (
        session.scalar(
            select(func.count())
            .select_from(Video)
            .where(
                Video.state.in_((VideoState.DONE, VideoState.FAILED)),
                Video.finished_at >= since,
            )
        )
        or 0
    )


def beat(*, session: Session, worker: str) -> None:
    """Renew `worker`'s heartbeat (its row made on the first beat)."""
    row = session.get(Worker, worker)
    if row is None:
        session.add(Worker(name=worker))
    else:
        row.heartbeat_at = utcnow()
        row.stopped_at = None


def stop_worker(*, session: Session, worker: str) -> None:
    """`worker` stopped: videos still running on it are orphans from now on."""
    row = session.get(Worker, worker)
    if row is not None:
        row.stopped_at = utcnow()


def claim(*, session: Session, video_id: int, worker: str) -> None:
    """`worker` took the video's message (before a task slot runs it): if the worker dies
    holding it, its lapsed heartbeat says the message is lost with it."""
    session.execute(
        update(Video)
        .where(Video.id == video_id, Video.state == VideoState.QUEUED)
        .values(worker=worker)
    )


def _alive(lapsed_before: datetime):
    """The names of the workers still beating: not stopped, heard since `lapsed_before`."""
    return select(Worker.name).where(
        Worker.heartbeat_at >= lapsed_before, Worker.stopped_at.is_(None)
    )


def _held_by_no_live_worker(lapsed_before: datetime):
    return or_(Video.worker.is_(None), Video.worker.not_in(_alive(lapsed_before)))


def orphaned(*, session: Session, lapsed_before: datetime) -> list[Video]:
    """Videos running on, or whose message was taken by, a worker that stopped or whose
    heartbeat is older than `lapsed_before` (its process was killed): nobody is
    describing them, and their messages wait for the broker's visibility timeout."""
    running_nowhere = (Video.state == VideoState.RUNNING) & _held_by_no_live_worker(lapsed_before)
    taken_by_the_dead = (
        (Video.state == VideoState.QUEUED)
        & Video.worker.is_not(None)
        & Video.worker.not_in(_alive(lapsed_before))
    )
    return list(
        session.scalars(
            select(Video)
            .where(or_(running_nowhere, taken_by_the_dead))
            .order_by(Video.id)
            .with_for_update(skip_locked=True)
        )
    )


def unheld(*, session: Session, video_ids: list[int], lapsed_before: datetime) -> list[int]:
    """Of these videos, those not finished and held by no live worker: a message for one
    of them that a broker still counts as handed out was lost with its worker."""
    if not video_ids:
        return []
    return list(
        session.scalars(
            select(Video.id).where(
                Video.id.in_(video_ids),
                Video.state.in_((VideoState.QUEUED, VideoState.RUNNING)),
                _held_by_no_live_worker(lapsed_before),
            )
        )
    )


def restored(*, session: Session, video_ids: list[int]) -> None:
    """The broker put these videos' own messages back on the queue: queued, held by no
    worker, their message confirmed (nothing to send again)."""
    if video_ids:
        session.execute(
            update(Video)
            .where(
                Video.id.in_(video_ids),
                Video.state.in_((VideoState.QUEUED, VideoState.RUNNING)),
            )
            .values(state=VideoState.QUEUED, worker=None, published_at=utcnow())
        )


def resend(*, session: Session, video: Video) -> None:
    """Back to `queued` in its own batch, its message to be sent again (by no worker yet)."""
    video.state = VideoState.QUEUED
    video.worker = None
    video.published_at = None


@dataclass
class StateCounts:
    counts: dict[VideoState, int]
    first_started: datetime | None
    last_finished: datetime | None
    finished_recently: int  # finished within the window given to state_counts

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    @property
    def pending(self) -> int:
        return self.counts[VideoState.QUEUED] + self.counts[VideoState.RUNNING]


def _batch_video_ids(batch_id: int):
    return select(Submission.video_id).where(Submission.batch_id == batch_id)


def state_counts(
    *, session: Session, batch_id: int | None = None, window: timedelta = timedelta(minutes=5)
) -> StateCounts:
    """Videos by state (all, or those one batch submitted) plus what throughput needs."""
    scope = Video.id.in_(_batch_video_ids(batch_id)) if batch_id is not None else True
    rows = session.execute(select(Video.state, func.count()).where(scope).group_by(Video.state))
    counts = {state: 0 for state in VideoState}
    for state, n in rows:
        counts[VideoState(state)] = n
    finished = (VideoState.DONE, VideoState.FAILED)
    if batch_id is None:
        # One state at a time: min/max under `state = ?` is one step of
        # ix_videos_state_started / ix_videos_state_finished; under `state IN (...)` it
        # reads every finished video of the store.
        starts = [
            session.scalar(select(func.min(Video.started_at)).where(Video.state == state))
            for state in finished
        ]
        ends = [
            session.scalar(select(func.max(Video.finished_at)).where(Video.state == state))
            for state in finished
        ]
        first_started = min((t for t in starts if t is not None), default=None)
        last_finished = max((t for t in ends if t is not None), default=None)
    else:  # the batch's videos, read once through its submissions
        first_started, last_finished = session.execute(
            select(func.min(Video.started_at), func.max(Video.finished_at)).where(
                scope, Video.state.in_(finished)
            )
        ).one()
    recent = session.scalar(
        select(func.count()).where(
            scope,
            Video.state.in_([VideoState.DONE, VideoState.FAILED]),
            Video.finished_at >= utcnow() - window,
        )
    )
    return StateCounts(counts, first_started, last_finished, recent or 0)


def latest_batch_id(*, session: Session) -> int | None:
    return session.scalar(select(func.max(Batch.id)))


def rejected_in_batch(*, session: Session, batch_id: int) -> list[tuple[str, str]]:
    """(path, reason) of every rejected input of a batch."""
    rows = session.execute(
        select(Submission.path, Video.reason)
        .join(Video, Video.id == Submission.video_id)
        .where(Submission.batch_id == batch_id, Video.state == VideoState.REJECTED)
        .order_by(Submission.id)
    )
    return [(path, reason or "") for path, reason in rows]


def failed_in_batch(*, session: Session, batch_id: int) -> list[tuple[str, str]]:
    rows = session.execute(
        select(Video.path, Video.reason)
        .where(Video.id.in_(_batch_video_ids(batch_id)), Video.state == VideoState.FAILED)
        .order_by(Video.id)
    )
    return [(path, reason or "") for path, reason in rows]


# --- worker side --------------------------------------------------------------------------


def start_attempt(*, session: Session, video_id: int, worker: str) -> Video | None:
    """Mark a video running (one more attempt); None if the row does not exist."""
    video = session.get(Video, video_id, with_for_update=True)
    if video is None:
        return None
    if video.state in FINAL_STATES and not video.failed_internally:
        return video
    video.state = VideoState.RUNNING
    video.attempts += 1
    video.worker = worker
    video.started_at = utcnow()
    return video


def stale_running(*, session: Session, older_than: datetime) -> list[Video]:
    """Videos left `running` since before `older_than`: their worker died or hung."""
    return list(
        session.scalars(
            select(Video)
            .where(Video.state == VideoState.RUNNING, Video.started_at < older_than)
            .order_by(Video.id)
            .with_for_update(skip_locked=True)
        )
    )


def find_report(
    *,
    session: Session,
    video_id: int,
    model: str,
    adapter: str,
    prompt_version: int,
    sampling: str,
) -> Report | None:
    """The video's report under this key (uq_report_key), if stored. `sampling` is the mode
    asked for, which is what a report stores as its `sampling`."""
    return session.scalar(
        select(Report).where(
            Report.video_id == video_id,
            Report.model == model,
            Report.adapter == adapter,
            Report.prompt_version == prompt_version,
            Report.sampling == sampling,
        )
    )


@dataclass
class NewReport:
    """Everything a worker learned about one video, ready to store."""

    video_id: int | None  # None: a report printed by `worker describe`, never stored
    model: str
    adapter: str
    prompt_version: int
    schema_version: int
    raw_text: str
    report: dict[str, Any] | None  # None when the text was not a valid report
    error: str | None
    frame_timestamps: list[float]
    tokens_in: int
    tokens_out: int
    latency_s: float
    worker_host: str
    # The report's hazards; each gets the time, reason and score of the frame it points at
    # (None past the last frame), as its hazards row stores them.
    hazards: list[dict[str, Any]] = field(default_factory=list)
    # The sampling mode asked for ("uniform" | "events"), part of the report's key even
    # when the file made the sampler fall back to uniform frames; `sampling_note` says why.
    sampling: str = "uniform"
    sampling_note: str | None = None
    # Each frame as chosen (SampledVideo.choices()); left empty: uniform frames at
    # frame_timestamps. `event_frames` counts those taken for an event.
    frames: list[dict[str, Any]] = field(default_factory=list)
    event_frames: int = field(init=False)

    def __post_init__(self) -> None:
        if not self.frames:
            self.frames = [
                {"t": t, "reason": "uniform", "score": None} for t in self.frame_timestamps
            ]
        if len(self.frames) != len(self.frame_timestamps):
            raise ValueError(
                f"{len(self.frames)} frames for {len(self.frame_timestamps)} frame timestamps"
            )
        self.event_frames = sum(f["reason"] == "event" for f in self.frames)
        self.hazards = [{**h, **self._frame_of(h["frame"])} for h in self.hazards]

    def _frame_of(self, index: int) -> dict[str, Any]:
        if not 0 <= index < len(self.frames):
            return {"timestamp_s": None, "frame_reason": None, "frame_score": None}
        frame = self.frames[index]
        return {
            "timestamp_s": self.frame_timestamps[index],
            "frame_reason": frame["reason"],
            "frame_score": frame["score"],
        }


def record_report(*, session: Session, new: NewReport) -> tuple[Report, bool]:
    """Store one report (+ hazards) and mark its video done.

    Idempotent: if a report with the same (video, model, adapter, prompt_version, sampling)
    exists (a redelivered task), nothing is written and (existing, False) is returned.
    """
    existing = _same_key(session, new)
    if existing is not None:
        _finish(session, new.video_id, VideoState.DONE, None)
        return existing, False
    params = (new.report or {}).get("driving_parameters", {})
    report = Report(
        video_id=new.video_id,
        model=new.model,
        adapter=new.adapter,
        prompt_version=new.prompt_version,
        schema_version=new.schema_version,
        valid=new.report is not None,
        error=new.error,
        raw_text=new.raw_text,
        report=new.report,
        frame_timestamps=new.frame_timestamps,
        sampling=new.sampling,
        sampling_note=new.sampling_note,
        frames=new.frames,
        event_frames=new.event_frames,
        tokens_in=new.tokens_in,
        tokens_out=new.tokens_out,
        latency_s=new.latency_s,
        worker_host=new.worker_host,
        **{name: params.get(name) for name in FLAT_FIELDS},
    )
    for h in new.hazards:
        report.hazards.append(
            Hazard(
                video_id=new.video_id,
                kind=h["kind"],
                description=h["description"],
                frame=h["frame"],
                timestamp_s=h["timestamp_s"],
                frame_reason=h["frame_reason"],
                frame_score=h["frame_score"],
            )
        )
    try:
        with session.begin_nested():
            session.add(report)
    except IntegrityError:
        # Another delivery of the same task committed first: keep its report.
        existing = _same_key(session, new)
        if existing is None:
            raise
        _finish(session, new.video_id, VideoState.DONE, None)
        return existing, False
    _finish(session, new.video_id, VideoState.DONE, None)
    return report, True


def _same_key(session: Session, new: NewReport) -> Report | None:
    return find_report(
        session=session,
        video_id=new.video_id,
        model=new.model,
        adapter=new.adapter,
        prompt_version=new.prompt_version,
        sampling=new.sampling,
    )


def record_failure(*, session: Session, video_id: int, reason: str) -> None:
    """Mark a video failed with a one-line reason (never overwrites a done video)."""
    video = session.get(Video, video_id)
    if video is None or video.state == VideoState.DONE:
        return
    _finish(session, video_id, VideoState.FAILED, reason)


def _finish(session: Session, video_id: int, state: VideoState, reason: str | None) -> None:
    video = session.get(Video, video_id)
    if video is None:
        return
    video.state = state
    video.reason = reason
    video.finished_at = utcnow()
