"""Schema-constrained decoding: the model can only write a valid report.

The grammar (EBNF, compiled by xgrammar for the model's tokenizer) admits a strict subset
of the published report schema (`models.schema`):
- compact JSON with the keys in schema order;
- text is printable ASCII without quotes or backslashes, with a length bound, so every
  token inside the answer adds at least one character;
- enums, booleans and bounded integers spelled out, hazards bounded in number, and a
  hazard's frame index below the number of frames actually sampled.
`worst_case_chars` is the length of the longest answer it admits; the engine never stops a
constrained answer before that many tokens, so no answer is cut off: every answer is
valid schema v1 by construction, whatever the weights.

Why xgrammar, and not outlines or lm-format-enforcer: see benchmarks/grammar_compare.py.
(Its JSON-Schema front end ignores maxLength beside a pattern and fails on a bounded
pattern, hence the grammar written here.)
"""

from __future__ import annotations

import json
import threading
from functools import lru_cache
from typing import Any

from models import schema as s

# Bounds while decoding (the published schema's are looser maxima for any producer).
SCENE_CHARS = 600
RISK_CHARS = 400
HAZARD_CHARS = 120
HAZARDS = 5
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
        rules[f"text{n}"] = f'"\\"" {_CHAR}{{1,{n}}} "\\""'
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


def worst_case_chars(frames: int) -> int:
    """Length of the longest compact JSON the decoding schema admits (tokens, at most)."""
    longest = {
        "schema_version": s.SCHEMA_VERSION,
        "scene_description": "x" * SCENE_CHARS,
        "driving_parameters": {
            name: _longest_value(field.annotation)
            for name, field in s.DrivingParameters.model_fields.items()
        },
        "hazards": [
            {
                "kind": _longest_value(s.HazardKind),
                "description": "x" * HAZARD_CHARS,
                "frame": frames - 1,
            }
        ]
        * HAZARDS,
        "risk_assessment": "x" * RISK_CHARS,
    }
    return len(json.dumps(longest, separators=(",", ":")))


def _longest_value(annotation) -> Any:
    if annotation is bool:
        return False  # "false" is longer than "true"
    if annotation is int:
        return s.MAX_LANES
    return max((m.value for m in annotation), key=len)


class ReportGrammar:
    """Compiles the report grammar once per frame count for one tokenizer."""

    def __init__(self, tokenizer, vocab_size: int):
        import xgrammar as xgr

        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size)
        self._compiler = xgr.GrammarCompiler(info, max_threads=2)
        self._lock = threading.Lock()
        self._batch = None  # xgrammar's thread pool for whole-batch masks, made on first use
        self._filler = None  # the one background thread that fills the next step's masks

    def compiled(self, frames: int):
        with self._lock:
            return self._compile(frames)

    @lru_cache(maxsize=64)  # noqa: B019 - one instance per loaded model, kept for its life
    def _compile(self, frames: int):
        return self._compiler.compile_grammar(report_grammar(frames))

    def generate_options(self, frames_per_row: list[int]) -> dict[str, list]:
        """`generate` arguments for one batch: a fresh mask per row, fresh matchers."""
        if self._batch is None:
            from concurrent.futures import ThreadPoolExecutor

            import xgrammar as xgr

            self._batch = xgr.BatchGrammarMatcher()
            self._filler = ThreadPoolExecutor(1, thread_name_prefix="fleetscribe-grammar")
        masks = GrammarMasks([self.compiled(k) for k in frames_per_row], self._batch, self._filler)
        return {"logits_processor": [masks], "stopping_criteria": [masks.after_step]}


class GrammarMasks:
    """Masks every row of a batch to its grammar, with the mask work off the decode path.

    The mask for step t depends only on the tokens before it, so it is computed while the
    model runs step t: `after_step` (a stopping criterion, called by `generate` right after
    each step's tokens are chosen) hands the new tokens to the rows' matchers and starts
    filling the next masks on a background thread (xgrammar releases the GIL and fills the
    rows on its own C++ threads); the logits processor (`__call__`) then only waits for
    that, copies the mask to the device and applies it. xgrammar's own HF processor
    (xgrammar.contrib.hf) does all of it in line, one row at a time, with one device sync
    per row per step."""

    def __init__(self, grammars: list, batch_matcher, filler):
        import xgrammar as xgr

        self._xgr = xgr
        self._batch = batch_matcher
        self._filler = filler
        self.matchers = [xgr.GrammarMatcher(g) for g in grammars]
        vocab = grammars[0].tokenizer_info.vocab_size
        self.bitmask = xgr.allocate_token_bitmask(len(grammars), vocab)
        self._next = None  # the Future of the next step's masks
        self.after_step = _AfterStep(self)

    def _fill(self) -> None:
        live = [i for i, m in enumerate(self.matchers) if not m.is_terminated()]
        if live:
            self._batch.batch_fill_next_token_bitmask(
                [self.matchers[i] for i in live], self.bitmask, live
            )

    def accept(self, tokens: list[int]) -> None:
        """The tokens just chosen, one per row; starts filling the next step's masks."""
        live = [i for i, m in enumerate(self.matchers) if not m.is_terminated()]
        accepted = self._xgr.BatchGrammarMatcher.batch_accept_token(
            [self.matchers[i] for i in live], [tokens[i] for i in live]
        )
        if not all(accepted):
            raise RuntimeError("a token outside the grammar was chosen")
        self._next = self._filler.submit(self._fill)

    def __call__(self, input_ids, scores):
        if self._next is None:  # the first step: nothing to overlap with
            # Still on the filler thread: one thread ever drives the batch matcher, also
            # while a finished batch's last (unused) fill runs out.
            self._next = self._filler.submit(self._fill)
        self._next.result()
        # A plain (synchronous) copy: the mask buffer is refilled as soon as this returns.
        self._xgr.apply_token_bitmask_inplace(scores, self.bitmask.to(scores.device))
        return scores


class _AfterStep:
    """The stopping-criterion side of GrammarMasks: never stops a row, only observes."""

    def __init__(self, masks: GrammarMasks):
        self.masks = masks

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        self.masks.accept(input_ids[:, -1].tolist())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
