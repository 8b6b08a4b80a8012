"""One video through the describe pipeline: sample its frames (killable decoding), batch it
onto the GPU with the other slots' videos, validate the answer, build the report.

The Celery task (`describe_video`: claim, run, store) and `python -m worker describe`
(`describe_files`: run, print) share every step here, so the JSON the command prints is
the report a worker stores.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from db import store
from db.models import FINAL_STATES, VideoState, utcnow
from db.session import session_scope
from models.errors import ModelError
from models.runner import Answer
from models.schema import SCHEMA_VERSION, parse_report
from video.errors import VideoError
from video.media import SAMPLING_MODES, SampledVideo
from worker.lifecycle import Stopping, WorkerRuntime

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

log = logging.getLogger(__name__)


def run_video(
    rt: WorkerRuntime, path: str, k: int, *, sampling: str, expected_bytes: int | None = None
) -> tuple[SampledVideo, Answer]:
    """Sample `path` (k frames chosen by `sampling`) and get the model's answer through the
    process's batcher.

    Raises VideoError (the file) or ModelError (the model), each with its one-line reason,
    or TimeoutError when no answer came within the task soft time limit."""
    settings = rt.settings
    stage = rt.metrics.stage
    # The GPU thread batches this video with the other tasks' videos; while this one is
    # decoded and preprocessed, a partial batch waits for it.
    with rt.batcher.preparing():
        # Decoded in a child process that is killed after decode_timeout_s: a thread stuck
        # in FFmpeg could never be stopped. It checks the file is still the allowed,
        # unchanged one that was enqueued.
        with stage.labels(stage="decode").time():
            sampled = rt.sampler.sample(
                path,
                k,
                expected_bytes=expected_bytes,
                roots=settings.video_roots,
                max_side=settings.frame_max_side,
                sampling=sampling,
            )
        with stage.labels(stage="preprocess").time():
            prepared = rt.runner.prepare(sampled)
        pending = rt.batcher.submit(prepared)
    with stage.labels(stage="generate").time():
        return sampled, pending.result(timeout=settings.task_soft_time_limit)


def build_report(
    rt: WorkerRuntime,
    sampled: SampledVideo,
    answer: Answer,
    *,
    video_id: int | None,
    sampling: str,
) -> store.NewReport:
    """The report row for one answer: validated against schema v1, with its provenance.

    `sampling` is the mode asked for, stored as the report's and part of its key: the
    frames may be uniform though "events" was asked (a file with nothing to score change
    by), and then `sampling_note` says why and every frame's reason is "uniform". Keyed on
    the mode asked, a redelivered message finds the report its first delivery stored."""
    parsed = parse_report(answer.text, frames=len(sampled.timestamps))
    return store.NewReport(
        video_id=video_id,
        model=rt.runner.model_id,
        adapter=rt.runner.adapter,
        prompt_version=rt.runner.prompt_version,
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
        sampling=sampling,
        sampling_note=sampled.note,
        frames=sampled.choices(),
    )


def fail(
    rt: WorkerRuntime,
    video_id: int,
    reason: str,
    *,
    kind: str = "internal",
    session: Session | None = None,
) -> None:
    """Mark a video failed with its one-line reason. `kind` counts it in the metrics:
    "video" (its file: rejected), else why the worker failed it: model, timeout, internal.
    Recorded in `session` when the caller holds one (committed with it), else in its own."""
    if session is not None:
        store.record_failure(session=session, video_id=video_id, reason=reason)
    else:
        with session_scope(rt.sessions) as own:
            store.record_failure(session=own, video_id=video_id, reason=reason)
    if kind == "video":
        rt.metrics.rejected.inc()
    else:
        rt.metrics.failed.labels(reason=kind).inc()
    log.warning("video %s failed: %s", video_id, reason)


def describe_video(
    rt: WorkerRuntime,
    *,
    video_id: int,
    path: str,
    frames: int | None,
    sampling: str | None = None,
) -> str:
    """Run one queued video to a final state and store it; returns that state's name.

    `frames` and `sampling` are the message's (None, as in a message from before sampling
    modes: the video's stored ones, else the worker's settings)."""
    runner = rt.runner
    with session_scope(rt.sessions) as session:
        video = store.start_attempt(session=session, video_id=video_id, worker=rt.host)
        if video is None:
            log.error("video %s is not in the store; message dropped", video_id)
            return "missing"
        if video.state in FINAL_STATES and not video.failed_internally:
            return video.state.value  # a redelivered message for a finished video
        # The mode asked for, not the one the sampler may fall back to: the report's key.
        mode = sampling or video.sampling or rt.settings.sampling
        if mode not in SAMPLING_MODES:  # a message not from fleetscribe's producer
            reason = f"unknown sampling mode {mode!r}: one of {', '.join(SAMPLING_MODES)}"
            fail(rt, video_id, reason, session=session)
            return VideoState.FAILED.value
        done = store.find_report(
            session=session,
            video_id=video_id,
            model=runner.model_id,
            adapter=runner.adapter,
            prompt_version=runner.prompt_version,
            sampling=mode,
        )
        if done is not None:
            video.state = VideoState.DONE
            return VideoState.DONE.value
        expected_bytes = video.bytes
        k = frames or video.frames or rt.settings.frames
        if video.published_at is not None:
            rt.metrics.queue_wait.observe(_seconds_since(video.published_at))

    try:
        sampled, answer = run_video(rt, path, k, sampling=mode, expected_bytes=expected_bytes)
    except Exception as e:
        if rt.stopping:  # a shutdown cut it short (its decoder killed, the GPU thread gone)
            raise Stopping(f"video {video_id}: the worker is shutting down") from e
        if not isinstance(e, VideoError | ModelError | TimeoutError):
            raise
        if isinstance(e, TimeoutError):
            limit = rt.settings.task_soft_time_limit
            reason = f"no answer from the model within {limit} s (task soft time limit)"
            fail(rt, video_id, reason, kind="timeout")
        else:
            fail(rt, video_id, str(e), kind="video" if isinstance(e, VideoError) else "model")
        return VideoState.FAILED.value

    new = build_report(rt, sampled, answer, video_id=video_id, sampling=mode)
    began = time.perf_counter()
    with session_scope(rt.sessions) as session:
        _, created = store.record_report(session=session, new=new)
    rt.metrics.stage.labels(stage="store").observe(time.perf_counter() - began)
    if created:
        rt.metrics.described.labels(valid=str(new.report is not None).lower()).inc()
    if not created:
        log.info("video %s already had a report; redelivery ignored", video_id)
    elif new.report is None:
        log.info("video %s: report stored as invalid: %s", video_id, new.error)
    return VideoState.DONE.value


def _seconds_since(moment: datetime) -> float:
    if moment.tzinfo is None:  # SQLite hands timestamps back without their zone (UTC)
        moment = moment.replace(tzinfo=UTC)
    return max(0.0, (utcnow() - moment).total_seconds())


def describe_files(
    rt: WorkerRuntime, paths: list[str], *, frames: int | None, sampling: str | None = None
) -> list[dict]:
    """`worker describe`: each path through the worker's pipeline, nothing stored.

    One dict per path, in order: `status` done with the report's fields (as stored, with
    `valid`), or failed with its `reason`. The files are sampled on as many threads as a
    worker has slots, so they share GPU batches as queued videos do. `frames` and
    `sampling` default to the settings."""
    k = frames or rt.settings.frames
    mode = sampling or rt.settings.sampling

    def one(path: str) -> dict[str, Any]:
        try:
            sampled, answer = run_video(rt, path, k, sampling=mode)
        except (VideoError, ModelError) as e:
            return {"path": path, "status": "failed", "reason": str(e)}
        except TimeoutError:
            limit = rt.settings.task_soft_time_limit
            return {"path": path, "status": "failed", "reason": f"no answer within {limit} s"}
        new = asdict(build_report(rt, sampled, answer, video_id=None, sampling=mode))
        new.pop("video_id")
        return {"path": path, "status": "done", "valid": new["report"] is not None, **new}

    if not paths:
        return []
    slots = max(1, min(len(paths), 2 * rt.settings.batch_size))
    with ThreadPoolExecutor(max_workers=slots, thread_name_prefix="describe") as threads:
        return list(threads.map(one, paths))
