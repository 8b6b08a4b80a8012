"""GPU smoke check of the load paths: the tiny model under nf4 / fp16 / bf16 on CUDA.

Run on a CUDA machine: python benchmarks/gpu_smoke.py. Prints one JSON line per quant.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from dataclasses import dataclass

import numpy as np


@dataclass
class _Frames:  # the part of video.media.SampledVideo the runner reads
    frames: list
    timestamps: list


def main() -> int:
    import torch

    from models.loader import load_model
    from models.runner import ModelRunner, RunnerConfig, report_grammar
    from models.tiny import build_tiny

    if not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        return 1
    rng = np.random.default_rng(0)
    videos = [
        _Frames(
            [rng.integers(0, 255, (360, 640, 3), dtype=np.uint8) for _ in range(n)],
            [0.5 * i for i in range(n)],
        )
        for n in (8, 6, 8)
    ]
    with tempfile.TemporaryDirectory() as tmp:
        path = build_tiny(
            tmp,
            hidden_size=256,
            intermediate_size=512,
            num_heads=4,
            num_kv_heads=2,
            head_dim=64,
            vision_hidden=128,
        )
        for quant in ("nf4", "fp16", "bf16"):
            began = time.perf_counter()
            loaded = load_model(str(path), quant=quant)
            runner = ModelRunner(
                loaded,
                RunnerConfig(max_new_tokens=16, batch_size=4),
                grammar=report_grammar(loaded),
            )
            batched = runner.answer(videos)
            single = [runner.answer([v])[0] for v in videos]
            four_bit = [
                n for n, m in loaded.model.named_modules() if type(m).__name__ == "Linear4bit"
            ]
            print(
                json.dumps(
                    {
                        "quant": quant,
                        "gpu": torch.cuda.get_device_name(0),
                        "compute_dtype": str(loaded.compute_dtype),
                        "linear4bit_modules": len(four_bit),
                        "linear4bit_in_vision_or_lm_head": sum(
                            ".visual." in n or n.endswith("lm_head") for n in four_bit
                        ),
                        "tokens_out": [a.tokens_out for a in batched],
                        "batched_equals_single": [a.text for a in batched]
                        == [a.text for a in single],
                        "seconds": round(time.perf_counter() - began, 2),
                        "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3),
                    }
                )
            )
            del runner, loaded
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
