"""Held-out metrics of a model, measured by the describe engine itself.

`describe_metrics` runs the held-out rows' frames through `models.runner.ModelRunner`, the
very engine a describe worker runs (same prompt, same batching, the grammar when the
worker would use it), and compares each answer with the row's label: the schema-validity
rate, and how often `risk_factor` and each other enum field of the driving parameters
agree with the label. The job measures it before training (the fresh LoRA is the bare
base: its B matrices are zero) and after, beside the held-out loss.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from models.schema import DrivingParameters, parse_report

log = logging.getLogger(__name__)

# The fields compared with the label: every driving parameter (enums, lane count, the
# pedestrian flag); risk_factor is reported on its own too.
FIELDS = tuple(DrivingParameters.model_fields)


@dataclass
class _Frames:
    frames: Sequence[Any]
    timestamps: Sequence[float]


def describe_metrics(runner, rows, *, frame_max_side: int) -> dict[str, Any]:
    """Validity and field agreement of `runner`'s answers on `rows` (canonical rows)."""
    from training.collate import fit_frame

    videos, labels = [], []
    for row in rows:
        frames = [fit_frame(image, frame_max_side) for image in row["images"]]
        videos.append(_Frames(frames, list(row["timestamps"])))
        labels.append(json.loads(row["report"])["driving_parameters"])
    if not videos:
        return {"rows": 0}
    answers = runner.answer(videos)
    valid = 0
    agree = dict.fromkeys(FIELDS, 0)
    for video, answer, label in zip(videos, answers, labels, strict=True):
        parsed = parse_report(answer.text, frames=len(video.timestamps))
        if not parsed.valid:
            continue
        valid += 1
        params = parsed.report["driving_parameters"]
        for field in FIELDS:
            agree[field] += params[field] == label[field]
    n = len(videos)
    fields = {f: round(agree[f] / n, 4) for f in FIELDS}
    return {
        "rows": n,
        "constrained": runner.grammar is not None,
        "validity": round(valid / n, 4),
        "risk_factor_agreement": fields["risk_factor"],
        "field_agreement": round(sum(fields.values()) / len(FIELDS), 4),
        "fields": fields,
        "answer_tokens": round(sum(a.tokens_out for a in answers) / n, 1),
    }
