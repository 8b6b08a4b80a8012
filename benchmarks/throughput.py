"""Describe throughput: the seed's way against fleetscribe's runner, side by side, one run.

On a CUDA machine (the numbers in README come from this):

    python benchmarks/throughput.py --out benchmarks/results/throughput_h100

It builds a random model with Qwen3-VL-4B's published shape (benchmarks/shapes/, no
download; its tokenizer filled with made-up tokens to Qwen3's 151,643, so the grammar's
masks cost what they cost for the real one), writes real H.264 test clips, samples their
frames with the real sampler and forces a fixed answer length (--new-tokens). For each
setting and frame count it runs
- seed: NF4, one video per `generate` call, default dynamic cache (SEED.md's loop);
- engine (generate): fleetscribe's runner on HF `generate` (the engine before the decode
  loop), fed by CPU threads through the worker's batcher, i.e. frames are decoded and
  preprocessed while the GPU runs the previous batch;
- engine (graph): the same runner on its own decode loop, each step a replayed CUDA graph;
at `h100` (bf16 compute, whole card) and `t4` (fp16 compute, memory capped at 15 GiB).
`--grammar` adds both paths under the report grammar (the random model ends each text at
a length drawn below its target, as a trained model does, rather than at the grammar's
bound: `--texts`, benchmarks/text_ends.py), `--lengths` both paths with answers
that stop at different lengths (drawn from a distribution), so compaction shows, and
`--profile` a torch.profiler summary of the phase before the first token (`--profile-decode`
of decode steps). `--decode-attention` (models.decode_attention: sdpa, matmul, flex) and
`--prefill` (models.fused_prefill: eager, fused; its first batch, the warm-up, compiles it)
name the loop's own choice first (its plain, grammar and lengths rows) and add a row for
every other pair.
`--e2e` adds the same videos through a real Redis and a real `python -m worker`.

On a CPU (a smoke run of the same code): --shape small --quant fp32 --settings cpu.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SETTINGS = {  # name: (compute dtype, memory cap in GiB; 0 = whole card)
    "h100": (None, 0.0),
    "t4": ("float16", 15.0),
    "cpu": (None, 0.0),
}


_T0 = time.perf_counter()
_PROGRESS = []  # main's save(), called with a setting's rows so far (a run cut short keeps them)


def progress(rows: list[dict]) -> None:
    for hook in _PROGRESS:
        hook(rows)


def log(message: str) -> None:
    print(f"[{time.perf_counter() - _T0:6.0f} s] {message}", flush=True)


def make_clips(folder: Path, count: int, seconds: float) -> list[Path]:
    """Distinct 640x360 H.264 clips (different seeds), written on all cores."""
    from producer.clips import make_video

    folder.mkdir(parents=True, exist_ok=True)

    def one(i: int) -> Path:
        path = folder / f"clip_{i:04d}.mp4"
        make_video(path, seconds=seconds, fps=10, width=640, height=360, seed=i)
        return path

    with ThreadPoolExecutor(os.cpu_count() or 2) as pool:
        return list(pool.map(one, range(count)))


def build_model(folder: Path, shape: str, device: str) -> Path:
    from models.tiny import build_from_shape, build_tiny

    if shape == "small":  # CPU smoke: tiny layers, real frame sizes
        return build_tiny(folder, max_frame_pixels=16_777_216)
    return build_from_shape(folder, shape, dtype="bfloat16", device=device)


def _peak_gib() -> float:
    import torch

    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else 0


def _reset_peak() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def run_seed(loaded, clips: list[Path], args) -> dict:
    """SEED.md's loop: sample, preprocess, generate one video at a time, dynamic cache."""
    import torch

    from models.prompt import build_messages
    from video.media import sample_frames

    processor, model = loaded.processor, loaded.model
    _reset_peak()
    began = time.perf_counter()
    tokens = 0
    for path in clips:
        video = sample_frames(path, args.frames, max_side=640)
        text = processor.apply_chat_template(
            build_messages(video.timestamps), tokenize=False, add_generation_prompt=True
        )
        inputs = processor(text=[text], images=video.frames, return_tensors="pt")
        inputs = inputs.to(loaded.device)
        inputs["pixel_values"] = inputs["pixel_values"].to(loaded.compute_dtype)
        with torch.inference_mode():
            out = model.generate(
                **inputs,
                max_new_tokens=args.new_tokens,
                min_new_tokens=args.new_tokens,
                do_sample=False,
                disable_compile=True,
            )
        tokens += out.shape[1] - inputs["input_ids"].shape[1]
    elapsed = time.perf_counter() - began
    return _row(f"seed ({args.quant}, 1 video/generate)", len(clips), tokens, elapsed, batch=1)


def answer_lengths(spec: str, count: int, cap: int, seed: int = 0) -> list[int]:
    """Per-video answer lengths for `--lengths`: "lognormal:MEDIAN:SIGMA", clipped to
    [16, cap]. Real reports run from a short scene and no hazard to five hazards and long
    texts; with no real model here the shape is an assumption (median 170 tokens)."""
    import numpy as np

    kind, median, sigma = spec.split(":")
    if kind != "lognormal":
        raise SystemExit(f"--lengths: unknown distribution {kind}")
    rng = np.random.default_rng(seed)
    drawn = rng.lognormal(np.log(float(median)), float(sigma), count)
    return [int(n) for n in np.clip(np.round(drawn), 16, cap)]


@contextmanager
def gpu_busy():
    """The GPU's busy share while the block runs: nvidia-smi's utilization (the share of
    time a kernel was running), sampled every 100 ms; yields a dict filled on exit."""
    result: dict = {}
    smi = shutil.which("nvidia-smi")
    if smi is None:
        yield result
        return
    proc = subprocess.Popen(
        [smi, "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits", "-lms", "100"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        yield result
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=10)
        samples = [float(x) for x in out.split() if x.replace(".", "", 1).isdigit()]
        if samples:
            result["gpu_util"] = round(statistics.mean(samples) / 100, 3)


def run_batched(
    loaded,
    clips: list[Path],
    args,
    memory_gib: float,
    compile: str,
    constrained: bool = False,
    new_tokens: int | None = None,
    generation: str = "generate",
    lengths: list[int] | None = None,
    decode_attention: str = "sdpa",
    prefill: str = "eager",
) -> dict:
    """The worker's path: feeder threads sample + prepare, the batcher drives the GPU.

    Unconstrained, every answer is forced to `new_tokens` (or, with `lengths`, stops at
    its own length); constrained (the report grammar), answers end where the grammar lets
    them."""
    from models import decode_attention as attention
    from models.compat import allow_compiling_nf4
    from models.decode_attention import use_decode_attention
    from models.memory import apply_memory_cap
    from models.runner import ModelRunner, RunnerConfig, report_grammar
    from models.vision_attention import use_runs_attention
    from video.media import sample_frames
    from worker.batcher import Batcher

    new_tokens = new_tokens or args.new_tokens
    config = RunnerConfig(
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        batch_size=args.batch_size,
        compile=compile or "off",
        prefill_chunk=args.prefill_chunk,
        generation=generation,
        prefill=prefill,
    )
    # The process-wide steps, as models.runner.build_runner takes them for a worker.
    cap = apply_memory_cap(loaded.device, memory_gib)
    if compile and loaded.quant == "nf4":
        allow_compiling_nf4(loaded.model)
    grammar = report_grammar(loaded) if constrained else None
    if grammar is not None and args.texts == "target":  # texts end as a trained model's do
        from benchmarks.text_ends import EndingMasks

        grammar.masks_type = EndingMasks
    runner = ModelRunner(loaded, config, grammar=grammar, memory_cap=cap)
    if runner.generation == "graph":
        use_runs_attention(loaded.model)
    use_decode_attention(loaded.model, decode_attention)  # process-wide: this row only
    if constrained and args.grammar_steps:
        # A random model fills every string to its bound (~2,300 tokens a report): cap the
        # answer so the grammar's per-step cost is measured over the same steps as the
        # unconstrained row (the cut answers are not valid reports; their cost is real).
        runner.answer_tokens = runner.first_pass_tokens = args.grammar_steps

    by_path = {path: i for i, path in enumerate(clips)}
    if lengths is not None:
        runner.answer_lengths = {}

    def feed(batcher: Batcher, path: Path):
        with batcher.preparing():  # as the worker's task threads do
            video = sample_frames(path, args.frames, max_side=640)
            prepared = runner.prepare(video)
            if lengths is not None:
                runner.answer_lengths[id(prepared)] = lengths[by_path[path] % len(lengths)]
            pending = batcher.submit(prepared)
        return pending.result()

    ends: list[tuple[float, int]] = []  # each batch's end (perf_counter) and its rows

    def run(paths: list[Path]):
        batcher = Batcher(
            runner, wait_s=0.05, on_batch=lambda rows, **_: ends.append((time.perf_counter(), rows))
        )
        with ThreadPoolExecutor(args.feeders) as pool:
            answers = list(pool.map(lambda p: feed(batcher, p), paths))
        batcher.close()
        return answers, batcher.stats

    # Warm-up (not timed): one batch's shapes, memory per token measured, CUDA and the
    # grammar set up; its answers are cut short (the decode steps teach nothing new).
    full = (runner.min_new_tokens, runner.answer_tokens, runner.first_pass_tokens)
    short = min(16, runner.answer_tokens)
    runner.min_new_tokens = min(runner.min_new_tokens, short)
    runner.answer_tokens = runner.first_pass_tokens = short
    _, warm = run(clips[: min(len(clips), args.batch_size)])
    runner.min_new_tokens, runner.answer_tokens, runner.first_pass_tokens = full
    log(f"runner warm-up: batches {warm.sizes} in {warm.busy_s:.1f} s")
    _reset_peak()
    runner.memory.peak = 0  # the runner resets the CUDA peak each batch; it keeps its own
    runner.timings.clear()
    ends.clear()
    began, cpu_began = time.perf_counter(), time.process_time()
    with gpu_busy() as busy:
        answers, stats = run(clips)
    elapsed = time.perf_counter() - began
    use_decode_attention(loaded.model, "sdpa")  # the other rows and the profile: SDPA
    # All of this process's CPU time (FFmpeg's decoder threads included) except the GPU
    # thread's: what decoding and preprocessing cost per video.
    feeding_cpu = time.process_time() - cpu_began - stats.cpu_s
    # A runner whose compiler failed fell back to eager decoding: say so in its name.
    compiled = (
        f" + compile {compile}" if runner.compile else (" (compile failed)" if compile else "")
    )
    name = f"engine ({generation})" + compiled
    if decode_attention != "sdpa":
        name += f" + {decode_attention} attention"
    if prefill != "eager":
        name += f" + {prefill} prefill"
    name += f" + grammar (texts to {args.texts})" if constrained else ""
    if new_tokens != args.new_tokens:
        name += f" ({new_tokens} tokens)"
    if lengths is not None:
        name += f" (lengths {args.lengths})"
    row = _row(name, len(clips), sum(a.tokens_out for a in answers), elapsed, batch=stats.sizes)
    row["peak_gib"] = max(row["peak_gib"], round(runner.memory.peak / 2**30, 2))
    per_video_cpu = feeding_cpu / len(clips)
    row["gpu_thread_cpu_share"] = round(stats.cpu_s / max(stats.busy_s, 1e-9), 2)
    row["cpu_s_per_video"] = round(per_video_cpu, 3)
    # Cores that decode + preprocess as fast as the GPU consumes.
    row["cpu_cores_needed"] = round(per_video_cpu / row["s_per_video"], 1)
    row["gpu_busy"] = round(stats.busy_s / elapsed, 3)
    row["mean_batch_steps"] = round(statistics.mean(stats.steps)) if stats.steps else 0
    timings = runner.timings
    row["first_token_s_per_video"] = round(sum(t.first_token_s for t in timings) / len(clips), 4)
    steps = sum(t.steps for t in timings)
    decoding = sum(t.seconds - t.first_token_s for t in timings)
    row["ms_per_step"] = round(1000 * decoding / max(steps, 1), 2)
    row["paths"] = sorted({t.path for t in timings})
    row["buckets"] = [t.buckets for t in timings if t.buckets]
    if any(t.prefill_peak for t in timings):
        row["prefill_peak_gib"] = round(max(t.prefill_peak for t in timings) / 2**30, 2)
    if runner._loop is not None and runner._loop.failure:
        row["capture_failure"] = runner._loop.failure
    row.update(busy)
    steady = steady_s_per_video(ends)
    if steady is not None:
        row["steady_s_per_video"] = steady
    row["frames"] = args.frames
    row["generation"] = generation
    row["decode_attention"] = decode_attention
    row["prefill"] = prefill
    if decode_attention == "flex" and attention.flex_fallback.failure:
        row["decode_attention_failure"] = attention.flex_fallback.failure
    if runner._loop is not None and getattr(runner._loop.prefill, "failure", None):
        row["prefill_failure"] = runner._loop.prefill.failure
    return row


def steady_s_per_video(ends: list[tuple[float, int]]) -> float | None:
    """Seconds a video once the pipeline is full: from the first batch's end to the last's,
    over the videos of the later batches. The first batch waits for its frames to be
    sampled with the GPU idle (a worker on a full queue does that once); later batches
    find theirs prepared while the GPU ran. None for a single batch."""
    if len(ends) < 2:
        return None
    videos = sum(rows for _, rows in ends[1:])
    return round((ends[-1][0] - ends[0][0]) / videos, 4)


def _row(name: str, videos: int, tokens: int, elapsed: float, batch) -> dict:
    s_per_video = elapsed / videos
    return {
        "path": name,
        "videos": videos,
        "seconds": round(elapsed, 2),
        "s_per_video": round(s_per_video, 4),
        "videos_per_hour": round(3600 / s_per_video),
        "tokens_per_s": round(tokens / elapsed, 1),
        "batch": batch if isinstance(batch, int) else _sizes(batch),
        "peak_gib": _peak_gib(),
    }


def _sizes(sizes: list[int]) -> str:
    return f"{min(sizes)}-{max(sizes)} (mean {statistics.mean(sizes):.1f})" if sizes else "-"


def run_setting(name: str, model_dir: Path, clips: list[Path], args) -> list[dict]:
    import torch

    if name == "t4":
        clips = clips[: args.t4_videos]
    from models.loader import load_model

    compute, cap = SETTINGS[name]
    if torch.cuda.is_available():  # before loading: the seed's way runs under the cap too
        from models.memory import apply_memory_cap

        apply_memory_cap("cuda", cap)
    loaded = load_model(str(model_dir), quant=args.quant, compute=compute)
    log(f"{name}: model loaded ({loaded.compute_dtype})")
    rows: list[dict] = []
    if args.seed_videos:
        rows.append(run_seed(loaded, clips[: args.seed_videos], args))
        log(f"{name}: seed's way done: {rows[-1]}")
    paths = [p for p in args.paths.split(",") if p and p != "none"]
    lengths = answer_lengths(args.lengths, len(clips), args.new_tokens) if args.lengths else None
    counts = _counts(args.frame_counts)
    for frames in counts:
        args.frames = frames
        plain: dict[str, dict] = {}
        for path in paths:
            own = _own_choice(args, path)
            plain[path] = run_batched(loaded, clips, args, cap, "", generation=path, **own)
            rows.append(plain[path])
            log(f"{name}, {frames} frames: {path} done: {rows[-1]}")
            progress(rows)
            for attention, prefill in _variants(args, path):
                rows.append(
                    run_batched(
                        loaded,
                        clips,
                        args,
                        cap,
                        "",
                        generation=path,
                        decode_attention=attention,
                        prefill=prefill,
                    )
                )
                log(f"{name}, {frames} frames: {path}, {attention} attention, {prefill} prefill")
                log(f"{rows[-1]}")
                progress(rows)
        if args.grammar and frames in _grammar_frames(args):
            for path in paths:
                # Constrained answers end where the grammar says; the cost of the constraint
                # is its time against the same path forced to the same number of steps.
                own = _own_choice(args, path)
                constrained = run_batched(
                    loaded, clips, args, cap, "", constrained=True, generation=path, **own
                )
                steps = constrained["mean_batch_steps"]
                same, extra = plain[path], []
                if steps != same["mean_batch_steps"]:
                    same = run_batched(
                        loaded, clips, args, cap, "", new_tokens=steps, generation=path, **own
                    )
                    extra = [same]
                constrained["grammar_cost"] = round(constrained["seconds"] / same["seconds"] - 1, 3)
                rows += [constrained, *extra]
                log(f"{name}, {frames} frames: {path} grammar cost {constrained['grammar_cost']}")
                progress(rows)
        if lengths is not None and frames == counts[0]:
            for path in paths:
                own = _own_choice(args, path)
                rows.append(
                    run_batched(
                        loaded, clips, args, cap, "", generation=path, lengths=lengths, **own
                    )
                )
                log(f"{name}, {frames} frames: {path} with lengths done: {rows[-1]}")
                progress(rows)
        if args.profile and frames == counts[0]:
            chosen = args.profile.split(",")
            profile_first_token(loaded, clips, args, chosen, Path(args.out or "throughput"))
    for mode in filter(None, args.compile.split(",")):
        try:
            rows.append(run_batched(loaded, clips, args, cap, compile=mode))
        except Exception as e:  # report it; the uncompiled figures stand
            rows.append(
                {"path": f"runner + compile {mode}", "error": f"{type(e).__name__}: {e}"[:300]}
            )
    seed = rows[0] if rows and rows[0]["path"].startswith("seed") else None
    for row in rows:
        row.update(setting=name, compute=str(loaded.compute_dtype), memory_cap_gib=cap)
        if seed and "s_per_video" in row:
            row["x_seed"] = round(seed["s_per_video"] / row["s_per_video"], 1)
        base = _generate_twin(rows, row)
        if base is not None and "s_per_video" in row:
            row["x_generate"] = round(base["s_per_video"] / row["s_per_video"], 2)
            if "steady_s_per_video" in row and "steady_s_per_video" in base:
                row["steady_x_generate"] = round(
                    base["steady_s_per_video"] / row["steady_s_per_video"], 2
                )
    del loaded
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.set_per_process_memory_fraction(1.0)
    return rows


def _counts(text: str) -> list[int]:
    """ "8,12" -> [8, 12] (--frames, --grammar-frames)."""
    return [int(f) for f in str(text).split(",")]


def _choices(text: str) -> list[str]:
    return [c for c in text.split(",") if c]


def _own_choice(args, path: str) -> dict[str, str]:
    """The loop's own decode attention and prefill for its plain, grammar and lengths
    rows: the first of --decode-attention and of --prefill (HF generate keeps
    transformers' own)."""
    if path == "generate":
        return {"decode_attention": "sdpa", "prefill": "eager"}
    attention = _choices(args.decode_attention)[0]
    return {"decode_attention": attention, "prefill": _choices(args.prefill)[0]}


def _variants(args, path: str) -> list[tuple[str, str]]:
    """The other (decode attention, prefill) pairs to run `path` with besides its own
    (the first of each list): every pair of --decode-attention and --prefill, so the best
    combination is measured too. The engine's loop only."""
    if path == "generate":
        return []
    own = tuple(_own_choice(args, path).values())
    pairs = [(a, p) for a in _choices(args.decode_attention) for p in _choices(args.prefill)]
    return [pair for pair in pairs if pair != own]


def _grammar_frames(args) -> set[int]:
    return set(_counts(args.grammar_frames or args.frame_counts))


def _generate_twin(rows: list[dict], row: dict) -> dict | None:
    """The `engine (generate)` row run like `row` (same frames, grammar, lengths)."""
    generation = row.get("generation")
    if generation in (None, "generate"):
        return None
    twin = row["path"].replace(f"engine ({generation})", "engine (generate)", 1)
    twin = twin.replace(f" + {row.get('decode_attention')} attention", "")
    twin = twin.replace(f" + {row.get('prefill')} prefill", "")
    for other in rows:
        if other.get("path") == twin and other.get("frames") == row.get("frames"):
            return other
    return None


def profile_first_token(loaded, clips: list[Path], args, paths: list[str], out: Path) -> None:
    """torch.profiler over one batch answered with one token (the phase before the first
    answer token), per path: the top operators by device time and by host time."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from models.runner import ModelRunner, RunnerConfig
    from models.vision_attention import use_runs_attention
    from video.media import sample_frames

    with ThreadPoolExecutor(os.cpu_count() or 2) as pool:
        videos = list(
            pool.map(
                lambda p: sample_frames(p, args.frames, max_side=640), clips[: args.profile_videos]
            )
        )
    text = []
    for path in paths:
        config = RunnerConfig(
            max_new_tokens=1,
            batch_size=args.batch_size,
            prefill_chunk=args.prefill_chunk,
            generation=path,
        )
        runner = ModelRunner(loaded, config)
        if runner.generation == "graph":
            use_runs_attention(loaded.model)
        runner.generate([runner.prepare(v) for v in videos[:2]])  # warm
        began = time.perf_counter()
        with ThreadPoolExecutor(os.cpu_count() or 2) as pool:
            prepared = list(pool.map(runner.prepare, videos))
        prepare_s = time.perf_counter() - began
        cuda = torch.cuda.is_available()
        runner.generate(prepared)  # once unprofiled: the time the profiler does not skew
        plain = runner.timings[-1].first_token_s
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with phases_named(runner), profile(activities=activities) as prof:
            began = time.perf_counter()
            runner.generate(prepared)
            if cuda:
                torch.cuda.synchronize()
            seconds = time.perf_counter() - began
        averages = prof.key_averages()
        text.append(
            f"== {path}: {len(videos)} videos x {args.frames} frames, first token in "
            f"{plain:.2f} s ({plain / len(videos):.4f} s/video), {seconds:.2f} s under the "
            "profiler; "
            f"preparing them on {os.cpu_count()} threads took {prepare_s:.2f} s (feeders' work)\n"
        )
        named = [e for e in averages if e.key.startswith("fs::")]
        text.append("phases (fs:: ranges, host and device time, ms):")
        for e in sorted(named, key=lambda e: -e.cpu_time_total):
            device_ms = getattr(e, "device_time_total", getattr(e, "cuda_time_total", 0)) / 1000
            text.append(
                f"  {e.key:<28} calls {e.count:>5}  host {e.cpu_time_total / 1000:>9.1f}"
                f"  device {device_ms:>9.1f}"
            )
        if cuda:
            text.append(
                averages.table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=60)
            )
            text.append(
                averages.table(
                    sort_by="self_cuda_time_total", row_limit=25, max_name_column_width=60
                )
            )
            if args.profile_trace:  # large: hundreds of MB for a batch of 128
                prof.export_chrome_trace(f"{out}_profile_{path}.trace.json")
        text.append(
            averages.table(sort_by="cpu_time_total", row_limit=20, max_name_column_width=60)
        )
        log(f"profile {path}: {seconds:.2f} s for {len(videos)} videos")
        if args.profile_decode and cuda and runner.generation in ("graph", "loop"):
            text += profile_decode(runner, prepared, args.profile_decode)
            log(f"profile {path}: {args.profile_decode} decode steps")
    Path(f"{out}_profile.txt").write_text("\n".join(text))


def profile_decode(runner, prepared: list, steps: int) -> list[str]:
    """torch.profiler over `steps` decode steps of the engine's loop (the profiler starts
    once the prefill is done): eagerly, so the kernels of one step show one by one, then
    as the runner runs them (replayed graphs, where it captures)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    text = []
    generation, min_new = runner.generation, runner.min_new_tokens
    answer = runner.answer_tokens, runner.first_pass_tokens
    runner.min_new_tokens = runner.answer_tokens = runner.first_pass_tokens = steps + 1
    try:
        for mode in ("loop", generation):
            runner.generation = mode
            runner.generate(prepared[:2])  # the loop exists (and this bucket's graphs)
            loop = runner._loop
            loop.use_graphs = mode == "graph"
            prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
            original = loop._prefill

            def prefill_then_start(*a, _original=original, _prof=prof, **k):
                out = _original(*a, **k)
                torch.cuda.synchronize()
                _prof.start()
                return out

            loop._prefill = prefill_then_start
            try:
                runner.generate(prepared)
                torch.cuda.synchronize()
            finally:
                prof.stop()
                del loop._prefill
            timing = runner.timings[-1]
            per_step = (timing.seconds - timing.first_token_s) / max(timing.steps, 1)
            text.append(
                f"\n== decode, {mode}: {len(prepared)} rows, {timing.steps} steps, "
                f"{1000 * per_step:.1f} ms a step (profiled; buckets {timing.buckets})\n"
            )
            text.append(
                prof.key_averages().table(
                    sort_by="self_cuda_time_total", row_limit=30, max_name_column_width=70
                )
            )
    finally:
        runner.generation, runner.min_new_tokens = generation, min_new
        runner.answer_tokens, runner.first_pass_tokens = answer
    return text


@contextmanager
def phases_named(runner):
    """Named profiler ranges (fs::...) around the phases before the first token: collation,
    the vision tower, the text decoder's forward, the multimodal positions."""
    import torch

    from models.loader import vision_language_model

    vlm = vision_language_model(runner.loaded.model)
    targets = [
        (runner, "collate", "fs::collate"),
        (vlm.visual, "forward", "fs::vision_tower"),
        (vlm.language_model, "forward", "fs::text_decoder"),
        (vlm, "get_rope_index", "fs::rope_index"),
        (vlm, "get_placeholder_mask", "fs::placeholder_mask"),
        (runner.loaded.model, "generate", "fs::hf_generate"),
    ]
    saved = []
    for owner, attr, name in targets:
        original = getattr(owner, attr)

        def wrapped(*a, _original=original, _name=name, **k):
            with torch.profiler.record_function(_name):
                return _original(*a, **k)

        saved.append((owner, attr, original, attr in vars(owner)))
        setattr(owner, attr, wrapped)
    try:
        yield
    finally:
        for owner, attr, original, own in reversed(saved):
            if own:  # an attribute of the object itself before: put it back
                setattr(owner, attr, original)
            else:  # the class's method again
                delattr(owner, attr)


def run_e2e(model_dir: Path, clips_dir: Path, args, runner_row: dict) -> dict:
    """The same clips through Redis and a real `python -m worker` process (threads pool)."""
    count = len(list(clips_dir.glob("*.mp4")))  # the producer enqueues the whole folder
    work = Path(tempfile.mkdtemp(prefix="fs-e2e-"))
    port = 6390
    redis = subprocess.Popen(
        [args.redis_server, "--port", str(port), "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
    )
    env = dict(
        os.environ,
        FLEETSCRIBE_HOME=str(work),
        FLEETSCRIBE_BROKER_URL=f"redis://127.0.0.1:{port}/0",
        FLEETSCRIBE_MODEL=str(model_dir),
        FLEETSCRIBE_QUANT=args.quant,
        FLEETSCRIBE_FRAMES=str(args.frames),
        FLEETSCRIBE_MAX_NEW_TOKENS=str(args.new_tokens),
        FLEETSCRIBE_MIN_NEW_TOKENS=str(args.new_tokens),
        FLEETSCRIBE_CONSTRAINED="false",  # the same forced-length work as the runner row
        FLEETSCRIBE_BATCH_SIZE=str(args.batch_size),
        FLEETSCRIBE_PREFILL_CHUNK=str(args.prefill_chunk),
        HF_HUB_OFFLINE="1",
    )
    worker_log = open(work / "worker.log", "wb")  # noqa: SIM115 - closed below
    worker = subprocess.Popen(
        [sys.executable, "-m", "worker", "--loglevel", "INFO"],  # INFO: the runner's batches
        cwd=ROOT,
        env=env,
        stdout=worker_log,
        stderr=subprocess.STDOUT,
    )
    try:
        warm = work / "warm"
        warm.mkdir()
        for path in sorted(clips_dir.glob("*.mp4"))[: args.batch_size]:
            shutil.copy(path, warm / f"warm_{path.name}")  # same pixels, new bytes below
            with open(warm / f"warm_{path.name}", "ab") as f:
                f.write(b"\0")  # a distinct sha256, so it is not a duplicate of the timed clip
        _enqueue(warm, env, wait=True)  # model load, static cache, first batch: not timed
        log("end to end: worker warm")
        # A worker with a full queue, as on an archive run: the clips are all queued while
        # the worker is not consuming, then it starts on them. (Consuming while the
        # producer probes and sends would time the producer's pace instead.)
        _control(env, "cancel_consumer")
        _enqueue(clips_dir, env, wait=False)
        began = time.perf_counter()
        _control(env, "add_consumer")
        _wait_done(work, clips_dir, count)
        elapsed = time.perf_counter() - began
    finally:
        worker.terminate()
        try:
            worker.wait(timeout=120)
        except subprocess.TimeoutExpired:
            worker.kill()
        worker_log.close()
        redis.terminate()
    span = _worker_span(work, clips_dir)
    row = _row("end to end: Redis + Celery worker", count, count * args.new_tokens, span, 0)
    # The runner logs each batch it ran; the timed ones are those after the warm-up's.
    text = (work / "worker.log").read_text(errors="replace")
    sizes = [int(n) for n in re.findall(r"batch of (\d+) x \d+ tokens", text)]
    row["batch"] = _sizes(_after_warm_up(sizes, args.batch_size))
    row["worker_batches"] = sizes
    # The worker's own GPU peak (this process's says nothing about it).
    peaks = [float(g) for g in re.findall(r"batch of \d+: peak ([\d.]+) GiB", text)]
    row["peak_gib"] = max(peaks, default=0.0)
    # From the first video claimed to the last report committed, against the runner alone;
    # the wall time from the consumer's start to the last report seen is reported beside it.
    row["queue_overhead"] = round(row["s_per_video"] / runner_row["s_per_video"] - 1, 3)
    row["wall_s"] = round(elapsed, 2)
    if worker.returncode not in (0, -15):
        row["worker_log_tail"] = text[-2000:]
    return row


def _after_warm_up(sizes: list[int], warm: int) -> list[int]:
    """Drop the leading batches that served the warm-up's `warm` clips."""
    served = 0
    for i, size in enumerate(sizes):
        if served >= warm:
            return sizes[i:]
        served += size
    return []


def _enqueue(folder: Path, env: dict, *, wait: bool) -> None:
    subprocess.run(
        [sys.executable, "-m", "producer", "enqueue", str(folder), *(["--wait"] if wait else [])],
        cwd=ROOT,
        env=env,
        check=True,
        stdout=subprocess.DEVNULL,
    )


def _control(env: dict, command: str) -> None:
    """Celery remote control of the describe queue's consumer (cancel_consumer/add_consumer),
    through an app configured from the worker's environment."""
    from broker.celery_app import DESCRIBE_QUEUE, make_celery
    from config.settings import Settings

    app = make_celery(Settings(broker_url=env["FLEETSCRIBE_BROKER_URL"]))
    try:
        getattr(app.control, command)(DESCRIBE_QUEUE, reply=True, timeout=10)
    finally:
        app.close()


@contextmanager
def _e2e_store(work: Path):
    """Sessions on the end-to-end run's SQLite store, disposed afterwards."""
    from db.session import make_engine, make_sessionmaker

    engine = make_engine(f"sqlite:///{work / 'fleetscribe.db'}")
    try:
        yield make_sessionmaker(engine)
    finally:
        engine.dispose()


def _worker_span(work: Path, clips_dir: Path) -> float:
    from sqlalchemy import func, select

    from db.models import Video

    with _e2e_store(work) as sessions, sessions() as session:
        first, last, done = session.execute(
            select(
                func.min(Video.started_at),
                func.max(Video.finished_at),
                func.count().filter(Video.state == "done"),
            ).where(Video.path.like(f"{clips_dir}%"))
        ).one()
    print(f"end to end: {done} clips done", flush=True)
    return (last - first).total_seconds()


def _wait_done(work: Path, clips_dir: Path, count: int, timeout_s: float = 3600) -> None:
    """Poll the store until every clip of `clips_dir` is finished (done or failed)."""
    from sqlalchemy import func, select

    from db.models import FINAL_STATES, Video

    finished = 0
    deadline = time.monotonic() + timeout_s
    with _e2e_store(work) as sessions:
        while time.monotonic() < deadline:
            with sessions() as session:
                finished = session.scalar(
                    select(func.count()).where(
                        Video.path.like(f"{clips_dir}%"), Video.state.in_(FINAL_STATES)
                    )
                )
            if finished >= count:
                return
            time.sleep(0.2)
    raise TimeoutError(f"end to end: {finished} of {count} clips finished in {timeout_s} s")


def table(rows: list[dict], gpu: str) -> str:
    from rich.console import Console
    from rich.table import Table

    out = Table(title=f"fleetscribe describe throughput on {gpu}", header_style="bold")
    cols = [
        ("setting", "setting"),
        ("path", "path"),
        ("batch", "batch"),
        ("s/video", "s_per_video"),
        ("videos/h", "videos_per_hour"),
        ("tokens/s", "tokens_per_s"),
        ("x seed", "x_seed"),
        ("x generate", "x_generate"),
        ("steady s/video", "steady_s_per_video"),
        ("steady x generate", "steady_x_generate"),
        ("frames", "frames"),
        ("first token s/video", "first_token_s_per_video"),
        ("ms/step", "ms_per_step"),
        ("GPU busy", "gpu_util"),
        ("peak GiB", "peak_gib"),
        ("CPU cores/GPU", "cpu_cores_needed"),
        ("queue cost", "queue_overhead"),
        ("grammar cost", "grammar_cost"),
    ]
    for title, _ in cols:
        out.add_column(title, overflow="fold")
    for row in rows:
        out.add_row(*[str(row.get(key, row.get("error", "")) if key else "") for _, key in cols])
    console = Console(record=True, width=220)
    console.print(out)
    return console.export_text()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default=str(ROOT / "benchmarks/shapes/qwen3-vl-4b.json"))
    parser.add_argument("--settings", default="h100,t4")
    parser.add_argument("--quant", default="nf4")
    parser.add_argument("--videos", type=int, default=256)
    parser.add_argument("--seed-videos", type=int, default=2)
    parser.add_argument("--t4-videos", type=int, default=64, help="fewer: T4 batches are small")
    parser.add_argument("--frames", dest="frame_counts", default="8", help="e.g. 8,12")
    parser.add_argument("--paths", default="generate,graph", help="engine paths to run")
    parser.add_argument("--grammar-frames", default="", help="frame counts for --grammar")
    parser.add_argument(
        "--lengths", default="", help="also answers of varied length, e.g. lognormal:170:0.35"
    )
    parser.add_argument("--profile", default="", help="paths to profile the first token of")
    parser.add_argument("--profile-videos", type=int, default=32)
    parser.add_argument("--profile-trace", action="store_true", help="also a chrome trace")
    parser.add_argument(
        "--profile-decode", type=int, default=0, help="also profile this many decode steps"
    )
    parser.add_argument(
        "--decode-attention",
        default="sdpa",
        help="the loop's decode attention (the first), and rows with the others: sdpa,matmul,flex",
    )
    parser.add_argument(
        "--prefill", default="eager", help="the loop's prefill (the first), rows with the others"
    )
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=64, help="upper bound per batch")
    parser.add_argument("--prefill-chunk", type=int, default=512, help="0: whole prompts")
    parser.add_argument("--feeders", type=int, default=0, help="CPU threads (default 2x batch)")
    parser.add_argument("--clip-seconds", type=float, default=8.0)
    parser.add_argument(
        "--compile",
        default="",
        help="also the compiled runner, per torch.compile mode: default,reduce-overhead",
    )
    parser.add_argument("--grammar", action="store_true", help="also the constrained runner")
    parser.add_argument(
        "--grammar-steps",
        type=int,
        default=0,
        help="cap constrained answers at this many tokens (0: the grammar's own bound)",
    )
    parser.add_argument(
        "--texts",
        choices=("target", "bound"),
        default="target",
        help="under --grammar, the random model ends each text at a length drawn below its "
        "target (benchmarks/text_ends.py), or writes it to the grammar's bound",
    )
    parser.add_argument("--e2e", action="store_true", help="also run through Redis + a worker")
    parser.add_argument("--setup-only", action="store_true", help="write clips and model, stop")
    parser.add_argument("--redis-server", default=shutil.which("redis-server") or "redis-server")
    parser.add_argument("--work", default=None, help="folder for the model and clips")
    parser.add_argument(
        "--switch-ms",
        type=float,
        default=None,
        help="the interpreter's switch interval while measuring (default: a describe "
        "worker's, SWITCH_INTERVAL_MS)",
    )
    parser.add_argument("--out", default=None, help="write OUT.json and OUT.txt")
    args = parser.parse_args()
    args.feeders = args.feeders or 2 * args.batch_size
    # As a describe worker runs: its GPU thread beside the feeders preparing the next batch.
    from config.settings import Settings

    if args.switch_ms is None:
        args.switch_ms = Settings.model_fields["switch_interval_ms"].default
    sys.setswitchinterval(args.switch_ms / 1000)
    args.frames = _counts(args.frame_counts)[0]
    # The allocator setting the worker's model loader asks for, set before CUDA starts here
    # (the device query below, the memory cap): without it the runs of 2026-12-07 and
    # before measured a more fragmented allocator than a worker has.
    from models.loader import prefer_expandable_segments

    prefer_expandable_segments()
    import torch

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
    work = Path(args.work or tempfile.mkdtemp(prefix="fs-bench-")).resolve()
    t0 = time.perf_counter()
    clips_dir = work / "clips"
    clips = sorted(clips_dir.glob("*.mp4")) or make_clips(clips_dir, args.videos, args.clip_seconds)
    clips = clips[: args.videos]
    log(f"{len(clips)} clips ready")
    model_dir = work / "model"
    if not (model_dir / "config.json").exists():
        build_model(model_dir, args.shape, "cuda" if torch.cuda.is_available() else "cpu")
    log(f"setup (clips + model) {time.perf_counter() - t0:.0f} s")
    if args.setup_only:
        return 0
    rows: list[dict] = []

    def save() -> None:  # after every stage, so a run cut short still leaves its figures
        text = table(rows, gpu)
        print(text, flush=True)
        if args.out:
            result = {"gpu": gpu, "torch": torch.__version__, "args": vars(args), "rows": rows}
            result["when"] = time.strftime("%Y-%m-%d %H:%M:%S")
            Path(args.out + ".json").write_text(json.dumps(result, indent=2, default=str) + "\n")
            Path(args.out + ".txt").write_text(text)

    def partial(setting_rows: list[dict]) -> None:
        """The rows of the settings done, and of the one running so far."""
        text = table(rows + setting_rows, gpu)
        if args.out:
            result = {"gpu": gpu, "torch": torch.__version__, "args": vars(args)}
            result.update(rows=rows + setting_rows, partial=True)
            Path(args.out + ".json").write_text(json.dumps(result, indent=2, default=str) + "\n")
            Path(args.out + ".txt").write_text(text)

    _PROGRESS.append(partial)
    for i, name in enumerate(args.settings.split(",")):
        rows += run_setting(name, model_dir, clips, args)
        save()
        if args.e2e and i == 0:  # against the first setting's runner (h100, or cpu on a CPU)
            runner_row = next(r for r in rows if r["path"] == "engine (generate)")
            row = run_e2e(model_dir, clips_dir, args, runner_row)
            row.update(setting=name, x_seed=round(rows[0]["s_per_video"] / row["s_per_video"], 1))
            rows.append(row)
            save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
