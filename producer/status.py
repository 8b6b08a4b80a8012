"""Counts by state, throughput and ETA, for all videos or one batch."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy.orm import Session

from db import store
from db.models import Batch, VideoState
from producer.errors import NoSuchBatch

WINDOW = timedelta(minutes=5)


@dataclass
class Progress:
    counts: dict[VideoState, int]
    per_minute: float | None
    eta_s: float | None

    @property
    def pending(self) -> int:
        return self.counts[VideoState.QUEUED] + self.counts[VideoState.RUNNING]

    @property
    def finished(self) -> int:
        return self.counts[VideoState.DONE] + self.counts[VideoState.FAILED]


def check_batch(*, session: Session, batch_id: int | None) -> None:
    """Refuse a batch id that does not exist (NoSuchBatch), saying which is the newest."""
    if batch_id is None or session.get(Batch, batch_id) is not None:
        return
    newest = store.latest_batch_id(session=session)
    known = f"the newest is {newest}" if newest is not None else "there is no batch yet"
    raise NoSuchBatch(f"no batch {batch_id} ({known})")


def progress(*, session: Session, batch_id: int | None) -> Progress:
    """Where a batch (or everything) stands; throughput over the last few minutes."""
    c = store.state_counts(session=session, batch_id=batch_id, window=WINDOW)
    rate = None
    if c.finished_recently and c.first_started and c.last_finished:
        span = (c.last_finished - c.first_started).total_seconds()
        # Over the recent window once the run is long enough; before that, since it began.
        minutes = min(WINDOW.total_seconds(), max(span, 1.0)) / 60
        rate = c.finished_recently / minutes
    eta = c.pending / rate * 60 if rate and c.pending else (0.0 if not c.pending else None)
    return Progress(c.counts, rate, eta)


def format_eta(seconds: float | None) -> str:
    if seconds is None:
        return "unknown"
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"
