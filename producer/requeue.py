"""Describe again the videos whose reports match a condition, e.g. an older prompt version.

`--where` is not SQL: it is a small condition language turned into a SQLAlchemy query,
`FIELD OP VALUE [and FIELD OP VALUE ...]` over the report columns below, so no statement
text reaches the database. Old reports stay: the new one has its own prompt version.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Boolean, Integer, and_, exists, select
from sqlalchemy.orm import Session, aliased

from db.models import Report, Video, VideoState
from db.store import FLAT_FIELDS
from producer.errors import ProducerError

_NAMES = ("prompt_version", "schema_version", "model", "adapter", "valid", *FLAT_FIELDS)
FIELDS = {name: getattr(Report, name) for name in (*_NAMES, "tokens_out")}
_OPERATORS = {
    "<": lambda c, v: c < v,
    "<=": lambda c, v: c <= v,
    ">": lambda c, v: c > v,
    ">=": lambda c, v: c >= v,
    "=": lambda c, v: c == v,
    "==": lambda c, v: c == v,
    "!=": lambda c, v: c != v,
}
_CLAUSE = re.compile(r"^(\w+)\s*(<=|>=|==|!=|<|>|=)\s*(.+)$")
_AND = re.compile(r"\s+and\s+", re.IGNORECASE)


class BadCondition(ProducerError):
    """The --where text is not a condition this command understands."""


def parse_where(text: str):
    """A SQLAlchemy condition on `Report` from 'prompt_version < 2 and valid = false'."""
    clauses = [part.strip() for part in _AND.split(text.strip()) if part.strip()]
    if not clauses:
        raise BadCondition("--where is empty; e.g. --where 'prompt_version < 2'")
    return and_(*[_clause(c) for c in clauses])


def _clause(text: str):
    match = _CLAUSE.match(text)
    if not match:
        raise BadCondition(f"cannot read {text!r}: write FIELD OP VALUE, e.g. prompt_version < 2")
    name, op, raw = match.groups()
    column = FIELDS.get(name.lower())
    if column is None:
        raise BadCondition(f"unknown field {name!r}; fields: {', '.join(FIELDS)}")
    return _OPERATORS[op](column, _value(name, column, raw.strip()))


def _value(name: str, column, raw: str) -> Any:
    kind = column.type
    if isinstance(kind, Boolean):
        if raw.lower() not in ("true", "false"):
            raise BadCondition(f"{name} is true or false, not {raw!r}")
        return raw.lower() == "true"
    if isinstance(kind, Integer):
        if not re.fullmatch(r"-?\d+", raw):
            raise BadCondition(f"{name} is a whole number, not {raw!r}")
        return int(raw)
    if len(raw) >= 2 and raw[0] == raw[-1] and raw[0] in "'\"":
        raw = raw[1:-1]
    if not re.fullmatch(r"[\w./:@+-]*", raw):
        raise BadCondition(f"{name}: {raw!r} is not a plain value")
    return raw


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
