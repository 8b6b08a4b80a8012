"""The `--where` condition language, and the reads that select reports by it.

`--where` is not SQL: `FIELD OP VALUE [and FIELD OP VALUE ...]` over the report columns in
FIELDS is turned into a SQLAlchemy condition on `Report`, so no statement text reaches the
database. `producer requeue` picks videos to describe again with it, `training export` the
reviewed reports that become training data.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Boolean, Integer, and_, select
from sqlalchemy.orm import Session

from db.errors import BadCondition
from db.models import Report, Video
from db.store import FLAT_FIELDS

__all__ = ["FIELDS", "BadCondition", "ReportRow", "parse_where", "reports_for_training"]

_NAMES = ("prompt_version", "schema_version", "model", "adapter", "valid", *FLAT_FIELDS)
FIELDS = {
    name: getattr(Report, name) for name in (*_NAMES, "tokens_out", "sampling", "event_frames")
}
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


@dataclass(frozen=True)
class ReportRow:
    """One stored report with what re-reading its video needs."""

    report_id: int
    video_id: int
    path: str
    report: dict[str, Any] | None  # None only for an invalid report (valid_only=False)
    frame_timestamps: list[float]
    video_bytes: int | None  # the size when enqueued: a file of another size has changed
    model: str
    adapter: str
    prompt_version: int
    sampling: str  # how its frames were to be chosen: re-sampled the same way


def reports_for_training(*, session: Session, where, valid_only: bool = True) -> list[ReportRow]:
    """The reports matching `where` (from `parse_where`), only valid ones unless
    `valid_only` is False, each with its video's path and size; in report id order."""
    query = (
        select(
            Report.id,
            Video.id,
            Video.path,
            Report.report,
            Report.frame_timestamps,
            Video.bytes,
            Report.model,
            Report.adapter,
            Report.prompt_version,
            Report.sampling,
        )
        .join(Video, Video.id == Report.video_id)
        .where(where)
        .order_by(Report.id)
    )
    if valid_only:
        query = query.where(Report.valid.is_(True))
    return [
        ReportRow(
            report_id=report_id,
            video_id=video_id,
            path=path,
            report=report,
            frame_timestamps=[float(t) for t in timestamps or []],
            video_bytes=size,
            model=model,
            adapter=adapter,
            prompt_version=version,
            sampling=sampling,
        )
        for (
            report_id,
            video_id,
            path,
            report,
            timestamps,
            size,
            model,
            adapter,
            version,
            sampling,
        ) in session.execute(query)
    ]
