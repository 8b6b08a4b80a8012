"""Read verbs for the failures listing (`python -m producer failures`): the videos that
ended failed or rejected, with their reasons. Each takes the session as a keyword."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from db.models import Submission, Video, VideoState

FAILED_STATES = (VideoState.FAILED, VideoState.REJECTED)


@dataclass
class FailedVideo:
    video_id: int
    state: str
    path: str
    reason: str
    attempts: int
    finished_at: datetime | None  # when it failed; for a rejected one, when it was refused


def _scope(batch_id: int | None, reason: str | None) -> list:
    conditions = [Video.state.in_(FAILED_STATES)]
    if batch_id is not None:
        submitted = select(Submission.video_id).where(Submission.batch_id == batch_id)
        conditions.append(Video.id.in_(submitted))
    if reason:
        conditions.append(func.coalesce(Video.reason, "").icontains(reason, autoescape=True))
    return conditions


def failure_counts(
    *, session: Session, batch_id: int | None = None, reason: str | None = None
) -> list[tuple[str, int]]:
    """(reason, videos) for the failed and rejected videos (all, or those one batch
    submitted; `reason`: only reasons containing this text, any case), most first."""
    text = func.coalesce(Video.reason, "")
    rows = session.execute(
        select(text, func.count())
        .where(*_scope(batch_id, reason))
        .group_by(text)
        .order_by(func.count().desc(), text)
    )
    return [(why, n) for why, n in rows]


def failure_states(
    *, session: Session, batch_id: int | None = None, reason: str | None = None
) -> dict[str, int]:
    """How many videos of `failure_counts`'s scope ended failed and how many rejected."""
    rows = session.execute(
        select(Video.state, func.count()).where(*_scope(batch_id, reason)).group_by(Video.state)
    )
    counts = {state.value: 0 for state in FAILED_STATES}
    for state, n in rows:
        counts[VideoState(state).value] = n
    return counts


def failed_videos(
    *,
    session: Session,
    batch_id: int | None = None,
    reason: str | None = None,
    limit: int | None = None,
) -> list[FailedVideo]:
    """The failed and rejected videos themselves (same scope as `failure_counts`), by id;
    only the first `limit` of them when given (a million-video store may hold tens of
    thousands: `failure_states` counts them all)."""
    query = (
        select(
            Video.id,
            Video.state,
            Video.path,
            Video.reason,
            Video.attempts,
            func.coalesce(Video.finished_at, Video.updated_at),
        )
        .where(*_scope(batch_id, reason))
        .order_by(Video.id)
    )
    if limit is not None:
        query = query.limit(limit)
    return [
        FailedVideo(vid, VideoState(state).value, path, why or "", attempts, when)
        for vid, state, path, why, attempts, when in session.execute(query)
    ]
