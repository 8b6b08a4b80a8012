"""The grammar's host work between two decode steps, side by side, one run: the report
grammar's text bounds three ways, each the same JSON around them:
- `counted`: each text `[...]{1,N}` at its target N characters (the grammar of the GPU runs);
- `max_chars`: xgrammar's character budget on the rule at N (be4f072);
- `margin`: the character budget MARGIN_CHARS (32) past N (now), so that a row ending its
  text by its target never comes near the bound;
and the engine's loop filling the next step's masks on its own thread (`fill_now`) against
handing the fill to the background thread and waiting for it; at the loop's batch size,
optionally with busy Python threads beside it (a worker's feeders hold the GIL in part).

    python benchmarks/grammar_host.py [--rows 128] [--steps 256] [--texts target] [--load 0,4]
        [--switch 5,0.5] [--grammars counted,max_chars,margin] [--out FILE]

Under the grammar, the next step's mask depends on this step's tokens: between the tokens
reaching the host and the mask being ready lie the matchers' accept and fill, which the
device hides only while they are shorter than a decode step (34 ms at 128 rows on the
H100). This measures that path on the CPU, with the report grammar compiled by xgrammar
for a vocabulary of the real model's size (151,643 tokens: bytes plus synthetic words,
spaces, digits, punctuation and CJK; no download). Each row's token is drawn at random
among those its mask allows, except how texts end (untimed):
- `--texts target` (default): a row ends each text (takes a token starting with a quote)
  once it has written a length drawn uniformly between `--short` x N and N characters for
  that text, as a model keeping to the prompt's targets does (trained on answers cut at a
  word boundary to N, it ends long texts just short of N);
- `--texts random`: with chance `--close` a step, wherever a quote is allowed (texts end
  after about 50 tokens, whatever their target).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.text_ends import SHORT, TextEnds
from models import grammar
from models.tiny import QWEN3_TOKENS, synthetic_vocab

VOCAB = QWEN3_TOKENS  # Qwen3's tokenizer without its added special tokens
STOP = "<|im_end|>"


def busy(stop: threading.Event) -> None:
    """Pure Python work that holds the GIL, as a feeder's preprocessing does in part."""
    while not stop.is_set():
        sum(i * i for i in range(2000))


_BUDGET = re.compile(r"^(chars(\d+))\[max_chars=\d+\] ::= (.*)\+$", re.M)


def as_was(grammar_text: str, how: str) -> str:
    """The report grammar with its text bounds written as they were: `counted` or
    `max_chars` at the target (see the module's docstring); `margin` as it is."""
    if how == "counted":
        return _BUDGET.sub(r"\1 ::= \3{1,\2}", grammar_text)
    if how == "max_chars":
        return _BUDGET.sub(r"\1[max_chars=\2] ::= \3+", grammar_text)
    return grammar_text


def run(masks, quotes, steps: int, fill_now: bool, load: int, ends, seed: int) -> dict:
    """Steps of a batch under the grammar: each row's token drawn at random among those its
    mask allows, or one starting with a quote where one is allowed and `ends` says the
    row's text is due to end (untimed); then the path from the tokens to the next step's
    masks (timed). `ends`: a TextEnds, or the chance a step that a row ends a text."""
    import torch

    rows = len(masks.matchers)
    quote = int(quotes[0])  # the bare quote (the first token that starts with one)
    generator = torch.Generator().manual_seed(seed)
    scores = torch.zeros(rows, masks.bitmask.shape[1] * 32)
    stop = threading.Event()
    threads = [threading.Thread(target=busy, args=(stop,), daemon=True) for _ in range(load)]
    for t in threads:
        t.start()
    paths = []
    try:
        masks(None, scores)  # the first step's masks: waits for their fill
        for _ in range(steps):
            logits = masks(None, torch.rand(scores.shape, generator=generator))  # masked
            tokens = logits.argmax(dim=-1)
            closing = logits[:, quotes].argmax(dim=-1)
            allowed = logits[:, quotes].amax(dim=-1) > float("-inf")
            if isinstance(ends, TextEnds):
                wanted = torch.tensor([ends.due(row) for row in range(rows)])
            else:
                wanted = torch.rand(rows, generator=generator) < ends
            tokens = torch.where(allowed & wanted, quotes[closing], tokens).tolist()
            if isinstance(ends, TextEnds):
                tokens = [quote if ends.opens(r) else t for r, t in enumerate(tokens)]
                ends.wrote(tokens)
            began = time.perf_counter()
            masks.accept(tokens, fill_now=fill_now)
            masks._next.result()  # the next step's masks are ready
            paths.append(time.perf_counter() - began)
    finally:
        stop.set()
        for t in threads:
            t.join()
    paths_ms = sorted(1000 * p for p in paths)
    return {
        "fill": "loop's thread (fill_now)" if fill_now else "background thread",
        "rows": rows,
        "load_threads": load,
        "steps": steps,
        "mean_ms": round(statistics.mean(paths_ms), 3),
        "p50_ms": round(paths_ms[len(paths_ms) // 2], 3),
        "p90_ms": round(paths_ms[int(len(paths_ms) * 0.9)], 3),
        "p99_ms": round(paths_ms[int(len(paths_ms) * 0.99)], 3),
        "max_ms": round(paths_ms[-1], 3),
        "steps_over_34ms": sum(p > 34 for p in paths_ms),
    }


COLUMNS = (
    "grammar",
    "fill",
    "load_threads",
    "switch_ms",
    "mean_ms",
    "p50_ms",
    "p90_ms",
    "p99_ms",
    "max_ms",
    "steps_over_34ms",
    "x_first",
)
GRAMMARS = {
    "counted": "counted at target",
    "max_chars": "max_chars at target",
    "margin": f"max_chars at target + {grammar.MARGIN_CHARS}",
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=128)
    parser.add_argument("--steps", type=int, default=256)
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--load", default="0", help="busy Python threads beside, e.g. 0,4")
    parser.add_argument(
        "--switch",
        default="",
        help="the interpreter's switch intervals to run under, in ms (sys.setswitchinterval; "
        "default: as it is, 5)",
    )
    parser.add_argument("--grammars", default="counted,max_chars,margin", help=", ".join(GRAMMARS))
    parser.add_argument("--fills", default="background,now", help="background, now or both")
    parser.add_argument("--texts", choices=("target", "random"), default="target")
    parser.add_argument(
        "--short", type=float, default=SHORT, help="--texts target: shortest text, x target"
    )
    parser.add_argument(
        "--close", type=float, default=0.02, help="--texts random: chance a row ends a text"
    )
    parser.add_argument("--out", default=None, help="write OUT.json and OUT.txt")
    args = parser.parse_args()

    import torch
    import xgrammar as xgr
    from rich.console import Console
    from rich.table import Table

    from models.decoding import GrammarMasks

    vocab = [*synthetic_vocab(VOCAB - 1), STOP.encode()]  # the stop token last
    info = xgr.TokenizerInfo(vocab, xgr.VocabType.RAW, stop_token_ids=[len(vocab) - 1])
    quotes = torch.tensor([i for i, t in enumerate(vocab) if t.startswith(b'"')])
    compiler = xgr.GrammarCompiler(info, max_threads=2, cache_enabled=False)
    batch = xgr.BatchGrammarMatcher()
    filler = ThreadPoolExecutor(1, thread_name_prefix="fleetscribe-grammar")
    text = grammar.report_grammar(args.frames)
    fills = [f == "now" for f in args.fills.split(",") if f]
    rows, compile_s = [], {}
    for how in [g for g in args.grammars.split(",") if g]:
        name = GRAMMARS[how]
        began = time.perf_counter()
        compiled = compiler.compile_grammar(as_was(text, how))
        compile_s[name] = round(time.perf_counter() - began, 2)
        for load, switch in itertools.product(
            [int(x) for x in args.load.split(",") if x],
            [float(x) for x in args.switch.split(",") if x] or [None],
        ):
            if switch is not None:
                sys.setswitchinterval(switch / 1000)
            for fill_now in fills:
                masks = GrammarMasks([compiled] * args.rows, batch, filler)
                # The same draws for every grammar: the same seed, the same text lengths.
                ends = args.close
                if args.texts == "target":
                    ends = TextEnds(vocab, args.rows, args.short, seed=load)
                row = run(masks, quotes, args.steps, fill_now, load, ends, seed=load)
                row.update(
                    grammar=name,
                    compile_s=compile_s[name],
                    switch_ms=round(sys.getswitchinterval() * 1000, 3),
                )
                first = next(
                    (
                        r
                        for r in rows
                        if (r["fill"], r["load_threads"], r["switch_ms"])
                        == (row["fill"], load, row["switch_ms"])
                    ),
                    None,
                )
                if first is not None:
                    row["x_first"] = round(first["mean_ms"] / row["mean_ms"], 2)
                rows.append(row)
                print(json.dumps(row), flush=True)

    texts = (
        f"texts end between {args.short} x and 1 x their target"
        if args.texts == "target"
        else f"texts end with chance {args.close} a step"
    )
    title = (
        f"grammar host path per decode step: {args.rows} rows, {args.steps} steps, vocabulary "
        f"{len(vocab):,}, {os.cpu_count()} cores, {texts}; compile s {compile_s}"
    )
    table = Table(title=title)
    for column in COLUMNS:
        table.add_column(column.replace("_", " "))
    for row in rows:
        table.add_row(*(str(row.get(c, "")) for c in COLUMNS))
    console = Console(width=170, record=True)
    console.print(table)
    if args.out:
        result = {"args": vars(args), "cores": os.cpu_count(), "vocab": len(vocab), "rows": rows}
        result["when"] = time.strftime("%Y-%m-%d %H:%M:%S")
        Path(args.out + ".json").write_text(json.dumps(result, indent=2) + "\n")
        Path(args.out + ".txt").write_text(console.export_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
