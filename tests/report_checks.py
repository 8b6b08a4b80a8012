"""Checks of a stored report against its own raw answer (tests import these).

The store derives `report`, `valid`, the flat filter columns and the hazard rows from the
parsed answer, so each is checked here against a fresh parse of `raw_text`, not against
another of the store's own fields.
"""

from __future__ import annotations

from sqlalchemy import select

from db.models import Hazard, Report
from models.schema import parse_report

# The Report row's filter columns (db/models.py), each a copy of one driving parameter.
FLAT_COLUMNS = (
    "risk_factor",
    "road_type",
    "weather",
    "visibility",
    "time_of_day",
    "traffic_density",
    "pedestrian_on_road",
)


def assert_valid_stored_report(session, report: Report) -> dict:
    """`report` is a valid report and every stored copy of it equals what its raw answer
    parses to: the JSON, the flat columns and the hazard rows (each with its frame's
    time). Returns the parsed report."""
    assert report.valid is True and report.error is None, (report.error, report.raw_text)
    parsed = parse_report(report.raw_text, frames=len(report.frame_timestamps))
    assert parsed.error is None, parsed.error
    assert report.report == parsed.report
    params = parsed.report["driving_parameters"]
    assert {c: getattr(report, c) for c in FLAT_COLUMNS} == {c: params[c] for c in FLAT_COLUMNS}
    rows = session.scalars(
        select(Hazard).where(Hazard.report_id == report.id).order_by(Hazard.id)
    ).all()
    stored = [(h.video_id, h.kind, h.description, h.frame, h.timestamp_s) for h in rows]
    expected = [
        (
            report.video_id,
            h["kind"],
            h["description"],
            h["frame"],
            report.frame_timestamps[h["frame"]],
        )
        for h in parsed.report["hazards"]
    ]
    assert stored == expected
    return parsed.report
