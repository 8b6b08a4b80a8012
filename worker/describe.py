"""One video through the pipeline: claim, sample frames, run the model, validate, store."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

from sqlalchemy.orm import Session, sessionmaker

from db import store
from db.models import FINAL_STATES, VideoState
from db.session import make_engine, make_sessionmaker, session_scope
from models.schema import SCHEMA_VERSION, parse_report
from worker.errors import EngineError, VideoError
from worker.sampler import get_sampler
from worker.settings import Settings, get_settings
from worker.video import SampledVideo

log = logging.getLogger(__name__)


@dataclass
class Runtime:
    """What a worker process holds for its life: settings, DB sessions, the model."""

    settings: Settings
    sessions: sessionmaker[Session]
    host: str
    _engine: object | None = field(default=None, repr=False)
    _batcher: object | None = field(default=None, repr=False)

    @classmethod
    def create(cls, settings: Settings | None = None) -> Runtime:
        import socket

        settings = settings or get_settings()
        db_engine = make_engine(settings.db_url)
        return cls(settings, make_sessionmaker(db_engine), f"{socket.gethostname()}:{os.getpid()}")

    def engine(self):
        """The describe engine (model loaded on first call)."""
        if self._engine is None:
            from worker.engine import get_engine

            self._engine = get_engine(self.settings)
        return self._engine

    def batcher(self):
        """The batcher that gathers this process's tasks into GPU batches (made once)."""
        if self._batcher is None:
            from worker.batcher import Batcher

            self._batcher = Batcher(self.engine(), wait_s=self.settings.batch_wait_ms / 1000)
        return self._batcher

    def fail(self, video_id: int, reason: str) -> None:
        with session_scope(self.sessions) as session:
            store.record_failure(session=session, video_id=video_id, reason=reason)
        log.warning("video %s failed: %s", video_id, reason)


def describe_video(rt: Runtime, *, video_id: int, path: str, frames: int | None) -> str:
    """Run one queued video to a final state; returns that state's name."""
    settings = rt.settings
    engine = rt.engine()
    with session_scope(rt.sessions) as session:
        video = store.start_attempt(session=session, video_id=video_id, worker=rt.host)
        if video is None:
            log.error("video %s is not in the store; message dropped", video_id)
            return "missing"
        if video.state in FINAL_STATES:
            return video.state.value  # a redelivered message for a finished video
        done = store.find_report(
            session=session,
            video_id=video_id,
            model=engine.model_id,
            adapter=engine.adapter,
            prompt_version=engine.prompt_version,
        )
        if done is not None:
            video.state = VideoState.DONE
            return VideoState.DONE.value
        expected_bytes = video.bytes
        k = frames or video.frames or settings.frames

    try:
        batcher = rt.batcher()
        # The GPU thread batches this video with the other tasks' videos; while this one is
        # decoded and preprocessed, a partial batch waits for it.
        with batcher.preparing():
            sampled = _sample(path, k, expected_bytes, settings)
            pending = batcher.submit(engine.prepare(sampled))
        answer = pending.result(timeout=settings.task_soft_time_limit)
    except (VideoError, EngineError) as e:
        rt.fail(video_id, str(e))
        return VideoState.FAILED.value
    except TimeoutError:
        limit = settings.task_soft_time_limit
        rt.fail(video_id, f"no answer from the model within {limit} s (task soft time limit)")
        return VideoState.FAILED.value

    parsed = parse_report(answer.text, frames=len(sampled.timestamps))
    new = store.NewReport(
        video_id=video_id,
        model=engine.model_id,
        adapter=engine.adapter,
        prompt_version=engine.prompt_version,
        schema_version=SCHEMA_VERSION,
        raw_text=answer.text,
        report=parsed.report,
        error=parsed.error,
        frame_timestamps=sampled.timestamps,
        tokens_in=answer.tokens_in,
        tokens_out=answer.tokens_out,
        latency_s=round(answer.latency_s, 4),
        worker_host=rt.host,
        hazards=(parsed.report or {}).get("hazards", []),
    )
    with session_scope(rt.sessions) as session:
        _, created = store.record_report(session=session, new=new)
    if not created:
        log.info("video %s already had a report; redelivery ignored", video_id)
    elif not parsed.valid:
        log.info("video %s: report stored as invalid: %s", video_id, parsed.error)
    return VideoState.DONE.value


def _sample(path: str, k: int, expected_bytes: int | None, settings: Settings) -> SampledVideo:
    """The video's frames, if it is still the allowed, unchanged file that was enqueued.

    Decoded in a child process that is killed after `decode_timeout_s` (worker/sampler.py):
    a thread stuck in FFmpeg could never be stopped."""
    return get_sampler(settings).sample(
        path,
        k,
        expected_bytes=expected_bytes,
        roots=settings.video_roots,
        max_side=settings.frame_max_side,
    )
