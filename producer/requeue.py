"""Describe again the videos whose reports match a condition, e.g. an older prompt version.

`--where` is not SQL: it is the small condition language of db/conditions.py (shared with
`training export`), `FIELD OP VALUE [and FIELD OP VALUE ...]` over report columns turned into
a SQLAlchemy query, so no statement text reaches the database. Old reports stay: the new one
has its own prompt version.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from sqlalchemy import exists, select
from sqlalchemy.orm import Session, aliased

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

    to_send: list[Match]
    reports: int  # reports matching the condition
    videos: int  # the videos they describe
    current: int  # of those, videos with a report from the current prompt already
    not_done: dict[str, int]  # of the rest, videos by state when not done (queued, ...)


def select_again(
    *, session: Session, where, model: str, adapter: str, prompt_version: int
) -> Selection:
    """The videos with a report matching `where`, split into those to describe again (done,
    no report yet from the current prompt, model and adapter) and those that are not."""
    current = aliased(Report)
    has_current = exists().where(
        current.video_id == Video.id,
        current.model == model,
        current.adapter == adapter,
        current.prompt_version == prompt_version,
    )
    rows = session.execute(
        select(Video.id, Video.path, Video.state, Report.prompt_version, has_current)
        .join(Report, Report.video_id == Video.id)
        .where(where)
        .order_by(Video.id, Report.prompt_version.desc())
    ).all()
    to_send: dict[int, Match] = {}
    seen: set[int] = set()
    n_current = 0
    not_done: Counter[str] = Counter()
    for video_id, path, state, version, done_now in rows:
        if video_id in seen:
            continue
        seen.add(video_id)
        if done_now:
            n_current += 1
        elif VideoState(state) != VideoState.DONE:
            not_done[VideoState(state).value] += 1
        else:
            to_send[video_id] = Match(video_id, path, version)
    return Selection(list(to_send.values()), len(rows), len(seen), n_current, dict(not_done))


def matching(
    *, session: Session, where, model: str, adapter: str, prompt_version: int
) -> list[Match]:
    """Done videos with a report matching `where` and no report yet from the current prompt."""
    return select_again(
        session=session, where=where, model=model, adapter=adapter, prompt_version=prompt_version
    ).to_send


def describe_selection(
    selection: Selection, *, where_text: str, model: str, adapter: str, prompt_version: int
) -> str:
    """One line: how many matched, how many go again, and why the others do not."""
    s = selection

    def plural(n: int, one: str, many: str) -> str:
        return f"{n} {one if n == 1 else many}"

    head = (
        f"{plural(s.videos, 'video matches', 'videos match')}: {where_text} "
        f"({plural(s.reports, 'report', 'reports')}); {len(s.to_send)} to describe again"
    )
    why = []
    if s.current:
        has = "already has" if s.current == 1 else "already have"
        why.append(
            f"{s.current} {has} a report from prompt v{prompt_version} "
            f"(model {model}, {f'adapter {adapter}' if adapter else 'no adapter'})"
        )
    for state, n in sorted(s.not_done.items()):
        why.append(f"{n} {'is' if n == 1 else 'are'} {state}")
    if not why:
        return head
    return head + (": " if not s.to_send else "; skipped: ") + ", ".join(why)


def requeue_videos(
    *, session: Session, videos: list[Video], note: str, priority: int, frames: int
) -> int:
    """Put videos back to `queued` in a new batch (one submission each); its id."""
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
        )
        store.add_submission(
            session=session,
            batch_id=batch.id,
            path=video.path,
            video_id=video.id,
            outcome=Outcome.REQUEUED,
        )
    return batch.id
