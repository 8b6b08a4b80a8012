"""GPU check of the training job itself: NF4 + fp16 (T4 arithmetic) through `run_job`, a
stop at a checkpoint and a resume from it, then the adapter on a 4-bit describe runner.

Run on a CUDA machine: python benchmarks/train_smoke.py [--out FILE.jsonl]. It checks:
- the job trains under NF4 with fp16 compute (the fp16 gradient scaler accepts the
  trainable weights: training.job.trainable_in_fp32) and records the base's quantisation;
- a run stopped early (as a warm shutdown stops it) and resumed from its checkpoint
  gives the losses of the steps after it that an uninterrupted run gives (the checkpoint holds the
  adapter, optimizer, scheduler, RNG and data position), and the same quantisation;
- the adapter loads on a 4-bit base through the describe loader and the runner under the
  grammar writes valid reports with it.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


class Hooks:
    def __init__(self, stop_at: int | None = None):
        self.stop_at = stop_at
        self.losses: dict[int, float] = {}
        self.quantization = None
        self.checkpoints: list[str] = []
        self.at = 0

    def started(self, *, split, skipped, quantization):
        self.quantization = quantization

    def step(self, progress):
        self.losses[progress.step] = progress.loss
        self.at = progress.step

    def checkpoint(self, path):
        self.checkpoints.append(path)

    def measured(self, stage, metrics):
        pass

    def stop_reason(self):
        from training.job import Stop

        return Stop.SHUTDOWN if self.stop_at and self.at >= self.stop_at else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None)
    parser.add_argument("--quant", default="nf4", help="fp32 with --compute float32: CPU")
    parser.add_argument("--compute", default="float16")
    args = parser.parse_args()

    from models.loader import load_model, prefer_expandable_segments

    prefer_expandable_segments()  # before the device query below starts CUDA
    import torch

    from models.runner import ModelRunner, RunnerConfig, report_grammar
    from models.schema import parse_report
    from models.tiny import build_tiny
    from training.data import generate_seed_dataset, prepare_dataset
    from training.job import JobSpec, run_job
    from training.recipe import resolve

    if args.quant == "nf4" and not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        return 1
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
    lines = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = build_tiny(
            tmp / "model", hidden_size=256, intermediate_size=512, num_heads=4,
            num_kv_heads=2, head_dim=64, vision_hidden=128,
        )  # fmt: skip
        data = generate_seed_dataset(tmp / "seed", rows=40, frames=4, seed=0)
        recipe = resolve("fleetscribe", max_steps=8, micro_batch=2, grad_accum=2,
                         save_steps=4, learning_rate=5e-3, eval_generate=False)  # fmt: skip

        def spec(name: str, resume: str | None = None) -> JobSpec:
            return JobSpec(
                name=name, base_model=str(model), dataset=str(data), recipe=recipe,
                run_dir=tmp / name, quant=args.quant, compute=args.compute, resume_from=resume,
                before={},
            )  # fmt: skip

        began = time.perf_counter()
        whole = Hooks()
        done = run_job(spec("whole"), whole)
        stopped = Hooks(stop_at=4)
        cut = run_job(spec("cut"), stopped)
        resumed = Hooks()
        again = run_job(spec("cut", resume=stopped.checkpoints[-1]), resumed)
        same = (
            all(
                abs(resumed.losses[s] - whole.losses[s]) <= 1e-3 * abs(whole.losses[s])
                for s in range(cut.step + 1, 9)
            )
            and min(resumed.losses) == cut.step + 1
        )
        lines.append(
            {
                "check": f"train, stop, resume ({args.quant}, {args.compute} compute)",
                "gpu": gpu,
                "whole": done.state,
                "cut": f"{cut.state} at step {cut.step}, {Path(stopped.checkpoints[-1]).name}",
                "resumed": f"{again.state} at step {again.step}",
                "loss_whole": {s: round(v, 5) for s, v in whole.losses.items()},
                "loss_resumed": {s: round(v, 5) for s, v in resumed.losses.items()},
                "resumed_steps_equal": same,
                "quantization": whole.quantization,
                "same_quantization": whole.quantization == resumed.quantization,
                "seconds": round(time.perf_counter() - began, 1),
            }
        )
        loaded = load_model(
            str(model), quant=args.quant, adapter=again.adapter_path, adapter_name="cut"
        )
        runner = ModelRunner(
            loaded, RunnerConfig(max_new_tokens=16, batch_size=4), grammar=report_grammar(loaded)
        )
        heldout = prepare_dataset(data, seed=0).heldout

        class _V:
            def __init__(self, row):
                self.frames = row["images"]
                self.timestamps = row["timestamps"]

        answers = runner.answer([_V(r) for r in heldout])
        valid = [parse_report(a.text, frames=4).valid for a in answers]
        lines.append(
            {
                "check": f"adapter on a {args.quant} describe runner, under the grammar",
                "adapter": loaded.adapter,
                "peft": type(loaded.model).__name__,
                "reports": len(valid),
                "valid": sum(valid),
            }
        )
    text = "\n".join(json.dumps(line) for line in lines) + "\n"
    print(text, end="")
    if args.out:
        Path(args.out).write_text(text)
    ok = lines[0]["resumed_steps_equal"] and lines[0]["same_quantization"] and all(valid)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
