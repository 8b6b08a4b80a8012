"""The grammar's host work between two decode steps, side by side, one run: the report
grammar as it was (each text's bound a counted repetition, `[...]{1,600}`) against as it is
(the same language, the bound as xgrammar's character budget on the rule, `max_chars`), and
the engine's loop filling the next step's masks on its own thread (`fill_now`) against
handing the fill to the background thread and waiting for it; at the loop's batch size,
optionally with busy Python threads beside it (a worker's feeders hold the GIL in part).

    python benchmarks/grammar_host.py [--rows 128] [--steps 256] [--load 0,4] [--out FILE]

Under the grammar, the next step's mask depends on this step's tokens: between the tokens
reaching the host and the mask being ready lie the matchers' accept and fill, which the
device hides only while they are shorter than a decode step (34 ms at 128 rows on the
H100). This measures that path on the CPU, with the report grammar compiled by xgrammar
for a vocabulary of the real model's size (151,643 tokens: bytes plus synthetic words,
spaces, digits, punctuation and CJK; no download), tokens drawn at random among those each
row's mask allows, and with chance `--close` a step a token starting with a quote where one
is allowed (so texts close after about 50 tokens, as a model's descriptions might, rather
than run to their bounds as a random model's do).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

VOCAB = 151_643  # Qwen3's tokenizer without its added special tokens
STOP = "<|im_end|>"


def synthetic_vocab(size: int, seed: int = 0) -> list[bytes]:
    """Every byte, then made-up tokens shaped like a byte-level BPE's: words with and
    without a leading space, digit runs, JSON punctuation, CJK characters; the stop token
    last."""
    rng = random.Random(seed)
    letters = "etaoinshrdlcumwfgypbvkjxqz"
    weights = [12, 9, 8, 8, 7, 7, 6, 6, 6, 4, 4, 3, 3, 2, 2, 2, 2, 2, 2, 1, 1, 1, 1, 1, 1, 1]
    vocab = [bytes([b]) for b in range(256)]
    seen = set(vocab)
    punct = ['",', '":', '{"', '"}', '":"', '","', "],", "},", ": ", ", ", ". ", " (", ") "]
    for p in punct:
        seen.add(p.encode())
        vocab.append(p.encode())
    while len(vocab) < size - 1:
        kind = rng.random()
        if kind < 0.75:
            word = "".join(rng.choices(letters, weights, k=rng.randint(2, 10)))
            word = word.capitalize() if rng.random() < 0.15 else word
            token = (" " + word if rng.random() < 0.6 else word).encode()
        elif kind < 0.8:
            token = "".join(rng.choices("0123456789", k=rng.randint(1, 3))).encode()
        elif kind < 0.85:
            token = " " * rng.randint(2, 16) if rng.random() < 0.5 else "\n" * rng.randint(1, 3)
            token = token.encode()
        else:
            token = "".join(chr(rng.randint(0x4E00, 0x9FFF)) for _ in range(rng.randint(1, 2)))
            token = token.encode()
        if token not in seen:
            seen.add(token)
            vocab.append(token)
    return [*vocab, STOP.encode()]


def busy(stop: threading.Event) -> None:
    """Pure Python work that holds the GIL, as a feeder's preprocessing does in part."""
    while not stop.is_set():
        sum(i * i for i in range(2000))


def counted(grammar_text: str) -> str:
    """The report grammar as it was: each text's bound a counted repetition."""
    return re.sub(
        r"^(chars\d+)\[max_chars=(\d+)\] ::= (.*)\+$", r"\1 ::= \3{1,\2}", grammar_text, flags=re.M
    )


def run(masks, quotes, steps: int, fill_now: bool, load: int, close: float, seed: int) -> dict:
    """Steps of a batch under the grammar: each row's token drawn at random among those its
    mask allows, or with chance `close` one that starts with a quote where one is allowed
    (untimed), then the path from the tokens to the next step's masks (timed)."""
    import torch

    rows = len(masks.matchers)
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
            wanted = torch.rand(rows, generator=generator) < close
            tokens = torch.where(allowed & wanted, quotes[closing], tokens).tolist()
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
        "max_ms": round(paths_ms[-1], 3),
    }


COLUMNS = ("grammar", "fill", "load_threads", "mean_ms", "p50_ms", "p90_ms", "max_ms", "x_as_was")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=128)
    parser.add_argument("--steps", type=int, default=256)
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--load", default="0", help="busy Python threads beside, e.g. 0,4")
    parser.add_argument(
        "--close", type=float, default=0.02, help="chance a row takes a quote where it may"
    )
    parser.add_argument("--out", default=None, help="write OUT.json and OUT.txt")
    args = parser.parse_args()

    import torch
    import xgrammar as xgr
    from rich.console import Console
    from rich.table import Table

    from models.decoding import GrammarMasks
    from models.grammar import report_grammar

    vocab = synthetic_vocab(VOCAB)
    info = xgr.TokenizerInfo(vocab, xgr.VocabType.RAW, stop_token_ids=[len(vocab) - 1])
    quotes = torch.tensor([i for i, t in enumerate(vocab) if t.startswith(b'"')])
    compiler = xgr.GrammarCompiler(info, max_threads=2, cache_enabled=False)
    batch = xgr.BatchGrammarMatcher()
    filler = ThreadPoolExecutor(1, thread_name_prefix="fleetscribe-grammar")
    text = report_grammar(args.frames)
    texts = {"as was (counted)": counted(text), "as is (max_chars)": text}
    rows, compile_s = [], {}
    for name, text in texts.items():
        began = time.perf_counter()
        grammar = compiler.compile_grammar(text)
        compile_s[name] = round(time.perf_counter() - began, 2)
        for load in [int(x) for x in args.load.split(",") if x]:
            for fill_now in (False, True):
                masks = GrammarMasks([grammar] * args.rows, batch, filler)
                row = run(masks, quotes, args.steps, fill_now, load, args.close, seed=load)
                row.update(grammar=name, compile_s=compile_s[name])
                base = next(
                    (r for r in rows if (r["fill"], r["load_threads"]) == (row["fill"], load)),
                    None,
                )
                if base is not None:
                    row["x_as_was"] = round(base["mean_ms"] / row["mean_ms"], 2)
                rows.append(row)
                print(json.dumps(row), flush=True)

    title = (
        f"grammar host path per decode step: {args.rows} rows, {args.steps} steps, vocabulary "
        f"{len(vocab):,}, {os.cpu_count()} cores; compile s {compile_s}"
    )
    table = Table(title=title)
    for column in COLUMNS:
        table.add_column(column.replace("_", " "))
    for row in rows:
        table.add_row(*(str(row.get(c, "")) for c in COLUMNS))
    console = Console(width=150, record=True)
    console.print(table)
    if args.out:
        result = {"args": vars(args), "cores": os.cpu_count(), "vocab": len(vocab), "rows": rows}
        result["when"] = time.strftime("%Y-%m-%d %H:%M:%S")
        Path(args.out + ".json").write_text(json.dumps(result, indent=2) + "\n")
        Path(args.out + ".txt").write_text(console.export_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
