"""Training throughput: the seed's recipe as its notebook runs it against fleetscribe's job,
side by side, one run, at T4 settings.

    python benchmarks/train_bench.py --out benchmarks/results/train_h200

It builds a random model with Qwen3-VL-4B's published shape (benchmarks/shapes/, no
download) and a training set of 8 frames of 640x360 and about 256 answer tokens a sample,
then trains each row in its own process (a clean memory peak, the same 15 GiB cap set with
torch.cuda.set_per_process_memory_fraction, fp16 compute: a T4 has no bf16):

- seed: the `seed-notebook` recipe as the notebook runs it: SFTTrainer's defaults plus a
  PEFT LoraConfig (rank 32, alpha 32, all linear layers), BitsAndBytesConfig NF4 with
  double quantisation, 8-bit AdamW, micro-batch 2 x 8 accumulation, gradient
  checkpointing, TRL's own collator on seed-format rows. One change, or it cannot run
  under fp16 at all: TRL puts a quantised model's LoRA weights in bf16, the fp16 gradient
  scaler refuses them, so they are cast to fp32 after the trainer is built (what
  fleetscribe's job does: training.job.trainable_in_fp32).
- job (seed LoRA): fleetscribe's job (training.job.build_trainer: the describe worker's
  loader, collator and prompt) with the same LoRA configuration and effective batch, so
  the ratio measures the job, not a smaller adapter.
- job (fleetscribe): the default preset (rank 16 on the language model's attention).

Each row runs --warmup optimizer steps, then --steps timed ones, and prints samples/s,
seconds per optimizer step, peak GPU memory, and the projected T4 hours for an epoch of
10,000 samples (H200 time x the fp16 tensor-core peak ratio: on paper, not measured).

On a CPU (a smoke run of the same code): --shape small --compute float32 --cap 0.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# fp16 dense tensor-core peaks (TFLOPS): T4 65, H200 989; an H100 SXM is 989 too.
T4_SLOWDOWN = {"H200": 989 / 65, "H100": 989 / 65, "A100": 312 / 65}
EPOCH_SAMPLES = 10_000
ROWS = ("seed", "job-seed-lora", "job-fleetscribe")
_T0 = time.perf_counter()


def log(message: str) -> None:
    print(f"[{time.perf_counter() - _T0:6.0f} s] {message}", flush=True)


# -- setup (parent process) -----------------------------------------------------------------


def build_model(folder: Path, shape: str, device: str) -> Path:
    from models.tiny import build_from_shape, build_tiny

    if (folder / "config.json").exists():
        return folder
    if shape == "small":
        return build_tiny(folder, max_frame_pixels=16_777_216)
    return build_from_shape(folder, shape, dtype="bfloat16", device=device)


def _report(rng, tokenizer, frames: int, answer_tokens: int) -> dict:
    """A schema-v1 report whose grammar-shaped answer is about `answer_tokens` long."""
    from models.grammar import answer_text

    words = [
        "car",
        "truck",
        "lane",
        "signal",
        "pedestrian",
        "crossing",
        "brake",
        "merge",
        "wet",
        "road",
        "left",
        "right",
    ]

    def text(n: int) -> str:
        return " ".join(rng.choice(words) for _ in range(n))

    report = {
        "schema_version": 1,
        "scene_description": text(120),
        "driving_parameters": {
            "road_type": "urban",
            "lane_count": 3,
            "ego_lane_position": "middle",
            "traffic_light_state": "green",
            "pedestrian_on_road": False,
            "closest_vehicle_distance": "near",
            "ego_vehicle_speed": "moderate",
            "road_curvature": "straight",
            "weather": "clear",
            "visibility": "good",
            "time_of_day": "day",
            "traffic_density": "moderate",
            "risk_factor": "medium",
        },
        "hazards": [{"kind": "vehicle", "description": text(8), "frame": frames - 1}],
        "risk_assessment": text(80),
    }
    # trim the two long texts until the answer is about the target length
    for _ in range(200):
        n = len(tokenizer(answer_text(report, frames), add_special_tokens=False)["input_ids"])
        if n <= answer_tokens:
            break
        for key in ("scene_description", "risk_assessment"):
            report[key] = " ".join(report[key].split()[:-1])
    return report


def build_data(folder: Path, model_dir: Path, rows: int, frames: int, answer_tokens: int):
    """The same samples in two forms: fleetscribe's canonical rows and the seed's format."""
    import random

    import datasets
    import numpy as np
    from PIL import Image
    from transformers import AutoTokenizer

    from models.grammar import answer_text
    from models.prompt import instruction
    from training.data import FEATURES

    canonical, seed_dir = folder / "canonical", folder / "seed"
    if canonical.exists() and seed_dir.exists():
        return canonical, seed_dir
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rng = random.Random(0)
    noise = np.random.default_rng(0)
    fleet, seed = [], []
    for i in range(rows):
        base = noise.integers(0, 255, size=(360, 640, 3), dtype=np.uint8)
        images = [Image.fromarray(np.roll(base, 16 * f, axis=1)) for f in range(frames)]
        report = _report(rng, tokenizer, frames, answer_tokens)
        times = [0.5 + f for f in range(frames)]
        fleet.append(
            {
                "images": images,
                "timestamps": times,
                "report": json.dumps(report),
                "source": f"bench:{i}",
            }
        )
        seed.append(
            {
                "images": images,
                "prompt": [{"role": "user", "content": instruction(frames)}],
                "completion": [{"role": "assistant", "content": answer_text(report, frames)}],
            }
        )
    datasets.Dataset.from_list(fleet, features=FEATURES).save_to_disk(str(canonical))
    datasets.Dataset.from_list(seed).save_to_disk(str(seed_dir))
    return canonical, seed_dir


# -- one row (child process) ----------------------------------------------------------------


def _step_timer():
    import torch
    from transformers import TrainerCallback

    class Timer(TrainerCallback):
        def __init__(self):
            self.times: list[float] = []
            self.peak = 0
            self._last = None

        def on_step_begin(self, args, state, control, **kwargs):
            if self._last is None:
                torch.cuda.synchronize() if torch.cuda.is_available() else None
                self._last = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            now = time.perf_counter()
            self.times.append(now - self._last)
            self._last = now
            if torch.cuda.is_available():
                self.peak = max(self.peak, torch.cuda.max_memory_allocated())

    return Timer()


def parse_row(spec: str) -> tuple[str, int | None, bool]:
    """A --rows entry: NAME[:MICRO_BATCH][+offload], e.g. job-seed-lora:8+offload."""
    offload = spec.endswith("+offload")
    name, _, micro = spec.removesuffix("+offload").partition(":")
    if name not in ROWS:
        raise SystemExit(f"unknown row {name!r}; rows: {', '.join(ROWS)}")
    return name, int(micro) if micro else None, offload


def run_row(spec: str, args) -> dict:
    import multiprocessing

    import torch

    from models.memory import apply_memory_cap

    multiprocessing.set_start_method("spawn", force=True)
    name, micro, offload = parse_row(spec)
    args.job_micro_batch = micro or args.job_micro_batch
    args.job_offload = offload or args.job_offload
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, args.compute)
    steps = args.warmup + args.steps
    timer = _step_timer()
    began = time.perf_counter()
    apply_memory_cap(device, args.cap)  # before the model: everything counts against it
    if name == "seed":
        trainer, note = _seed_trainer(args, device, dtype, steps, timer)
    else:
        trainer, note = _job_trainer(name, args, device, dtype, steps, timer)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    setup_s = time.perf_counter() - began
    trainer.train()
    timed = timer.times[args.warmup :]
    step_s = sum(timed) / len(timed)
    samples = trainer.args.per_device_train_batch_size * trainer.args.gradient_accumulation_steps
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    row = {
        "row": spec,
        "note": note,
        "micro_batch": trainer.args.per_device_train_batch_size,
        "grad_accum": trainer.args.gradient_accumulation_steps,
        "effective_batch": samples,
        "trainable_params_m": round(trainable / 1e6, 2),
        "s_per_step": round(step_s, 3),
        "step_times_s": [round(t, 3) for t in timer.times],
        "samples_per_s": round(samples / step_s, 3),
        "peak_gib": round(timer.peak / 2**30, 2),
        "setup_s": round(setup_s, 1),
    }
    return row


def _seed_trainer(args, device: str, dtype, steps: int, timer):
    """The notebook's way: transformers + BitsAndBytesConfig, SFTTrainer defaults + PEFT."""
    import datasets
    import torch
    from peft import LoraConfig
    from transformers import AutoProcessor, BitsAndBytesConfig, Qwen3VLForConditionalGeneration
    from trl import SFTConfig, SFTTrainer

    from training.job import trainable_in_fp32

    kwargs = {"dtype": dtype}
    if device == "cuda":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
        )
        kwargs["device_map"] = {"": 0}
    model = Qwen3VLForConditionalGeneration.from_pretrained(args.model, **kwargs)
    processor = AutoProcessor.from_pretrained(args.model)
    data = datasets.load_from_disk(str(args.seed_data))
    # TRL's default max_length (1024) cuts a multi-image prompt and the forward fails with
    # "Image features and image tokens do not match": set it from the real length instead.
    max_length = _longest(processor, data) + 8
    config = SFTConfig(
        output_dir=str(args.work / "seed-out"),
        per_device_train_batch_size=2,
        gradient_accumulation_steps=8,
        learning_rate=2e-4,
        optim="adamw_8bit" if device == "cuda" else "adamw_torch",
        max_steps=steps,
        max_length=max_length,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        use_cpu=device == "cpu",
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
    )
    peft = LoraConfig(
        r=32, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM"
    )
    trainer = SFTTrainer(
        model=model,
        args=config,
        train_dataset=data,
        processing_class=processor,
        peft_config=peft,
        callbacks=[timer],
    )
    cast = trainable_in_fp32(trainer.model) if dtype == torch.float16 else 0
    note = f"max_length {max_length} (from the data); {cast} LoRA tensors cast bf16->fp32 for fp16"
    return trainer, note


def _longest(processor, data) -> int:
    from trl.data_utils import apply_chat_template, prepare_multimodal_messages

    longest = 0
    for row in data.select(range(min(4, len(data)))):
        example = {
            "prompt": prepare_multimodal_messages(row["prompt"], images=row["images"]),
            "completion": prepare_multimodal_messages(row["completion"]),
        }
        text = apply_chat_template(example, processor)
        prompt = processor(images=row["images"], text=[text["prompt"]], return_tensors="pt")
        answer = processor.tokenizer(text["completion"], add_special_tokens=False)["input_ids"]
        longest = max(longest, prompt["input_ids"].shape[1] + len(answer))
    return longest


def _job_trainer(name: str, args, device: str, dtype, steps: int, timer):
    """fleetscribe's job: the describe worker's loader, the job's trainer and collator."""
    import datasets

    from models.loader import load_model
    from training.job import build_trainer
    from training.recipe import resolve

    preset = "seed-notebook" if name == "job-seed-lora" else "fleetscribe"
    micro = args.job_micro_batch
    recipe = resolve(
        preset,
        micro_batch=micro,
        grad_accum=16 // micro,
        max_steps=steps,
        save_steps=10_000,
        optimizer=None if device == "cuda" else "adamw_torch",
        activation_offloading=args.job_offload or None,
        eval_generate=False,
    )
    quant = "nf4" if device == "cuda" else "fp32"
    loaded = load_model(str(args.model), quant=quant, compute=args.compute)
    train = datasets.load_from_disk(str(args.data))
    trainer = build_trainer(
        loaded,
        recipe,
        train,
        train.select([]),
        output_dir=args.work / f"{name}-out",
        callbacks=[timer],
    )
    shown = {"lora_rank", "target_modules", "optimizer", "activation_offloading"}
    return trainer, f"preset {preset}: {recipe.model_dump_json(include=shown)}"


# -- table ---------------------------------------------------------------------------------


def table(rows: list[dict], gpu: str) -> str:
    slowdown = next((v for k, v in T4_SLOWDOWN.items() if k in gpu), None)
    seed = next((r for r in rows if r["row"] == "seed" and "error" not in r), None)
    width = max([18] + [len(r["row"]) for r in rows])
    lines = [
        f"QLoRA SFT, Qwen3-VL-4B shape, 8 frames 640x360, ~256 answer tokens, on {gpu}",
        f"{'row':{width}} {'micro x accum':>13} {'trainable M':>11} {'s/step':>8} "
        f"{'samples/s':>9} {'x seed':>7} {'peak GiB':>8} {'T4 h/10k':>9}",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['row']:{width}} failed: {r['error']}")
            continue
        ratio = r["samples_per_s"] / seed["samples_per_s"] if seed else float("nan")
        hours = EPOCH_SAMPLES / r["samples_per_s"] / 3600
        t4 = f"{hours * slowdown:9.1f}" if slowdown else f"{'-':>9}"
        lines.append(
            f"{r['row']:{width}} {r['micro_batch']:>6} x {r['grad_accum']:<4} "
            f"{r['trainable_params_m']:>11} {r['s_per_step']:>8.2f} {r['samples_per_s']:>9.3f} "
            f"{ratio:>7.2f} {r['peak_gib']:>8.2f} {t4}"
        )
    if slowdown:
        lines.append(
            f"T4 h/10k: {EPOCH_SAMPLES} samples at this GPU's rate x {slowdown:.1f} (fp16 "
            "tensor-core peak ratio to a T4): a projection on paper, not a T4 measurement"
        )
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default=str(ROOT / "benchmarks/shapes/qwen3-vl-4b.json"))
    parser.add_argument("--compute", default="float16", help="float16: a T4's arithmetic")
    parser.add_argument("--cap", type=float, default=15.0, help="GPU memory cap, GiB (0: none)")
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--answer-tokens", type=int, default=256)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--job-micro-batch", type=int, default=8)
    parser.add_argument("--job-offload", action="store_true", help="job rows: offload activations")
    parser.add_argument("--rows", default=",".join(ROWS))
    parser.add_argument("--work", default=None)
    parser.add_argument("--out", default=None, help="write OUT.json and OUT.txt")
    parser.add_argument("--row", default=None, help=argparse.SUPPRESS)  # a child's one row
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Every row with the allocator setting fleetscribe's loader asks for, set before CUDA
    # starts (the memory cap starts it): freed blocks merge instead of fragmenting.
    from models.loader import prefer_expandable_segments

    prefer_expandable_segments()
    args.work = Path(args.work or tempfile.mkdtemp(prefix="fs-train-bench-")).resolve()
    args.model = args.work / "model"
    args.data, args.seed_data = args.work / "data" / "canonical", args.work / "data" / "seed"
    if args.row:
        print("ROW " + json.dumps(run_row(args.row, args)), flush=True)
        return 0

    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
    device = "cuda" if torch.cuda.is_available() else "cpu"
    build_model(args.model, args.shape, device)
    samples = (args.warmup + args.steps) * 16
    build_data(args.work / "data", args.model, samples, args.frames, args.answer_tokens)
    log(f"model and {samples} samples ready in {args.work}")
    rows: list[dict] = []
    for name in args.rows.split(","):
        parse_row(name)
        cmd = [sys.executable, __file__, "--row", name, "--work", str(args.work)]
        for flag in ("compute", "cap", "frames", "warmup", "steps", "job_micro_batch"):
            cmd += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
        cmd += ["--job-offload"] if args.job_offload else []
        log(f"row {name}")
        out = subprocess.run(cmd, capture_output=True, text=True)
        found = [line[4:] for line in out.stdout.splitlines() if line.startswith("ROW ")]
        if out.returncode != 0 or not found:
            tail = (out.stderr or out.stdout).strip().splitlines()[-12:]
            print("\n".join(tail), flush=True)
            rows.append({"row": name, "error": tail[-1] if tail else f"exit {out.returncode}"})
        else:
            rows.append(json.loads(found[-1]))
            log(f"row {name}: {rows[-1]}")
        text = table(rows, gpu)
        print(text, flush=True)
        if args.out:
            result = {"gpu": gpu, "torch": torch.__version__, "rows": rows}
            result["args"] = {k: str(v) for k, v in vars(args).items()}
            result["when"] = time.strftime("%Y-%m-%d %H:%M:%S")
            Path(args.out + ".json").write_text(json.dumps(result, indent=2) + "\n")
            Path(args.out + ".txt").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
