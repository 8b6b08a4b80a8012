"""Probe, hash, dedupe and record input files (their messages: delivery.outbox). Never
imports torch."""

from __future__ import annotations

import hashlib
import logging
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from config.settings import Settings
from db import store
from db.models import Video, VideoState
from db.session import session_scope
from video.errors import VideoError
from video.files import check_allowed, check_file
from video.media import VideoInfo, probe
from video.processes import KillablePool

log = logging.getLogger(__name__)

_CHUNK = 1 << 20
_PROBES = 4  # probing processes (hashing and probing are mostly I/O)


class Outcome:
    """What one input became (stored on its submission row)."""

    QUEUED = "queued"
    DUPLICATE = "duplicate"  # same content as an earlier input of this batch
    ALREADY_QUEUED = "already_queued"
    ALREADY_DONE = "already_done"
    REQUEUED = "requeued"  # failed before; sent round again
    RESENT = "resent"  # queued before, its message never confirmed: sent again
    REJECTED = "rejected"


@dataclass
class Inspected:
    path: str
    sha256: str | None = None
    size: int | None = None
    info: VideoInfo | None = None
    reason: str | None = None


@dataclass
class EnqueueSummary:
    batch_id: int
    outcomes: Counter = field(default_factory=Counter)
    rejected: list[tuple[str, str]] = field(default_factory=list)
    sent: int = 0


def sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def inspect_file(path: str, settings: Settings) -> Inspected:
    """Hash and probe one file; an unusable file comes back with a one-line reason."""
    result = Inspected(path)
    try:
        real = str(check_allowed(path, settings.video_roots))
    except VideoError as e:
        result.reason = str(e)
        return result
    try:
        result.size = check_file(real)  # before hashing: a FIFO would block the read
        if result.size > settings.max_video_bytes:
            raise VideoError(
                f"file is {result.size / 2**30:.1f} GiB, over the "
                f"{settings.max_video_bytes / 2**30:.0f} GiB limit (FLEETSCRIBE_MAX_VIDEO_BYTES)"
            )
        result.sha256 = sha256_file(real)
        result.info = probe(real)
    except VideoError as e:
        result.reason = str(e)
    except OSError as e:
        result.reason = f"cannot read: {e.strerror or e}"
    return result


def inspect_all(
    paths: list[str], settings: Settings, *, on_done: Callable[[Inspected], None] | None = None
) -> list[Inspected]:
    """Inspect files in a few killable processes (a file whose open or read blocks, or
    whose probe crashes, is rejected alone, after `probe_timeout_s`); input order kept."""
    if not paths:
        return []
    pool = KillablePool(
        processes=min(_PROBES, len(paths)),
        timeout_s=settings.probe_timeout_s,
        memory_gib=settings.decode_memory_gib,
        what="probing",
    )
    try:
        with ThreadPoolExecutor(max_workers=pool.processes) as threads:
            results = []
            for result in threads.map(lambda p: _inspect_in(pool, p, settings), paths):
                if on_done:
                    on_done(result)
                results.append(result)
    finally:
        pool.close()
    return results


def _inspect_in(pool: KillablePool, path: str, settings: Settings) -> Inspected:
    try:
        return pool.run(inspect_file, path, settings)
    except VideoError as e:  # killed past the timeout, crashed, or over the memory cap
        return Inspected(path, reason=str(e))


def _video_fields(item: Inspected, *, batch_id: int, frames: int, priority: int) -> dict:
    fields = {
        "path": item.path,
        "sha256": item.sha256,
        "bytes": item.size,
        "batch_id": batch_id,
        "frames": frames,
        "priority": priority,
    }
    if item.info is not None:
        info = item.info
        fields.update(
            duration=info.duration,
            codec=info.codec,
            container=info.container,
            width=info.width,
            height=info.height,
            fps=info.fps,
            rotation=info.rotation,
            state=VideoState.QUEUED,
        )
    else:
        fields.update(state=VideoState.REJECTED, reason=item.reason)
    return fields


def record(
    items: list[Inspected],
    *,
    sessions: sessionmaker[Session],
    frames: int,
    priority: int,
    note: str,
) -> tuple[EnqueueSummary, list[Video]]:
    """Write the batch, a video row per new content and a submission per input.

    Returns the summary and the videos that need a message (new or requeued).
    """
    to_send: list[Video] = []
    with session_scope(sessions) as session:
        batch = store.create_batch(
            session=session, frames=frames, priority=priority, inputs=len(items), note=note
        )
        summary = EnqueueSummary(batch.id)
        seen_in_batch: set[int] = set()
        for item in items:
            video, outcome = _place(session, item, batch.id, frames, priority, seen_in_batch)
            seen_in_batch.add(video.id)
            if outcome in (Outcome.QUEUED, Outcome.REQUEUED, Outcome.RESENT):
                to_send.append(video)
            if outcome == Outcome.REJECTED:
                summary.rejected.append((item.path, video.reason or item.reason or ""))
            summary.outcomes[outcome] += 1
            store.add_submission(
                session=session,
                batch_id=batch.id,
                path=item.path,
                video_id=video.id,
                outcome=outcome,
            )
    return summary, to_send


def _place(session, item, batch_id, frames, priority, seen_in_batch) -> tuple[Video, str]:
    existing = store.find_video(session=session, sha256=item.sha256) if item.sha256 else None
    if existing is None:
        fields = _video_fields(item, batch_id=batch_id, frames=frames, priority=priority)
        try:
            with session.begin_nested():
                video = store.add_video(session=session, **fields)
        except IntegrityError:
            # Another producer stored the same content a moment ago.
            existing = store.find_video(session=session, sha256=item.sha256)
            if existing is None:
                raise
        else:
            state = video.state
            return video, Outcome.QUEUED if state == VideoState.QUEUED else Outcome.REJECTED
    if existing.id in seen_in_batch:
        return existing, Outcome.DUPLICATE
    if existing.state == VideoState.FAILED:
        store.requeue_video(
            session=session, video=existing, batch_id=batch_id, frames=frames, priority=priority
        )
        return existing, Outcome.REQUEUED
    if existing.state == VideoState.REJECTED:
        return existing, Outcome.REJECTED
    if existing.state == VideoState.DONE:
        return existing, Outcome.ALREADY_DONE
    if existing.state == VideoState.QUEUED and existing.published_at is None:
        # its message was never confirmed (the producer died, the broker hung): again
        return existing, Outcome.RESENT
    return existing, Outcome.ALREADY_QUEUED
