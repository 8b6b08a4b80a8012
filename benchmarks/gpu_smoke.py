"""GPU smoke check of the load paths and the decode paths, on the tiny model, on CUDA.

Run on a CUDA machine: python benchmarks/gpu_smoke.py [--out FILE.jsonl]. For each quant
(nf4 / fp16 / bf16), without and with a random LoRA adapter, it prints one JSON line:
- the engine's loop on captured CUDA graphs (`graph`) against the same loop eager
  (`loop`) and against HF `generate`, batched, under the report grammar;
- `graph` batched against `graph` one video at a time;
- `graph` with rows stopping at different lengths (so the batch is compacted into smaller
  buckets) against `loop` on the same lengths;
- `graph` with the fused prefill (PREFILL=fused, models.fused_prefill) against `graph`: the
  compiled kernels round differently in the last bit, so it counts the rows whose answer
  is the same rather than asking for all;
- `graph` with each opt-in decode attention (models.decode_attention: matmul, flex)
  against `graph` on SDPA, counted the same way.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


@dataclass
class _Frames:  # the part of video.media.SampledVideo the runner reads
    frames: list
    timestamps: list


def _texts(answers) -> list[str]:
    return [a.text for a in answers]


def _rows_equal(answers, reference) -> int:
    """How many rows' answers are the same as the reference's."""
    return sum(a == b for a, b in zip(_texts(answers), _texts(reference), strict=True))


def _run(loaded, generation: str, videos, *, constrained: bool, lengths=None, **knobs):
    from models.runner import ModelRunner, RunnerConfig, report_grammar
    from models.vision_attention import use_runs_attention

    config = RunnerConfig(generation=generation, **knobs)
    grammar = report_grammar(loaded) if constrained else None
    runner = ModelRunner(loaded, config, grammar=grammar)
    if runner.generation == "graph":
        use_runs_attention(loaded.model)  # as models.runner.build_runner does
    prepared = [runner.prepare(v) for v in videos]
    if lengths is not None:
        runner.answer_lengths = {id(p): n for p, n in zip(prepared, lengths, strict=True)}
    return runner, runner.generate(prepared)


def check(loaded, videos, quant: str, adapter: str) -> dict:
    import torch

    from models import decode_attention
    from models.decode_attention import use_decode_attention

    knobs = dict(max_new_tokens=16, batch_size=len(videos), first_pass_tokens=64)
    began = time.perf_counter()
    graph, graph_answers = _run(loaded, "graph", videos, constrained=True, **knobs)
    _, loop_answers = _run(loaded, "loop", videos, constrained=True, **knobs)
    _, generate_answers = _run(loaded, "generate", videos, constrained=True, **knobs)
    single = [_run(loaded, "graph", [v], constrained=True, **knobs)[1][0] for v in videos]
    lengths = [48, 5, 17, 2, 33, 9][: len(videos)]
    free = dict(max_new_tokens=48, min_new_tokens=48, batch_size=len(videos))
    short, short_graph = _run(loaded, "graph", videos, constrained=False, lengths=lengths, **free)
    _, short_loop = _run(loaded, "loop", videos, constrained=False, lengths=lengths, **free)
    fused, fused_answers = _run(loaded, "graph", videos, constrained=True, prefill="fused", **knobs)
    attentions = {}
    for choice in ("matmul", "flex"):
        use_decode_attention(loaded.model, choice)
        try:
            runner, answers = _run(loaded, "graph", videos, constrained=True, **knobs)
        finally:
            use_decode_attention(loaded.model, "sdpa")
        attentions[choice] = {
            "path": [t.path for t in runner.timings],
            "capture_failure": runner._loop.failure if runner._loop else None,
            "rows_equal_to_sdpa": _rows_equal(answers, graph_answers),
        }
    attentions["flex"]["failure"] = decode_attention.flex_fallback.failure
    four_bit = [n for n, m in loaded.model.named_modules() if type(m).__name__ == "Linear4bit"]
    return {
        "quant": quant,
        "adapter": adapter,
        "gpu": torch.cuda.get_device_name(0),
        "compute_dtype": str(loaded.compute_dtype),
        "linear4bit_modules": len(four_bit),
        "linear4bit_in_vision_or_lm_head": sum(
            ".visual." in n or n.endswith("lm_head") for n in four_bit
        ),
        "graph_path": [t.path for t in graph.timings],
        "capture_failure": graph._loop.failure if graph._loop else None,
        "tokens_out": [a.tokens_out for a in graph_answers],
        "graph_equals_loop": _texts(graph_answers) == _texts(loop_answers),
        "graph_equals_generate": _texts(graph_answers) == _texts(generate_answers),
        "batched_equals_single": _texts(graph_answers) == _texts(single),
        "stopping_rows": {
            "lengths": [a.tokens_out for a in short_graph],
            "buckets": short.timings[-1].buckets,
            "path": short.timings[-1].path,
            "graph_equals_loop": _texts(short_graph) == _texts(short_loop),
        },
        "fused_prefill": {
            "failure": fused._loop.prefill.failure if fused._loop else "no loop",
            "path": [t.path for t in fused.timings],
            "rows_equal_to_graph": _rows_equal(fused_answers, graph_answers),
            "rows": len(videos),
        },
        "decode_attention": attentions,
        "seconds": round(time.perf_counter() - began, 2),
        "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3),
    }


def _adapter(model_dir: Path, out: Path) -> Path:
    """A random LoRA adapter on the tiny model (B not zero, so it changes answers)."""
    import torch
    from peft import LoraConfig, get_peft_model

    from models.loader import load_model

    base = load_model(str(model_dir), quant="fp32", device="cpu").model
    torch.manual_seed(0)
    config = LoraConfig(r=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(base, config).save_pretrained(out)
    return out


def main() -> int:
    import torch

    from models.loader import load_model
    from models.tiny import build_tiny

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="also write the lines to this file")
    parser.add_argument("--quants", default="nf4,fp16,bf16")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        return 1
    rng = np.random.default_rng(0)
    videos = [
        _Frames(
            [rng.integers(0, 255, (360, 640, 3), dtype=np.uint8) for _ in range(n)],
            [0.5 * i for i in range(n)],
        )
        for n in (8, 6, 8, 3, 7, 8)
    ]
    lines = []
    with tempfile.TemporaryDirectory() as tmp:
        path = build_tiny(
            Path(tmp) / "model",
            hidden_size=256,
            intermediate_size=512,
            num_heads=4,
            num_kv_heads=2,
            head_dim=64,
            vision_hidden=128,
        )
        adapter = _adapter(path, Path(tmp) / "adapter")
        for quant in args.quants.split(","):
            for lora in (None, adapter):
                loaded = load_model(str(path), quant=quant, adapter=str(lora) if lora else None)
                line = check(loaded, videos, quant, "random LoRA r=8" if lora else "none")
                print(json.dumps(line), flush=True)
                lines.append(line)
                del loaded
                torch.cuda.empty_cache()
    if args.out:
        Path(args.out).write_text("".join(json.dumps(line) + "\n" for line in lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
