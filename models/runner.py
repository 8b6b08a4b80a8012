"""The model runner: sampled frames in, model answers out, batched on one device.

Work is split in two so the GPU never waits on the CPU:
- `prepare` (any thread, CPU only): chat template, tokenisation and image preprocessing
  of one video into CPU tensors. Celery task threads or the benchmark's feeders run it
  while the device is busy with the previous batch.
- `generate` (the device thread): pads prepared videos into batches (left padding, one
  static KV cache), decodes them greedily and cuts each row at its own stop token. How
  is `generation` (FLEETSCRIBE_GENERATION): on CUDA the engine's own loop, each step a
  replayed CUDA graph (`models.decode_loop`); on the CPU HF `generate`; `loop` is the
  engine's loop without capture (the tests hold it to `generate`'s tokens).
  The batch is bounded by `batch_size` and by what the GPU memory (and an optional cap)
  holds; a CUDA out-of-memory error retries the batch in parts of three quarters its size
  (`BACK_OFF`) instead of failing it.

`build_runner` makes one per process (a describe worker's lifecycle, a training job's
evaluation, the benchmarks): it loads the model and then takes each process-wide step
(memory cap, compile permission, grammar, the vision tower's attention) once, by name.
Knows no queue and no SQL.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from models.compat import allow_compiling_nf4
from models.decode_loop import DecodeLoop
from models.errors import GenerationError
from models.loader import LoadedModel, load_model, vision_language_model
from models.memory import GpuMemory, apply_memory_cap
from models.prompt import PROMPT_VERSION, build_messages
from models.vision_attention import use_runs_attention
from models.vision_encoder import VisionEncoder, vision_inputs

if TYPE_CHECKING:
    from config.settings import Settings
    from models.decoding import ReportGrammar

log = logging.getLogger(__name__)

GENERATION_PATHS = ("auto", "graph", "loop", "generate")
# After CUDA runs out of memory at n rows, batches hold at most this share of n.
BACK_OFF = 0.75
# Token-level tensors that are padded on the left; everything else is concatenated.
_PADDED = ("input_ids", "attention_mask", "mm_token_type_ids")
# Prompt lengths are padded up to a multiple of this, so the static cache and any compiled
# graphs see a handful of shapes instead of one per batch.
_PAD_MULTIPLE = 64


@dataclass
class Answer:
    """The model's answer for one video."""

    text: str
    tokens_in: int
    tokens_out: int
    latency_s: float
    batch_size: int = 1
    finished: bool = True  # the model ended it (stop token), rather than the token limit


@dataclass
class BatchTiming:
    """How one batch's time went (the benchmarks read the runner's `timings`)."""

    rows: int
    seconds: float  # the whole batch: collation to the last token on the host
    first_token_s: float  # collation, prompt in, first token chosen (device synchronised)
    steps: int  # decode steps after the first token (the longest row's)
    path: str  # graph, loop or generate
    buckets: list[int] = field(default_factory=list)  # graph/loop: the row counts it ran at
    prefill_peak: int = 0  # graph/loop on CUDA: peak bytes allocated when the first token came


@dataclass(eq=False)  # compared by identity: each is one video on its way
class Prepared:
    """One video's model inputs on the CPU, ready to be padded into a batch."""

    tensors: dict[str, Any]  # input_ids etc. of shape (1, n); pixel_values; image_grid_thw
    frames: int = 1  # sampled frames: bounds the hazards' frame index in the grammar
    # The engine's loop: the vision tower's inputs (models.vision_encoder.vision_inputs),
    # and once it ran, the video's features on the device (kept until its batch's prefill).
    vision: dict[str, Any] | None = None
    encoded: Any = None

    @property
    def tokens(self) -> int:
        return int(self.tensors["input_ids"].shape[1])


class Frames(Protocol):
    """What the runner reads of a sampled video (video.media.SampledVideo is one)."""

    frames: Sequence[Any]  # upright RGB arrays
    timestamps: Sequence[float]


@dataclass(frozen=True)
class RunnerConfig:
    """The runner's knobs, in one place (the per-process steps are `build_runner`'s)."""

    max_new_tokens: int = 512
    batch_size: int = 8
    # None: a static KV cache on CUDA (allocated once per batch shape instead of growing by
    # a concat at every step); on the CPU the dynamic cache is as fast and uses less memory.
    static_cache: bool | None = None
    compile: str = "off"  # torch.compile mode of the decode step: off|default|reduce-overhead
    min_new_tokens: int = 0  # benchmarks, unconstrained only: force a fixed answer length
    prefill_chunk: int = 0  # prefill prompts this many tokens at a time (0: whole)
    first_pass_tokens: int = 0  # under the grammar: room of the first pass (0: the bound)
    # auto: the engine's loop on CUDA graphs on a GPU, HF generate on the CPU; graph, loop
    # (the engine's loop, never captured) or generate (HF's, today's engine) to choose.
    generation: str = "auto"
    # The engine's loop: the text prefill's element-wise ops as they are (eager) or compiled
    # into fused kernels (fused; models.fused_prefill).
    prefill: str = "eager"

    @classmethod
    def from_settings(cls, settings: Settings) -> RunnerConfig:
        return cls(
            max_new_tokens=settings.max_new_tokens,
            batch_size=settings.batch_size,
            compile=settings.compile,
            min_new_tokens=settings.min_new_tokens,
            prefill_chunk=settings.prefill_chunk,
            first_pass_tokens=settings.first_pass_tokens,
            generation=settings.generation,
            prefill=settings.prefill,
        )


def build_runner(settings: Settings, *, adapter_path: str | None = None) -> ModelRunner:
    """Load the model and make this process's runner, taking each process-wide step once:
    the GPU memory cap, the NF4 compile permission (a documented compatibility patch), the
    report grammar, for the engine's graph loop the vision tower's attention over runs of
    frames (models.vision_attention), and the decode steps' attention if not SDPA
    (models.decode_attention). A ModelError says what is wrong.
    `adapter_path`: where the adapter named by FLEETSCRIBE_ADAPTER lies (resolved through
    the store by the caller); reports record the name."""
    loaded = load_model(
        settings.model,
        quant=settings.quant,
        adapter=adapter_path or settings.adapter,
        adapter_name=settings.adapter,
    )
    config = RunnerConfig.from_settings(settings)
    memory_cap = apply_memory_cap(loaded.device, settings.gpu_memory_gib)
    if config.compile != "off" and loaded.quant == "nf4":
        allow_compiling_nf4(loaded.model)
    grammar = report_grammar(loaded) if settings.constrained else None
    runner = ModelRunner(loaded, config, grammar=grammar, memory_cap=memory_cap)
    if runner.generation == "graph":
        # The vision tower in one attention call per run of same-sized frames.
        use_runs_attention(loaded.model)
    if settings.decode_attention != "sdpa":
        from models.decode_attention import use_decode_attention

        use_decode_attention(loaded.model, settings.decode_attention)
    return runner


class ModelRunner:
    """Holds the loaded model; `generate` runs prepared videos in memory-sized batches."""

    def __init__(
        self,
        loaded: LoadedModel,
        config: RunnerConfig | None = None,
        *,
        grammar: ReportGrammar | None = None,
        memory_cap: int = 0,
    ):
        config = config or RunnerConfig()
        self.loaded = loaded
        self.config = config
        constrained = grammar is not None
        # Schema-constrained decoding (models/grammar.py): every answer is a valid report.
        self.grammar = grammar
        # Benchmarks force a fixed answer length; never under the grammar, where it would
        # force tokens past the closing brace.
        self.min_new_tokens = 0 if constrained else config.min_new_tokens
        self.batch_size = config.batch_size
        self.prompt_version = PROMPT_VERSION
        self.on_cuda = loaded.device.startswith("cuda")
        self.static_cache = self.on_cuda if config.static_cache is None else config.static_cache
        # torch.compile mode of the decode step ("default", "reduce-overhead"); "" = eager.
        self.compile = "" if config.compile in ("", "off") else config.compile
        self.prefill_chunk = config.prefill_chunk
        # The longest answer a batch may need room for (static cache, memory sizing): under
        # the grammar, never less than its longest admitted answer, so none is cut off.
        self.answer_tokens = config.max_new_tokens
        if constrained:
            from models.grammar import MAX_FRAMES, worst_case_tokens

            self.answer_tokens = max(config.max_new_tokens, worst_case_tokens(MAX_FRAMES) + 1)
        # Under the grammar, batches first run with room for this many answer tokens (0: the
        # whole bound). The few answers still being written then are described again, with
        # room for the whole bound: so memory is sized for real answers, not the longest
        # admitted, and an answer that runs long no longer holds its whole batch.
        self.first_pass_tokens = self.answer_tokens
        if constrained and 0 < config.first_pass_tokens < self.answer_tokens:
            self.first_pass_tokens = config.first_pass_tokens
        self._lock = threading.Lock()  # one generate at a time on the device
        self.memory = GpuMemory(loaded, cap=memory_cap)
        self._oom_limit: int | None = None  # below a batch size that ran out of memory
        if config.generation not in GENERATION_PATHS:
            raise ValueError(f"generation must be one of {', '.join(GENERATION_PATHS)}")
        self.generation = config.generation
        if self.generation == "auto":
            self.generation = "graph" if self.on_cuda else "generate"
        if self.generation == "graph" and not self.on_cuda:
            self.generation = "loop"  # nothing to capture on the CPU
        self._loop: DecodeLoop | None = None
        # The engine's loop prepares more on the feeders' threads: the rows' multimodal
        # positions, the vision tower's inputs, and on CUDA pixels in the compute dtype in
        # pinned memory; it runs the vision tower itself (ahead of a batch where it can).
        self.prepare_positions = self.generation != "generate"
        self.encoder: VisionEncoder | None = None
        if self.prepare_positions and getattr(vision_language_model(loaded.model), "visual", None):
            self.encoder = VisionEncoder(
                loaded.model, loaded.device, loaded.compute_dtype, memory=self.memory
            )
        self.timings: list[BatchTiming] = []  # the most recent batches' (benchmarks)
        # Benchmarks: the answer length of each prepared video (by id), as if the model
        # stopped there; with `min_new_tokens` this draws lengths from a distribution.
        self.answer_lengths: dict[int, int] | None = None

    @property
    def model_id(self) -> str:
        return self.loaded.model_id

    @property
    def adapter(self) -> str:
        return self.loaded.adapter

    # -- CPU side -------------------------------------------------------------------------

    def prepare(self, video: Frames) -> Prepared:
        """Tokenise and preprocess one video's frames (CPU only; safe from any thread)."""
        processor = self.loaded.processor
        text = processor.apply_chat_template(
            build_messages(video.timestamps), tokenize=False, add_generation_prompt=True
        )
        inputs = dict(processor(text=[text], images=list(video.frames), return_tensors="pt"))
        prepared = Prepared(inputs, frames=len(video.timestamps))
        if self.prepare_positions:
            inputs["position_ids"] = self.positions(inputs)
            if self.encoder is not None and "pixel_values" in inputs:
                prepared.vision = vision_inputs(self.loaded.model, inputs["image_grid_thw"])
                if self.on_cuda:  # copied to the device asynchronously
                    inputs["pixel_values"] = inputs["pixel_values"].to(self.loaded.compute_dtype)
                    inputs["pixel_values"] = inputs["pixel_values"].pin_memory()
                    for key in ("position_ids", "interp_indices", "interp_weights"):
                        prepared.vision[key] = prepared.vision[key].pin_memory()
        return prepared

    def positions(self, inputs: dict[str, Any]):
        """One video's positions as the model reads them (4 x 1 x tokens: text, then the
        multimodal time, height and width), computed here on the CPU by the model's own
        `get_rope_index` instead of for the whole batch on the device thread."""
        import torch

        ids = inputs["input_ids"]
        grid = inputs.get("image_grid_thw")
        if grid is None:
            vision = torch.arange(ids.shape[1]).view(1, 1, -1).expand(3, 1, -1)
        else:
            vision, _ = vision_language_model(self.loaded.model).get_rope_index(
                ids, mm_token_type_ids=inputs["mm_token_type_ids"], image_grid_thw=grid
            )
        text = torch.arange(ids.shape[1]).view(1, 1, -1)
        return torch.cat([text, vision.to(text.dtype)])

    def collate(
        self, batch: list[Prepared], device: str | None = None, skip: tuple[str, ...] = ()
    ) -> dict[str, Any]:
        """Left-pad token tensors to one length; concatenate the frames' pixel tensors
        (unless in `skip`). With `device`, pinned tensors are copied there part by part
        (asynchronously) and joined on the device."""
        import torch

        pad_id = self.loaded.processor.tokenizer.pad_token_id
        width = max(p.tokens for p in batch)
        if self.static_cache:
            width = math.ceil(width / _PAD_MULTIPLE) * _PAD_MULTIPLE
        out: dict[str, Any] = {}
        for key in batch[0].tensors:
            if key in skip:
                continue
            parts = [p.tensors[key] for p in batch]
            if key in _PADDED or key == "position_ids":
                fill = pad_id if key == "input_ids" else 0
                rows = [
                    torch.nn.functional.pad(t, (width - t.shape[-1], 0), value=fill) for t in parts
                ]
                out[key] = torch.cat(rows, dim=1 if key == "position_ids" else 0)
            elif device is not None and parts[0].is_pinned():
                out[key] = torch.cat([t.to(device, non_blocking=True) for t in parts])
            else:
                out[key] = torch.cat(parts)
        return out

    # -- device side ----------------------------------------------------------------------

    def answer(self, videos: Sequence[Frames]) -> list[Answer]:
        """One answer per video, in order (prepares on this thread, then generates)."""
        return self.generate([self.prepare(v) for v in videos])

    def generate(
        self,
        prepared: list[Prepared],
        ready: Callable[[int, Answer], None] | None = None,
        upcoming: Callable[[], list[Prepared]] | None = None,
    ) -> list[Answer]:
        """Answers for prepared videos, in order, in as few batches as memory allows.

        Under the grammar, answers still going after the first pass are described again
        with room for the whole bound (HF generate; the engine's loop continues them from
        where they stopped, within the batch); `ready(i, answer)` gets each finished answer
        of the first pass before that, so its caller need not wait for the second pass.
        `upcoming()`: the videos queued after these (the batcher's); the engine's loop
        encodes their frames while a batch decodes."""
        answers = self._in_batches(prepared, self.first_pass_tokens, upcoming)
        long = [i for i, a in enumerate(answers) if not a.finished]
        two_pass = self.generation == "generate" and self.first_pass_tokens < self.answer_tokens
        if not long or not two_pass:
            return answers
        if ready is not None:
            for i, answer in enumerate(answers):
                if answer.finished:
                    ready(i, answer)
        log.info(
            "%d of %d answers still going at %d tokens; again with room for %d",
            len(long),
            len(answers),
            self.first_pass_tokens,
            self.answer_tokens,
        )
        # Greedy decoding starts these rows the same way again; now they have room for the
        # longest answer the grammar admits, so none is ever cut off.
        again = self._in_batches([prepared[i] for i in long], self.answer_tokens)
        for i, answer in zip(long, again, strict=True):
            answer.latency_s += answers[i].latency_s
            answers[i] = answer
        return answers

    def _in_batches(
        self,
        prepared: list[Prepared],
        answer_tokens: int,
        upcoming: Callable[[], list[Prepared]] | None = None,
    ) -> list[Answer]:
        answers: list[Answer] = []
        start = 0
        while start < len(prepared):
            size = self.batch_limit(max(p.tokens for p in prepared[start:]), answer_tokens)
            rest = prepared[start + size :]

            def after(rest=rest) -> list[Prepared]:
                return rest + (upcoming() if upcoming is not None else [])

            batch = prepared[start : start + size]
            answers += self._generate_or_split(batch, answer_tokens, after)
            start += size
        return answers

    def batch_limit(self, tokens: int, answer_tokens: int | None = None) -> int:
        """How many videos of about `tokens` prompt tokens one batch may hold, each with
        room for `answer_tokens` (default: the first pass's)."""
        limit = min(self.batch_size, self._oom_limit or self.batch_size)
        held = self.encoder.held_bytes() if self.encoder is not None else 0
        fits = self.memory.rows(tokens + (answer_tokens or self.first_pass_tokens), held)
        return limit if fits is None else max(1, min(limit, fits))

    def _generate_or_split(
        self,
        batch: list[Prepared],
        answer_tokens: int,
        upcoming: Callable[[], list[Prepared]] | None = None,
    ) -> list[Answer]:
        import torch

        out_of_memory = False
        try:
            return self._generate(batch, answer_tokens, upcoming)
        except torch.OutOfMemoryError:
            out_of_memory = True
        except Exception as e:
            if not self.compile:
                raise
            # A compiler failure (an unsupported op, a Triton build error) must not fail
            # videos: the eager path gives the same answers, only slower.
            log.warning(
                "compiled decode (%s) failed (%s: %s); running uncompiled",
                self.compile,
                type(e).__name__,
                e,
                exc_info=True,  # the compiler's traceback says what to fix
            )
            self.compile = ""
        if not out_of_memory:  # a compiler error: again uncompiled, outside the handler
            return self._generate_or_split(batch, answer_tokens)
        # Retry only out here: inside the except block the traceback still holds the failed
        # batch's activations and KV cache, so every retry would run out of memory too.
        self.memory.release()
        if len(batch) == 1:
            raise GenerationError(
                f"out of GPU memory for a single video ({batch[0].tokens} prompt tokens)"
            )
        # The limit holds for the process: the next batches must not fail again. A step of
        # a quarter, not a half, since a limit that is too low costs every later batch.
        smaller = max(1, min(len(batch) - 1, int(len(batch) * BACK_OFF)))
        self._oom_limit = min(smaller, self._oom_limit or smaller)
        log.warning("out of GPU memory at batch %d; now at most %d", len(batch), self._oom_limit)
        answers: list[Answer] = []
        while len(answers) < len(batch):  # the limit may drop again on the way
            start = len(answers)
            part = batch[start : start + self._oom_limit]
            answers += self._generate_or_split(part, answer_tokens)
        return answers

    def _generate(
        self,
        batch: list[Prepared],
        answer_tokens: int,
        upcoming: Callable[[], list[Prepared]] | None = None,
    ) -> list[Answer]:
        began = time.perf_counter()
        device = self.loaded.device
        loop = self.generation in ("graph", "loop")
        # The engine's loop encodes the frames itself (models.vision_encoder).
        encoded = loop and self.encoder is not None and all(p.vision for p in batch)
        skip = ("pixel_values", "image_grid_thw") if encoded else ()
        inputs = self.collate(batch, device, skip)
        inputs = {k: v.to(device, non_blocking=True) for k, v in inputs.items()}
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.loaded.compute_dtype)
        if loop:
            return self._run_loop(batch, inputs, answer_tokens, began, encoded, upcoming)
        return self._run_generate(batch, inputs, answer_tokens, began)

    def _run_loop(
        self, batch, inputs, answer_tokens: int, began: float, encoded: bool, upcoming
    ) -> list[Answer]:
        """The engine's own decode loop (models.decode_loop), captured on CUDA; with
        `encoded`, the vision tower run here, and the next videos' while this batch
        decodes."""
        import torch

        if self._loop is None:
            stop_ids = _stop_ids(self.loaded)
            pad_id = self.loaded.processor.tokenizer.pad_token_id
            graphs = self.generation == "graph"
            pool = torch.cuda.graph_pool_handle() if graphs else None
            prefill = None
            if self.config.prefill == "fused":
                from models.fused_prefill import FusedPrefill

                prefill = FusedPrefill(self.loaded.model)
            self._loop = DecodeLoop(
                self.loaded.model,
                stop_ids=stop_ids,
                pad_id=pad_id,
                graphs=graphs,
                pool=pool,
                prefill=prefill,
            )
        grammar = None
        if self.grammar is not None:
            grammar = self.grammar.masks([p.frames for p in batch])
        prompt_len = inputs["input_ids"].shape[1]
        rows, row_tokens = len(batch), prompt_len + answer_tokens
        between_steps = None
        # Features encoded ahead are this batch's own memory, as if it made them itself.
        held = self.encoder.feature_bytes(batch) if encoded else 0
        measured = self.memory.measured(rows, row_tokens, held)
        with self._lock, torch.inference_mode(), measured:
            if encoded:
                self.encoder.encode(batch)
                inputs["mm_encoder_outputs"] = {"image": self.encoder.outputs(batch)}
                if upcoming is not None:
                    between_steps = self.encoder.ahead(upcoming, self.batch_size)
            collated = time.perf_counter()
            result = self._loop.run(
                inputs,
                answer_tokens=answer_tokens,
                max_answer_tokens=max(answer_tokens, self.answer_tokens),
                min_new_tokens=self.min_new_tokens,
                grammar=grammar,
                prefill_chunk=self.prefill_chunk,
                compute_dtype=self.loaded.compute_dtype,
                stop_after=self._stop_after(batch),
                between_steps=between_steps,
            )
            inputs.pop("mm_encoder_outputs", None)
            for prepared in batch:  # their features are in the cache now
                prepared.encoded = None
            if between_steps is not None:
                self.encoder.finish_ahead()
        if self._loop.failure and self.generation == "graph":
            # Logged once by the loop, with the reason; later batches take HF generate.
            self.generation = "generate"
        elapsed = time.perf_counter() - began
        first_s = collated - began + result.prefill_s
        path = "graph" if result.graphs else "loop"
        self._timed(
            BatchTiming(
                rows, elapsed, first_s, result.steps, path, result.buckets, result.prefill_peak
            )
        )
        log.info(
            "batch of %d x %d tokens in %.2f s (first token %.2f s, %d steps, buckets %s)",
            rows,
            prompt_len,
            elapsed,
            first_s,
            result.steps,
            result.buckets,
        )
        prompt_tokens = inputs["attention_mask"].sum(dim=1).tolist()
        return self._decode(result.tokens, prompt_tokens, elapsed, finished=result.finished)

    def _timed(self, timing: BatchTiming) -> None:
        self.timings.append(timing)
        del self.timings[:-64]

    def _stop_after(self, batch: list[Prepared]) -> list[int] | None:
        if self.answer_lengths is None:
            return None
        return [self.answer_lengths.get(id(p), self.answer_tokens) for p in batch]

    def _run_generate(self, batch, inputs, answer_tokens: int, began: float) -> list[Answer]:
        """HF `generate`: the CPU's path, and the fallback where capture fails."""
        import torch

        prompt_len = inputs["input_ids"].shape[1]
        options: dict[str, Any] = {
            "max_new_tokens": answer_tokens,
            "min_new_tokens": self.min_new_tokens or None,
            "do_sample": False,
        }
        if self.grammar is not None:
            frames = [p.frames for p in batch]
            options.update(self.grammar.generate_options(frames))
        if self.static_cache:
            options["cache_implementation"] = "static"
        if self.prefill_chunk and prompt_len > self.prefill_chunk:
            # transformers runs the vision encoder once, then the prompt in chunks.
            options["prefill_chunk_size"] = self.prefill_chunk
        if self.compile:
            from transformers import CompileConfig

            options["compile_config"] = CompileConfig(mode=self.compile)
        else:
            options["disable_compile"] = True
        first = _FirstToken(began, synchronise=self.on_cuda)
        options["stopping_criteria"] = [*options.get("stopping_criteria", []), first]
        if (forced := self._stop_after(batch)) is not None:
            options["stopping_criteria"].append(_StopAfter(forced, prompt_len))
        rows, row_tokens = len(batch), prompt_len + answer_tokens
        with self._lock, torch.inference_mode(), self.memory.measured(rows, row_tokens):
            out = self.loaded.model.generate(**inputs, **options)
            new = out[:, prompt_len:].cpu()
        elapsed = time.perf_counter() - began
        self._timed(BatchTiming(rows, elapsed, first.seconds, new.shape[1] - 1, "generate"))
        log.info("batch of %d x %d tokens in %.2f s", len(batch), prompt_len, elapsed)
        prompt_tokens = inputs["attention_mask"].sum(dim=1).tolist()
        return self._decode(new.tolist(), prompt_tokens, elapsed, forced=forced)

    def _decode(
        self,
        rows: list[list[int]],
        prompt_tokens: list[int],
        elapsed: float,
        *,
        finished: list[bool] | None = None,
        forced: list[int] | None = None,
    ) -> list[Answer]:
        """Each row's answer: its tokens up to the first stop token. `finished`: which rows
        ended (the engine's loop knows, its rows unpadded); else (HF `generate`, which pads
        a row only after it ended) a row ended where it holds a stop token or padding (the
        padding may be Qwen's `<|endoftext|>`, itself a stop token) or reached the length
        `forced` on it (the benchmarks' answer lengths; that padding is no token of the
        model's)."""
        tokenizer = self.loaded.processor.tokenizer
        stop_ids = set(_stop_ids(self.loaded))
        answers = []
        for i, (row, tokens_in) in enumerate(zip(rows, prompt_tokens, strict=True)):
            kept = []
            for token in row:
                if token in stop_ids:
                    break
                kept.append(token)
            if finished is not None:
                ended = finished[i]
            else:
                ended = len(kept) < len(row) or (forced is not None and len(kept) >= forced[i])
            # the stop token the model chose counts among its tokens
            chose_stop = len(kept) < len(row) and (forced is None or len(kept) < forced[i])
            text = tokenizer.decode(kept, skip_special_tokens=True)
            tokens_out = len(kept) + int(chose_stop)
            answers.append(Answer(text, int(tokens_in), tokens_out, elapsed, len(rows), ended))
        return answers


class _FirstToken:
    """A stopping criterion that never stops: it notes when the first token was chosen."""

    def __init__(self, began: float, *, synchronise: bool):
        self.began, self.synchronise = began, synchronise
        self.seconds = 0.0

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        if not self.seconds:
            if self.synchronise:
                torch.cuda.synchronize(input_ids.device)
            self.seconds = time.perf_counter() - self.began
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


class _StopAfter:
    """Benchmarks: each row stops after its own number of answer tokens."""

    def __init__(self, lengths: list[int], prompt_len: int):
        self.lengths, self.prompt_len = lengths, prompt_len
        self._limits = None

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        if self._limits is None:
            self._limits = torch.tensor(self.lengths, device=input_ids.device)
        return input_ids.shape[1] - self.prompt_len >= self._limits


def report_grammar(loaded: LoadedModel) -> ReportGrammar:
    """The report grammar compiled for this model's tokenizer (one per process)."""
    from models.decoding import ReportGrammar

    vocab = loaded.model.config.get_text_config().vocab_size
    return ReportGrammar(loaded.processor.tokenizer, vocab, _stop_ids(loaded))


def _stop_ids(loaded: LoadedModel) -> list[int]:
    """Every token a row stops at: the model's generation config's end-of-sequence ids."""
    return _as_list(loaded.model.generation_config.eos_token_id)


def _as_list(value) -> list[int]:
    if value is None:
        return []
    return list(value) if isinstance(value, list | tuple) else [value]
