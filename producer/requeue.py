"""Describe again the videos whose reports match a condition, e.g. an older prompt version.

`--where` is not SQL: it is a small condition language turned into a SQLAlchemy query,
`FIELD OP VALUE [and FIELD OP VALUE ...]` over the report columns below, so no statement
text reaches the database. Old reports stay: the new one has its own prompt version.
"""

from __future__ import annotations

import re
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


def matching(
    *, session: Session, where, model: str, adapter: str, prompt_version: int
) -> list[Match]:
    """Done videos with a report matching `where` and no report yet from the current prompt."""
    current = aliased(Report)
    has_current = exists().where(
        current.video_id == Video.id,
        current.model == model,
        current.adapter == adapter,
        current.prompt_version == prompt_version,
    )
    rows = session.execute(
        select(Video.id, Video.path, Report.prompt_version)
        .join(Report, Report.video_id == Video.id)
        .where(Video.state == VideoState.DONE, where, ~has_current)
        .order_by(Video.id, Report.prompt_version.desc())
    ).all()
    seen: dict[int, Match] = {}
    for video_id, path, version in rows:
        seen.setdefault(video_id, Match(video_id, path, version))
    return list(seen.values())


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
