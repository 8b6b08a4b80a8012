"""Reviewed reports become training data (`python -m training export --where COND OUT`).

The reports that match a condition (the `--where` language of db/conditions.py) and are
valid go out as a Hugging Face dataset in fleetscribe's training form, one row a report:
the frames, re-sampled from the video by the describe worker's sampler with as many frames
as the report has timestamps and its sampling mode (so frame i is the frame the report's
hazards call i), those
timestamps, the report's JSON and where it came from.

A video that cannot be read as it was described any more (moved, changed, outside the
allowed roots, its frames at other times) is skipped with its one-line reason, listed in
the result and in `OUT/export.json`; nothing is left out silently. The dataset is written
beside OUT and renamed into place, so an export that fails leaves no half dataset there.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy.orm import Session, sessionmaker

from config.errors import ExpectedError
from db.conditions import ReportRow, parse_where, reports_for_training
from db.session import session_scope
from models.schema import SCHEMA_VERSION, parse_report
from video.errors import VideoError
from video.media import SampledVideo
from video.processes import FrameSampler, sample_enqueued

log = logging.getLogger(__name__)

MANIFEST = "export.json"
_SAME_TIME_S = 1e-6  # timestamps are stored to the millisecond


class ExportError(ExpectedError):
    """The export cannot be written as asked (OUT not empty, nothing to export)."""


@dataclass
class ExportResult:
    """What an export wrote: `rows` rows into `out`; `skipped` (video id, reason) of the
    matching reports left out; `report_ids` of the rows, in row order."""

    rows: int
    skipped: list[tuple[int, str]]
    out: Path
    report_ids: list[int] = field(default_factory=list)


class _Unusable(Exception):
    """One report cannot become a row; its message is the one-line reason."""


def export(
    *,
    sessions: sessionmaker[Session],
    where_text: str,
    out: Path,
    max_side: int,
    roots: list[Path],
    sampler: FrameSampler | None = None,
) -> ExportResult:
    """Write the valid reports matching `where_text` as a training dataset at `out`.

    Frames are sampled with the long side at most `max_side`, from files inside `roots`
    (empty: anywhere) that still have the size they were enqueued with; through `sampler`'s
    killable processes when given, else in this process. Raises BadCondition for a
    condition it cannot read and ExportError when `out` is not empty or nothing matches."""
    out = Path(out)
    _check_out(out)
    where = parse_where(where_text)
    with session_scope(sessions) as session:
        found = reports_for_training(session=session, where=where)
    if not found:
        raise ExportError(f"no valid report matches {where_text!r}")
    log.info(
        "export: %d reports match %r; frames <= %d px, roots %s, to %s",
        len(found),
        where_text,
        max_side,
        [str(r) for r in roots] or "any",
        out,
    )

    sample = sampler.sample if sampler is not None else sample_enqueued
    sampled: dict[tuple[int, int, str], SampledVideo | str] = {}
    rows, used, skipped = [], [], []
    for report in found:
        try:
            rows.append(_row(report, sampled, sample, max_side=max_side, roots=roots))
            used.append(report.report_id)
        except _Unusable as e:
            if (report.video_id, str(e)) not in skipped:
                skipped.append((report.video_id, str(e)))
                log.warning("export: video %s skipped: %s", report.video_id, e)
    if not rows:
        vid, reason = skipped[0]
        more = f" (and {len(skipped) - 1} more skipped)" if len(skipped) > 1 else ""
        raise ExportError(
            f"none of the {len(found)} valid reports matching {where_text!r} can be exported:"
            f" video {vid}: {reason}{more}"
        )

    manifest = {
        "where": where_text,
        "rows": len(rows),
        "report_ids": used,
        "skipped": [{"video_id": vid, "reason": reason} for vid, reason in skipped],
        "max_side": max_side,
        "schema_version": SCHEMA_VERSION,
    }
    # datasets (and pyarrow) are imported here, not when the CLI starts
    from datasets import Dataset

    from training.data import FEATURES  # the canonical training row, seed data's too

    _write(Dataset.from_list(rows, features=FEATURES), manifest, out)
    log.info("export: %d rows written to %s, %d videos skipped", len(rows), out, len(skipped))
    return ExportResult(rows=len(rows), skipped=skipped, out=out, report_ids=used)


def _check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        raise ExportError(f"{out} exists and is not empty; export into a new directory")


def _row(
    report: ReportRow,
    sampled: dict[tuple[int, int, str], SampledVideo | str],
    sample: Callable[..., SampledVideo],
    *,
    max_side: int,
    roots: list[Path],
) -> dict:
    """One training row: the report checked against the schema, its video's frames."""
    want = report.frame_timestamps
    # Re-checked (the schema may be stricter now than when the report was stored), and
    # dumped in the schema's field order: PostgreSQL's JSONB gives its keys back in its own.
    parsed = parse_report(json.dumps(report.report), frames=len(want))
    if parsed.report is None:
        raise _Unusable(f"report {report.report_id} is no longer valid: {parsed.error}")
    key = (report.video_id, len(want), report.sampling)
    if key not in sampled:
        try:
            sampled[key] = sample(
                report.path,
                len(want),
                expected_bytes=report.video_bytes,
                roots=roots,
                max_side=max_side,
                sampling=report.sampling,
            )
        except VideoError as e:
            sampled[key] = str(e)
    video = sampled[key]
    if isinstance(video, str):
        raise _Unusable(video)
    got = video.timestamps
    if len(got) != len(want) or any(
        not math.isclose(a, b, abs_tol=_SAME_TIME_S) for a, b in zip(got, want, strict=False)
    ):
        raise _Unusable(
            f"its frames are no longer those of report {report.report_id}: sampled at "
            f"{_times(got)} s, the report has {_times(want)} s"
        )
    from PIL import Image

    return {
        "images": [Image.fromarray(frame) for frame in video.frames],
        "timestamps": list(want),
        "report": json.dumps(parsed.report),
        "source": f"video:{report.video_id}",
    }


def _times(times: list[float]) -> str:
    return "[" + ", ".join(f"{t:g}" for t in times) + "]"


def _write(dataset, manifest: dict, out: Path) -> None:
    """The dataset and its manifest, written beside `out` and renamed to it."""
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    try:
        dataset.save_to_disk(str(partial))
        (partial / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        if out.is_dir():
            out.rmdir()  # empty: checked before the export began
        partial.rename(out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
