"""The report grammar: the answers a constrained model may write (`models.decoding` holds
it to them token by token).

The grammar (EBNF, compiled by xgrammar for the model's tokenizer) admits a strict subset
of the published report schema (`models.schema`):
- compact JSON with the keys in schema order;
- text is printable ASCII without quotes or backslashes, so every token inside the answer
  adds at least one character; each text is asked for in the prompt at up to its target
  length (SCENE_CHARS, ...: what training's answers are cut to) and bounded while decoding
  MARGIN_CHARS past it;
- enums, booleans and bounded integers spelled out, hazards bounded in number, and a
  hazard's frame index below the number of frames actually sampled.
`worst_case_tokens` is the length of the longest answer it admits, so the most tokens it
can take; the runner never stops a constrained answer before that many, so no answer is
cut off: every answer is valid schema v1 by construction, whatever the weights.

Why xgrammar, and not outlines or lm-format-enforcer: see benchmarks/grammar_compare.py.
(Its JSON-Schema front end ignores maxLength beside a pattern and fails on a bounded
pattern, hence the grammar written here.) Pure text and numbers: imports no xgrammar, so
the prompt (and the producer, which reads its version) need not.
"""

from __future__ import annotations

import json
import unicodedata
from typing import Any

from models import schema as s

# Each text's target length in characters: what the prompt asks for and training's answers
# are cut to (`answer_text`); while decoding, a text may run MARGIN_CHARS past it (see
# report_grammar). The published schema's are looser maxima for any producer.
SCENE_CHARS = 600
RISK_CHARS = 400
HAZARD_CHARS = 120
HAZARDS = 5
MARGIN_CHARS = 32
MAX_FRAMES = 64  # the most frames a video may be sampled at (FLEETSCRIBE_FRAMES)

# Printable ASCII except '"' (0x22) and '\\' (0x5c).
_CHAR = r"[ !#-\[\]-~]"


def report_grammar(frames: int) -> str:
    """The EBNF grammar of a report for a video of `frames` sampled frames."""

    def key(name: str, first: bool = False) -> str:
        return _lit(("" if first else ",") + json.dumps(name) + ":")

    params = " ".join(
        key(name, first=i == 0) + " " + _alternatives(field.annotation)
        for i, (name, field) in enumerate(s.DrivingParameters.model_fields.items())
    )
    hazard = " ".join(
        [
            _lit("{") + " " + key("kind", first=True),
            _alternatives(s.HazardKind),
            key("description"),
            f"text{HAZARD_CHARS}",
            key("frame"),
            _numbers(frames - 1),
            _lit("}"),
        ]
    )
    rules = {
        "root": " ".join(
            [
                _lit("{") + " " + key("schema_version", first=True),
                _lit(str(s.SCHEMA_VERSION)),
                key("scene_description"),
                f"text{SCENE_CHARS}",
                key("driving_parameters"),
                _lit("{") + " " + params + " " + _lit("}"),
                key("hazards"),
                f'("[]" | "[" hazard ("," hazard){{0,{HAZARDS - 1}}} "]")',
                key("risk_assessment"),
                f"text{RISK_CHARS}",
                _lit("}"),
            ]
        ),
        "hazard": hazard,
    }
    for n in sorted({SCENE_CHARS, RISK_CHARS, HAZARD_CHARS}):
        # The same language as `_CHAR{1,n + margin}`, the bound written as xgrammar's
        # character budget on the rule: a counted repetition's masks cost more the further
        # into the text (xgrammar issue 852). The budget costs nothing until a row comes
        # within a token's length of the bound; there, xgrammar checks every token longer
        # than the characters left one by one (30-150 ms a row for the real 151,643-token
        # vocabulary: one row holds up the batch's step). Hence the margin past the target:
        # a model that ends its texts by their targets, as training teaches, never comes
        # near the bound (benchmarks/grammar_host.py measures the three side by side).
        rules[f"text{n}"] = f'"\\"" chars{n} "\\""'
        rules[f"chars{n}[max_chars={n + MARGIN_CHARS}]"] = f"{_CHAR}+"
    return "\n".join(f"{name} ::= {body}" for name, body in rules.items()) + "\n"


def _lit(text: str) -> str:
    return json.dumps(text)  # a JSON string literal is a valid EBNF string literal


def _alternatives(annotation) -> str:
    if annotation is bool:
        return '("true" | "false")'
    if annotation is int:
        return _numbers(s.MAX_LANES)
    return "(" + " | ".join(_lit(json.dumps(m.value)) for m in annotation) + ")"


def _numbers(top: int) -> str:
    return "(" + " | ".join(f'"{n}"' for n in range(top + 1)) + ")"


def worst_case_tokens(frames: int) -> int:
    """The length of the longest compact JSON the decoding grammar admits: the most tokens a
    constrained answer can take (without the stop token)."""
    longest = {
        "schema_version": s.SCHEMA_VERSION,
        "scene_description": "x" * (SCENE_CHARS + MARGIN_CHARS),
        "driving_parameters": {
            name: _longest_value(field.annotation)
            for name, field in s.DrivingParameters.model_fields.items()
        },
        "hazards": [
            {
                "kind": _longest_value(s.HazardKind),
                "description": "x" * (HAZARD_CHARS + MARGIN_CHARS),
                "frame": frames - 1,
            }
        ]
        * HAZARDS,
        "risk_assessment": "x" * (RISK_CHARS + MARGIN_CHARS),
    }
    return len(json.dumps(longest, separators=(",", ":")))


def _longest_value(annotation) -> Any:
    if annotation is bool:
        return False  # "false" is longer than "true"
    if annotation is int:
        return s.MAX_LANES
    return max((m.value for m in annotation), key=len)


# Typographic punctuation NFKD leaves outside ASCII, spelled the way the grammar allows.
_PUNCT = str.maketrans(
    {"‘": "'", "’": "'", "“": "'", "”": "'", "–": "-", "—": "-", "−": "-", "•": "-"}
)


def answer_text(report: dict, frames: int) -> str:
    """The exact answer the grammar admits for a schema-v1 `report` of a `frames`-frame
    video: what training teaches the model to write. Text is made printable ASCII without
    '"' or '\\' and cut at a word boundary to its bound, hazards are cut to HAZARDS and a
    hazard's frame is held below `frames`. Raises ValueError for a report the grammar
    cannot express (an unknown enum value, a missing key)."""

    def text(value: Any, bound: int) -> str:
        value = unicodedata.normalize("NFKD", str(value).translate(_PUNCT))
        value = value.encode("ascii", "ignore").decode("ascii")
        value = value.replace('"', "'").replace("\\", "/")
        value = " ".join("".join(c if " " <= c <= "~" else " " for c in value).split())
        if len(value) > bound:
            cut = value.rfind(" ", 0, bound + 1)  # the space after the last whole word
            value = (value[:cut] if cut > 0 else value[:bound]).rstrip(" ,;:-")
        return value or "none"

    def frame(value: Any) -> Any:
        return min(value, frames - 1) if isinstance(value, int) else value

    params = report.get("driving_parameters") or {}
    answer = {
        "schema_version": report.get("schema_version"),
        "scene_description": text(report.get("scene_description", ""), SCENE_CHARS),
        "driving_parameters": {name: params.get(name) for name in s.DrivingParameters.model_fields},
        "hazards": [
            {
                "kind": hazard.get("kind"),
                "description": text(hazard.get("description", ""), HAZARD_CHARS),
                "frame": frame(hazard.get("frame")),
            }
            for hazard in (report.get("hazards") or [])[:HAZARDS]
        ],
        "risk_assessment": text(report.get("risk_assessment", ""), RISK_CHARS),
    }
    out = json.dumps(answer, separators=(",", ":"))
    parsed = s.parse_report(out, frames=frames)
    if not parsed.valid:
        raise ValueError(f"not a report the grammar admits: {parsed.error}")
    return out
