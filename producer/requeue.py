"""Describe again the videos whose reports match a condition, e.g. an older prompt version.

`--where` is not SQL: it is the small condition language of db/conditions.py (shared with
`training export`), `FIELD OP VALUE [and FIELD OP VALUE ...]` over report columns turned into
a SQLAlchemy query, so no statement text reaches the database. Old reports stay: the new one
has its own prompt version, or its own sampling mode (`--sampling events` describes again
with event-aware frames what was described with uniform ones, e.g. `--where "sampling =
uniform"`).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from sqlalchemy import func, select
from sqlalchemy.orm import Session, aliased

from config.settings import DEFAULT_SAMPLING

# The condition language moved to db/ so that `training export` reads it too; its names
# stay importable from here.
from db.conditions import FIELDS as FIELDS
from db.conditions import BadCondition as BadCondition
from db.conditions import parse_where as parse_where
from db.models import Report, Video, VideoState


@dataclass
class Match:
    video_id: int
    path: str
    prompt_version: int


@dataclass
class Selection:
    """What --where picks: the videos to describe again, and why the other matches are not."""

    to_send: list[Match]  # by video id; only the first `limit` when select_again got one
    reports: int  # reports matching the condition
    videos: int  # the videos they describe
    current: int  # of those, videos with a report from the current prompt already
    not_done: dict[str, int]  # of the rest, videos by state when not done (queued, ...)
    again: int  # of the rest, the done videos: those to describe again (all of to_send's)


def select_again(
    *,
    session: Session,
    where,
    model: str,
    adapter: str,
    prompt_version: int,
    sampling: str | None = None,
    default_sampling: str = DEFAULT_SAMPLING,
    limit: int | None = None,
) -> Selection:
    """The videos with a report matching `where`, split into those to describe again (done,
    no report yet from the current prompt, model and adapter with the sampling they would
    be described with) and those that are not. That sampling is `sampling`, or when None
    each video's own (`videos.sampling`), else `default_sampling` (the setting).

    Counted in SQL, so a condition that matches most of a million-video store costs three
    queries, not a row per matching report in Python. `limit`: only the first videos to
    describe again are listed (a dry run shows a page of them; the counts stay whole)."""
    current_report = aliased(Report)
    # Only columns of uq_report_key: the join reads that index, never the reports' rows.
    current = (
        select(current_report.video_id, current_report.sampling)
        .where(
            current_report.model == model,
            current_report.adapter == adapter,
            current_report.prompt_version == prompt_version,
        )
        .subquery("current")
    )
    matched = Video.id.in_(select(Report.video_id).where(where))
    mode = sampling if sampling is not None else func.coalesce(Video.sampling, default_sampling)

    def videos(*columns):
        return (
            select(*columns)
            .select_from(Video)
            .outerjoin(current, (current.c.video_id == Video.id) & (current.c.sampling == mode))
            .where(matched)
        )

    n_reports = session.scalar(select(func.count()).select_from(Report).where(where)) or 0
    groups = session.execute(
        videos(Video.state, func.count(), func.count(current.c.video_id)).group_by(Video.state)
    ).all()
    n_videos = n_current = again = 0
    not_done: Counter[str] = Counter()
    for state, n, with_current in groups:
        n_videos += n
        n_current += with_current
        if VideoState(state) == VideoState.DONE:
            again += n - with_current
        elif n > with_current:
            not_done[VideoState(state).value] += n - with_current
    to_send: list[Match] = []
    if again and limit != 0:
        newest = (  # the newest prompt among the video's matching reports
            select(func.max(Report.prompt_version))
            .where(Report.video_id == Video.id, where)
            .scalar_subquery()
        )
        query = (
            videos(Video.id, Video.path, newest)
            .where(Video.state == VideoState.DONE, current.c.video_id.is_(None))
            .order_by(Video.id)
            .limit(limit)
        )
        to_send = [Match(vid, path, version) for vid, path, version in session.execute(query)]
    return Selection(to_send, n_reports, n_videos, n_current, dict(not_done), again)


def describe_selection(
    selection: Selection,
    *,
    where_text: str,
    model: str,
    adapter: str,
    prompt_version: int,
    sampling: str | None = None,
) -> str:
    """One line: how many matched, how many go again, and why the others do not. A
    `sampling` asked for is named; otherwise each video's own mode was compared."""
    s = selection

    def plural(n: int, one: str, many: str) -> str:
        return f"{n} {one if n == 1 else many}"

    head = (
        f"{plural(s.videos, 'video matches', 'videos match')}: {where_text} "
        f"({plural(s.reports, 'report', 'reports')}); {s.again} to describe again"
    )
    why = []
    if s.current:
        has = "already has" if s.current == 1 else "already have"
        mode = f", {sampling} sampling" if sampling else ""
        why.append(
            f"{s.current} {has} a report from prompt v{prompt_version} "
            f"(model {model}, {f'adapter {adapter}' if adapter else 'no adapter'}{mode})"
        )
    for state, n in sorted(s.not_done.items()):
        why.append(f"{n} {'is' if n == 1 else 'are'} {state}")
    if not why:
        return head
    return head + (": " if not s.again else "; skipped: ") + ", ".join(why)


def requeue_videos(
    *,
    session: Session,
    videos: list[Video],
    note: str,
    priority: int,
    frames: int,
    sampling: str | None,
    default_sampling: str,
) -> int:
    """Put videos back to `queued` in a new batch (one submission each); its id. Each keeps
    its frame count (else `frames`) and is described with `sampling`, or when None its own
    mode (else `default_sampling`): the mode is written on the video, so its message and
    the report's key say it whatever a worker's setting."""
    from db import store
    from producer.enqueue import Outcome

    batch = store.create_batch(
        session=session, frames=frames, priority=priority, inputs=len(videos), note=note
    )
    for video in videos:
        store.requeue_video(
            session=session,
            video=video,
            batch_id=batch.id,
            frames=video.frames or frames,
            priority=priority,
            sampling=sampling or video.sampling or default_sampling,
        )
    store.add_submissions(
        session=session,
        rows=[
            {"batch_id": batch.id, "path": v.path, "video_id": v.id, "outcome": Outcome.REQUEUED}
            for v in videos
        ],
    )
    return batch.id
