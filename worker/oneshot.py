"""`python -m worker describe`: the describe pipeline in one process, for a few files."""

from __future__ import annotations

from typing import Any

from models.prompt import PROMPT_VERSION
from models.schema import SCHEMA_VERSION, parse_report
from worker.errors import VideoError
from worker.settings import Settings
from worker.video import SampledVideo, check_allowed, sample_frames


def describe_files(paths: list[str], settings: Settings, *, frames: int | None) -> list[dict]:
    """One result dict per path, in order: status done (with report) or failed (with reason)."""
    from worker.engine import Engine

    k = frames or settings.frames
    results: list[dict[str, Any]] = [{"path": p} for p in paths]
    sampled: list[tuple[int, SampledVideo]] = []
    for i, path in enumerate(paths):
        try:
            real = check_allowed(path, settings.video_roots)
            sampled.append((i, sample_frames(real, k, max_side=settings.frame_max_side)))
        except VideoError as e:
            results[i].update(status="failed", reason=str(e))
    if sampled:
        engine = Engine.from_settings(settings)
        answers = engine.describe([v for _, v in sampled])
        for (i, video), answer in zip(sampled, answers, strict=True):
            parsed = parse_report(answer.text, frames=len(video.timestamps))
            results[i].update(
                status="done",
                model=engine.model_id,
                adapter=engine.adapter,
                prompt_version=PROMPT_VERSION,
                schema_version=SCHEMA_VERSION,
                valid=parsed.valid,
                error=parsed.error,
                report=parsed.report,
                raw_text=None if parsed.valid else answer.text,
                frame_timestamps=video.timestamps,
                tokens_in=answer.tokens_in,
                tokens_out=answer.tokens_out,
                latency_s=round(answer.latency_s, 4),
            )
    return results


def render(results: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(header_style="bold")
    for col in ("path", "status", "valid", "risk", "detail"):
        table.add_column(col, overflow="fold")
    for r in results:
        if r["status"] != "done":
            table.add_row(r["path"], r["status"], "", "", r["reason"])
            continue
        report = r["report"] or {}
        risk = report.get("driving_parameters", {}).get("risk_factor", "")
        detail = report.get("scene_description") or r["error"] or ""
        table.add_row(r["path"], "done", str(r["valid"]).lower(), risk, detail[:200])
    Console().print(table)
