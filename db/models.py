"""The store's tables (SQLAlchemy 2). Reports keep their JSON plus the columns people filter on."""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy import Enum as SAEnum
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

JSONType = JSON().with_variant(JSONB(), "postgresql")


def utcnow() -> datetime:
    return datetime.now(UTC)


class VideoState(StrEnum):
    """Where a video is in its life; stored as the plain string."""

    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    REJECTED = "rejected"


FINAL_STATES = (VideoState.DONE, VideoState.FAILED, VideoState.REJECTED)
# A failure reason that starts so is the worker's fault, not the file's (a bug, a shutdown
# that cut a task short): a redelivered message for such a video runs again.
INTERNAL_ERROR = "internal error"


class RunState(StrEnum):
    """Where a training run is in its life; stored as the plain string."""

    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


FINAL_RUN_STATES = (RunState.DONE, RunState.FAILED, RunState.CANCELLED)


def _str_enum(enum: type[StrEnum], name: str) -> SAEnum:
    # Plain VARCHAR + CHECK, the value stored as is: readable in SQL, easy to extend.
    return SAEnum(
        enum,
        name=name,
        native_enum=False,
        create_constraint=True,
        length=16,
        values_callable=lambda e: [m.value for m in e],
    )


class Base(DeclarativeBase):
    type_annotation_map: ClassVar = {dict[str, Any]: JSONType, list[Any]: JSONType}


class Batch(Base):
    """One `producer enqueue` invocation."""

    __tablename__ = "batches"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    frames: Mapped[int] = mapped_column(Integer)
    priority: Mapped[int] = mapped_column(Integer, default=0)
    inputs: Mapped[int] = mapped_column(Integer, default=0)
    note: Mapped[str] = mapped_column(Text, default="")
    # A fingerprint of the command (inputs, frames, priority): a second run of the same
    # command resumes the batch until completed_at says every input was recorded.
    key: Mapped[str | None] = mapped_column(String(64), index=True)
    completed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class Video(Base):
    """One distinct video content (by sha256); several paths may point at it."""

    __tablename__ = "videos"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    path: Mapped[str] = mapped_column(Text)
    # NULL only for inputs that could not be read at all.
    sha256: Mapped[str | None] = mapped_column(String(64), unique=True)
    bytes: Mapped[int | None] = mapped_column(BigInteger, index=True)
    # Size plus a hash of sampled blocks (producer.fingerprint), for every readable input;
    # `dedupe` says which key decided this video's identity: 'sha256' or 'fast'.
    fast_key: Mapped[str | None] = mapped_column(String(80), index=True)
    dedupe: Mapped[str | None] = mapped_column(String(8))
    duration: Mapped[float | None] = mapped_column(Float)
    codec: Mapped[str | None] = mapped_column(String(32))
    container: Mapped[str | None] = mapped_column(String(64))
    width: Mapped[int | None] = mapped_column(Integer)
    height: Mapped[int | None] = mapped_column(Integer)
    fps: Mapped[float | None] = mapped_column(Float)
    rotation: Mapped[int | None] = mapped_column(Integer)
    state: Mapped[VideoState] = mapped_column(_str_enum(VideoState, "video_state"), index=True)
    reason: Mapped[str | None] = mapped_column(Text)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    frames: Mapped[int | None] = mapped_column(Integer)
    # How its frames are to be chosen ("uniform" | "events"); NULL: the worker's setting.
    sampling: Mapped[str | None] = mapped_column(String(16))
    priority: Mapped[int] = mapped_column(Integer, default=0)
    batch_id: Mapped[int | None] = mapped_column(ForeignKey("batches.id"), index=True)
    worker: Mapped[str | None] = mapped_column(String(255))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), default=utcnow, onupdate=utcnow
    )
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # The outbox mark: when the broker confirmed this video's current message. NULL while
    # it is queued and its message not known to be sent, so it is sent again (delivery/).
    published_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    reports: Mapped[list[Report]] = relationship(back_populates="video")

    # The backlog: queued videos whose message is not sent, highest priority first, then
    # oldest; the feeder (delivery.outbox.feed) takes a window at a time.
    __table_args__ = (
        Index("ix_videos_backlog", "state", "published_at", text("priority DESC"), "id"),
        # the status counts' and the sweep's queries by state (migration 0006 says which)
        Index("ix_videos_state_finished", "state", "finished_at"),
        Index("ix_videos_state_started", "state", "started_at"),
        Index("ix_videos_state_worker", "state", "worker"),
    )

    @property
    def failed_internally(self) -> bool:
        """Failed through the worker's fault, not the file's: worth running again."""
        return self.state == VideoState.FAILED and (self.reason or "").startswith(INTERNAL_ERROR)


class Worker(Base):
    """One describe worker process (host:pid) and its heartbeat, renewed while it runs: a
    video running on a worker whose heartbeat lapsed, or that stopped, is sent again."""

    __tablename__ = "workers"

    name: Mapped[str] = mapped_column(String(255), primary_key=True)
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    heartbeat_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), default=utcnow, index=True
    )
    stopped_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class Submission(Base):
    """One input path of one batch, and what became of it; the path -> video link."""

    __tablename__ = "submissions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    batch_id: Mapped[int] = mapped_column(ForeignKey("batches.id"), index=True)
    path: Mapped[str] = mapped_column(Text, index=True)
    video_id: Mapped[int] = mapped_column(ForeignKey("videos.id"), index=True)
    # queued | duplicate | already_<state> | rejected
    outcome: Mapped[str] = mapped_column(String(32))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    # a resumed batch skips the paths it already recorded
    __table_args__ = (Index("ix_submissions_batch_path", "batch_id", "path"),)


class Report(Base):
    """One description of one video by one (model, adapter, prompt version, sampling)."""

    __tablename__ = "reports"
    __table_args__ = (
        UniqueConstraint(
            "video_id", "model", "adapter", "prompt_version", "sampling", name="uq_report_key"
        ),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    video_id: Mapped[int] = mapped_column(ForeignKey("videos.id"), index=True)
    model: Mapped[str] = mapped_column(String(255))
    adapter: Mapped[str] = mapped_column(String(255), default="")  # '' = none; NULL breaks UNIQUE
    prompt_version: Mapped[int] = mapped_column(Integer)
    schema_version: Mapped[int] = mapped_column(Integer)
    valid: Mapped[bool] = mapped_column(Boolean, index=True)
    error: Mapped[str | None] = mapped_column(Text)
    raw_text: Mapped[str] = mapped_column(Text)
    report: Mapped[dict[str, Any] | None] = mapped_column(JSONType)

    risk_factor: Mapped[str | None] = mapped_column(String(16), index=True)
    road_type: Mapped[str | None] = mapped_column(String(16), index=True)
    weather: Mapped[str | None] = mapped_column(String(16), index=True)
    visibility: Mapped[str | None] = mapped_column(String(16))
    time_of_day: Mapped[str | None] = mapped_column(String(16))
    traffic_density: Mapped[str | None] = mapped_column(String(16))
    pedestrian_on_road: Mapped[bool | None] = mapped_column(Boolean)

    frame_timestamps: Mapped[list[Any]] = mapped_column(JSONType)
    # The sampling mode the video was to be described with ("uniform" | "events"): part of
    # the key, the mode asked for even when the file made the sampler fall back to uniform
    # frames (a redelivered message must find its report); `sampling_note` then says why.
    # Reports from before sampling modes were uniform: the server default says so.
    sampling: Mapped[str] = mapped_column(String(16), server_default="uniform")
    sampling_note: Mapped[str | None] = mapped_column(Text)
    # Each frame as chosen: [{"t": s, "reason": "uniform"|"event", "score": x|null}, ...];
    # NULL on reports stored before migration 0007 (uniform frames at frame_timestamps).
    frames: Mapped[list[Any] | None] = mapped_column(JSONType)
    # How many of `frames` were taken for an event: a filter without JSON functions.
    event_frames: Mapped[int] = mapped_column(Integer, server_default="0")
    tokens_in: Mapped[int] = mapped_column(Integer)
    tokens_out: Mapped[int] = mapped_column(Integer)
    latency_s: Mapped[float] = mapped_column(Float)
    worker_host: Mapped[str] = mapped_column(String(255))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    video: Mapped[Video] = relationship(back_populates="reports")
    hazards: Mapped[list[Hazard]] = relationship(
        back_populates="report", cascade="all, delete-orphan"
    )


class Hazard(Base):
    """One hazard of one report, so `GROUP BY kind` needs no JSON functions."""

    __tablename__ = "hazards"
    __table_args__ = (Index("ix_hazards_kind", "kind"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    report_id: Mapped[int] = mapped_column(ForeignKey("reports.id", ondelete="CASCADE"), index=True)
    video_id: Mapped[int] = mapped_column(ForeignKey("videos.id"), index=True)
    kind: Mapped[str] = mapped_column(String(16))
    description: Mapped[str] = mapped_column(Text)
    frame: Mapped[int] = mapped_column(Integer)
    timestamp_s: Mapped[float | None] = mapped_column(Float)
    # Why the frame it points at was taken ("uniform" | "event") and its change score.
    frame_reason: Mapped[str | None] = mapped_column(String(16))
    frame_score: Mapped[float | None] = mapped_column(Float)

    report: Mapped[Report] = relationship(back_populates="hazards")


class TrainingRun(Base):
    """One QLoRA SFT job, its lease (the training worker that holds it) and its progress."""

    __tablename__ = "training_runs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(255), unique=True)
    base_model: Mapped[str] = mapped_column(String(255))
    dataset: Mapped[str] = mapped_column(Text)
    config: Mapped[dict[str, Any]] = mapped_column(JSONType)
    state: Mapped[RunState] = mapped_column(_str_enum(RunState, "run_state"))
    reason: Mapped[str | None] = mapped_column(Text)
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    metrics: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    output_path: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    # Progress, as of the last logged optimizer step.
    step: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    total_steps: Mapped[int | None] = mapped_column(Integer)
    epoch: Mapped[float | None] = mapped_column(Float)
    loss: Mapped[float | None] = mapped_column(Float)
    learning_rate: Mapped[float | None] = mapped_column(Float)
    samples_per_s: Mapped[float | None] = mapped_column(Float)
    eta_s: Mapped[float | None] = mapped_column(Float)
    # The lease: a worker holds the run until lease_until and renews it while it trains;
    # a lapsed lease means its worker died, and the run is sent again.
    attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    lease_owner: Mapped[str | None] = mapped_column(String(255))
    lease_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), index=True)
    checkpoint_path: Mapped[str | None] = mapped_column(Text)
    cancel_requested_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # The outbox mark: when a message for this run was last sent, and its Celery task id.
    sent_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    task_id: Mapped[str | None] = mapped_column(String(255))
    split: Mapped[dict[str, Any] | None] = mapped_column(JSONType)  # train / held-out


class TrainingStep(Base):
    """One logged optimizer step of one attempt of a run: a resumed run logs the steps
    after its checkpoint again, under its next attempt."""

    __tablename__ = "training_steps"
    __table_args__ = (UniqueConstraint("run_id", "step", "attempt", name="uq_training_step"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("training_runs.id"), index=True)
    step: Mapped[int] = mapped_column(Integer)
    attempt: Mapped[int] = mapped_column(Integer)
    loss: Mapped[float | None] = mapped_column(Float)
    learning_rate: Mapped[float | None] = mapped_column(Float)
    grad_norm: Mapped[float | None] = mapped_column(Float)
    epoch: Mapped[float | None] = mapped_column(Float)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Adapter(Base):
    """A trained LoRA adapter the describe workers can load."""

    __tablename__ = "adapters"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(255), unique=True)
    path: Mapped[str] = mapped_column(Text)
    base_model: Mapped[str] = mapped_column(String(255))
    training_run_id: Mapped[int | None] = mapped_column(ForeignKey("training_runs.id"))
    metrics: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
