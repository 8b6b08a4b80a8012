"""Compare grammar libraries for report decoding: xgrammar, outlines, lm-format-enforcer.

    pip install --target /tmp/cmp outlines lm-format-enforcer   # not project dependencies
    PYTHONPATH=/tmp/cmp python benchmarks/grammar_compare.py [--videos 16] [--out FILE]

Each library gets the same JSON Schema (the report schema with the decoding bounds of
models/grammar.py as maxLength / maxItems / maximum) and the same tiny random model, whose
unconstrained output is noise, so every answer shows what the constraint alone enforces.
Printed per library: grammar compile time, generation time for the same videos in one
batch against the unconstrained run, and how many answers are valid reports that keep
the bounds. fleetscribe's own EBNF path (models/grammar.py, xgrammar) is the last row.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def bounded_schema(frames: int) -> dict:
    from models import grammar
    from models.schema import Report

    schema = copy.deepcopy(Report.model_json_schema())
    props = schema["properties"]
    props["scene_description"]["maxLength"] = grammar.SCENE_CHARS
    props["risk_assessment"]["maxLength"] = grammar.RISK_CHARS
    props["hazards"]["maxItems"] = grammar.HAZARDS
    hazard = schema["$defs"]["Hazard"]["properties"]
    hazard["description"]["maxLength"] = grammar.HAZARD_CHARS
    hazard["frame"]["maximum"] = frames - 1
    return schema


def keeps_bounds(report: dict) -> bool:
    from models import grammar

    return (
        len(report["scene_description"]) <= grammar.SCENE_CHARS
        and len(report["risk_assessment"]) <= grammar.RISK_CHARS
        and len(report["hazards"]) <= grammar.HAZARDS
        and all(len(h["description"]) <= grammar.HAZARD_CHARS for h in report["hazards"])
    )


def xgrammar_schema(loaded, schema, batch):
    import xgrammar as xgr
    from xgrammar.contrib.hf import LogitsProcessor

    info = xgr.TokenizerInfo.from_huggingface(
        loaded.processor.tokenizer, vocab_size=loaded.model.config.get_text_config().vocab_size
    )
    began = time.perf_counter()
    compiled = xgr.GrammarCompiler(info).compile_json_schema(
        json.dumps(schema), any_whitespace=False
    )
    compile_s = time.perf_counter() - began
    return compile_s, lambda: {"logits_processor": [LogitsProcessor([compiled] * batch)]}


def xgrammar_ebnf(loaded, schema, batch):
    from models.decoding import ReportGrammar

    began = time.perf_counter()
    grammar = ReportGrammar(
        loaded.processor.tokenizer, loaded.model.config.get_text_config().vocab_size
    )
    grammar.compiled(8)
    compile_s = time.perf_counter() - began
    return compile_s, lambda: grammar.generate_options([8] * batch)


def outlines_schema(loaded, schema, batch):
    import outlines
    from outlines.backends import get_json_schema_logits_processor

    model = outlines.from_transformers(loaded.model, loaded.processor.tokenizer)
    began = time.perf_counter()
    processor = get_json_schema_logits_processor("outlines_core", model, json.dumps(schema))
    compile_s = time.perf_counter() - began

    def fresh():
        processor.reset()
        return {"logits_processor": [processor]}

    return compile_s, fresh


def lmfe_schema(loaded, schema, batch):
    from lmformatenforcer import JsonSchemaParser
    from lmformatenforcer.integrations.transformers import (
        build_transformers_prefix_allowed_tokens_fn,
    )

    began = time.perf_counter()
    tokenizer = loaded.processor.tokenizer
    parser = JsonSchemaParser(schema)
    fn = build_transformers_prefix_allowed_tokens_fn(tokenizer, parser)
    compile_s = time.perf_counter() - began
    return compile_s, lambda: {"prefix_allowed_tokens_fn": fn}


LIBRARIES = {
    "xgrammar (JSON Schema)": xgrammar_schema,
    "outlines (outlines_core)": outlines_schema,
    "lm-format-enforcer": lmfe_schema,
    "fleetscribe EBNF (xgrammar)": xgrammar_ebnf,
}


def main() -> int:
    import torch

    from models.loader import load_model
    from models.prompt import build_messages
    from models.schema import parse_report
    from models.tiny import build_tiny

    parser = argparse.ArgumentParser()
    parser.add_argument("--videos", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=2400)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    model_dir = build_tiny(Path(tempfile.mkdtemp()) / "tiny")
    loaded = load_model(str(model_dir), quant="fp32")
    rng = np.random.default_rng(0)
    frames = [[rng.integers(0, 256, (64, 96, 3), dtype=np.uint8) for _ in range(8)]] * args.videos
    texts = [
        loaded.processor.apply_chat_template(
            build_messages([0.5 * i for i in range(8)]), tokenize=False, add_generation_prompt=True
        )
    ] * args.videos
    # Vary the prompts so rows differ: one random token per row in front of the answer.
    inputs = loaded.processor(
        text=[t + str(i) for i, t in enumerate(texts)],
        images=[f for v in frames for f in v],
        padding=True,
        return_tensors="pt",
    )
    prompt_len = inputs["input_ids"].shape[1]

    def generate(extra: dict, max_new: int):
        began = time.perf_counter()
        with torch.inference_mode():
            out = loaded.model.generate(**inputs, max_new_tokens=max_new, do_sample=False, **extra)
        return out[:, prompt_len:], time.perf_counter() - began

    rows = []
    for name, make in LIBRARIES.items():
        row = {"library": name}
        try:
            compile_s, fresh = make(loaded, bounded_schema(8), args.videos)
            new, seconds = generate(fresh(), args.max_new_tokens)
            steps = new.shape[1]
            _, plain_s = generate({}, steps)  # the same number of steps, unconstrained
            answers = [loaded.processor.tokenizer.decode(r, skip_special_tokens=True) for r in new]
            parsed = [parse_report(a, frames=8) for a in answers]
            row.update(
                compile_s=round(compile_s, 3),
                steps=steps,
                seconds=round(seconds, 2),
                unconstrained_s=round(plain_s, 2),
                overhead=round(seconds / plain_s - 1, 2),
                valid=sum(p.valid for p in parsed),
                within_bounds=sum(p.valid and keeps_bounds(p.report) for p in parsed),
                of=len(parsed),
                first_error=next((p.error for p in parsed if not p.valid), None),
                sample=answers[0][:90],
            )
        except Exception as e:  # a library that cannot do it is a result too
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
