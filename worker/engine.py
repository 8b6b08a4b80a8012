"""The describe engine: sampled videos in, model answers out, batched on one device.

Work is split in two so the GPU never waits on the CPU:
- `prepare` (any thread, CPU only): chat template, tokenisation and image preprocessing
  of one video into CPU tensors. Celery task threads or the benchmark's feeders run it
  while the device is busy with the previous batch.
- `generate` (the device thread): pads prepared videos into batches (left padding, one
  static KV cache), runs greedy `generate`, and cuts each row at its own stop token.
  The batch is bounded by `batch_size` and by what the GPU memory (and an optional cap)
  holds; a CUDA out-of-memory error halves the batch and retries instead of failing it.

One Engine per worker process, never per task (see worker/app.py).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from models.loader import LoadedModel, load_describer
from models.prompt import PROMPT_VERSION, build_messages
from worker.errors import EngineError
from worker.settings import Settings

if TYPE_CHECKING:  # PyAV is not needed to run the model
    from worker.video import SampledVideo

log = logging.getLogger(__name__)

# Token-level tensors that are padded on the left; everything else is concatenated.
_PADDED = ("input_ids", "attention_mask", "mm_token_type_ids")
# Memory kept free for the allocator's fragmentation and CUDA's own needs.
_HEADROOM = 0.85
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
class Prepared:
    """One video's model inputs on the CPU, ready to be padded into a batch."""

    tensors: dict[str, Any]  # input_ids etc. of shape (1, n); pixel_values; image_grid_thw
    frames: int = 1  # sampled frames: bounds the hazards' frame index in the grammar

    @property
    def tokens(self) -> int:
        return int(self.tensors["input_ids"].shape[1])


class Engine:
    """Holds the loaded model; `describe` runs a list of videos in batches."""

    def __init__(
        self,
        loaded: LoadedModel,
        *,
        max_new_tokens: int,
        batch_size: int,
        memory_gib: float = 0.0,
        static_cache: bool | None = None,
        compile: str = "",
        min_new_tokens: int = 0,
        constrained: bool = True,
        prefill_chunk: int = 0,
        first_pass_tokens: int = 0,
    ):
        self.loaded = loaded
        # Benchmarks force a fixed answer length; never under the grammar, where it would
        # force tokens past the closing brace.
        self.min_new_tokens = 0 if constrained else min_new_tokens
        self.batch_size = batch_size
        self.prompt_version = PROMPT_VERSION
        self.on_cuda = loaded.device.startswith("cuda")
        # A static cache is allocated once per batch shape instead of growing by a concat at
        # every step; on the CPU the dynamic cache is as fast and uses less memory.
        self.static_cache = self.on_cuda if static_cache is None else static_cache
        # torch.compile mode of the decode step ("default", "reduce-overhead"); "" = eager.
        self.compile = "" if compile in ("", "off") else compile
        self.prefill_chunk = prefill_chunk
        # Schema-constrained decoding (models/grammar.py): every answer is a valid report.
        self.grammar = _report_grammar(loaded) if constrained else None
        # The longest answer a batch may need room for (static cache, memory sizing): under
        # the grammar, never less than its longest admitted answer, so none is cut off.
        self.answer_tokens = max_new_tokens
        if constrained:
            from models.grammar import MAX_FRAMES, worst_case_chars

            self.answer_tokens = max(max_new_tokens, worst_case_chars(MAX_FRAMES) + 1)
        # Under the grammar, batches first run with room for this many answer tokens (0: the
        # whole bound). The few answers still being written then are described again, with
        # room for the whole bound: so memory is sized for real answers, not the longest
        # admitted, and an answer that runs long no longer holds its whole batch.
        self.first_pass_tokens = self.answer_tokens
        if constrained and 0 < first_pass_tokens < self.answer_tokens:
            self.first_pass_tokens = first_pass_tokens
        self._lock = threading.Lock()  # one generate at a time on the device
        self._bytes_per_token: float | None = None  # measured after each batch
        # The most GPU memory any batch has used (weights included), since the last reset.
        self.peak_memory = 0
        self._oom_limit: int | None = None  # a batch size that ran out of memory, halved
        self._memory_cap = apply_memory_cap(loaded.device, memory_gib) if self.on_cuda else 0
        if self.compile and loaded.quant == "nf4":
            _allow_compiling_nf4(loaded.model)

    @property
    def model_id(self) -> str:
        return self.loaded.model_id

    @property
    def adapter(self) -> str:
        return self.loaded.adapter

    @classmethod
    def from_settings(cls, settings: Settings) -> Engine:
        loaded = load_describer(settings.model, quant=settings.quant, adapter=settings.adapter)
        return cls(
            loaded,
            max_new_tokens=settings.max_new_tokens,
            batch_size=settings.batch_size,
            memory_gib=settings.gpu_memory_gib,
            compile=settings.compile,
            min_new_tokens=settings.min_new_tokens,
            constrained=settings.constrained,
            prefill_chunk=settings.prefill_chunk,
            first_pass_tokens=settings.first_pass_tokens,
        )

    # -- CPU side -------------------------------------------------------------------------

    def prepare(self, video: SampledVideo) -> Prepared:
        """Tokenise and preprocess one video's frames (CPU only; safe from any thread)."""
        processor = self.loaded.processor
        text = processor.apply_chat_template(
            build_messages(video.timestamps), tokenize=False, add_generation_prompt=True
        )
        inputs = processor(text=[text], images=list(video.frames), return_tensors="pt")
        return Prepared(dict(inputs), frames=len(video.timestamps))

    def collate(self, batch: list[Prepared]) -> dict[str, Any]:
        """Left-pad token tensors to one length; concatenate the frames' pixel tensors."""
        import torch

        pad_id = self.loaded.processor.tokenizer.pad_token_id
        width = max(p.tokens for p in batch)
        if self.static_cache:
            width = math.ceil(width / _PAD_MULTIPLE) * _PAD_MULTIPLE
        out: dict[str, Any] = {}
        for key in batch[0].tensors:
            parts = [p.tensors[key] for p in batch]
            if key in _PADDED:
                fill = pad_id if key == "input_ids" else 0
                rows = [
                    torch.nn.functional.pad(t, (width - t.shape[1], 0), value=fill) for t in parts
                ]
                out[key] = torch.cat(rows)
            else:
                out[key] = torch.cat(parts)
        return out

    # -- device side ----------------------------------------------------------------------

    def describe(self, videos: list[SampledVideo]) -> list[Answer]:
        """One answer per video, in order (prepares on this thread, then generates)."""
        return self.generate([self.prepare(v) for v in videos])

    def generate(
        self, prepared: list[Prepared], ready: Callable[[int, Answer], None] | None = None
    ) -> list[Answer]:
        """Answers for prepared videos, in order, in as few batches as memory allows.

        Under the grammar, answers still going after the first pass are described again
        with room for the whole bound; `ready(i, answer)` gets each finished answer of the
        first pass before that, so its caller need not wait for the second pass."""
        answers = self._in_batches(prepared, self.first_pass_tokens)
        long = [i for i, a in enumerate(answers) if not a.finished]
        if not long or self.first_pass_tokens == self.answer_tokens:
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

    def _in_batches(self, prepared: list[Prepared], answer_tokens: int) -> list[Answer]:
        answers: list[Answer] = []
        start = 0
        while start < len(prepared):
            size = self.batch_limit(max(p.tokens for p in prepared[start:]), answer_tokens)
            answers += self._generate_or_split(prepared[start : start + size], answer_tokens)
            start += size
        return answers

    def batch_limit(self, tokens: int, answer_tokens: int | None = None) -> int:
        """How many videos of about `tokens` prompt tokens one batch may hold, each with
        room for `answer_tokens` (default: the first pass's)."""
        limit = min(self.batch_size, self._oom_limit or self.batch_size)
        if not self.on_cuda:
            return limit
        import torch

        device = self.loaded.device
        free, _ = torch.cuda.mem_get_info(device)
        usable = free + torch.cuda.memory_reserved(device)  # the allocator's cache is reusable
        if self._memory_cap:
            usable = min(usable, self._memory_cap)
        budget = usable * _HEADROOM - torch.cuda.memory_allocated(device)
        per_token = self._bytes_per_token or _estimated_bytes_per_token(self.loaded)
        per_video = per_token * (tokens + (answer_tokens or self.first_pass_tokens))
        return max(1, min(limit, int(budget // per_video)))

    def _generate_or_split(self, batch: list[Prepared], answer_tokens: int) -> list[Answer]:
        import torch

        out_of_memory = False
        try:
            return self._generate(batch, answer_tokens)
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
        if self.on_cuda:
            torch.cuda.empty_cache()
        if len(batch) == 1:
            raise EngineError(
                f"out of GPU memory for a single video ({batch[0].tokens} prompt tokens)"
            )
        half = len(batch) // 2
        self._oom_limit = min(half, self._oom_limit or half)
        log.warning("out of GPU memory at batch %d; now at most %d", len(batch), half)
        answers: list[Answer] = []
        while len(answers) < len(batch):  # the limit may drop again on the way
            start = len(answers)
            part = batch[start : start + self._oom_limit]
            answers += self._generate_or_split(part, answer_tokens)
        return answers

    def _generate(self, batch: list[Prepared], answer_tokens: int) -> list[Answer]:
        import torch

        began = time.perf_counter()
        inputs = self.collate(batch)
        device = self.loaded.device
        inputs = {k: v.to(device, non_blocking=True) for k, v in inputs.items()}
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.loaded.compute_dtype)
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
        with self._lock, torch.inference_mode():
            if self.on_cuda:
                torch.cuda.reset_peak_memory_stats(device)
                base = torch.cuda.memory_allocated(device)
            out = self.loaded.model.generate(**inputs, **options)
            new = out[:, prompt_len:].cpu()
            if self.on_cuda:
                self._learn_memory(base, len(batch), prompt_len + answer_tokens)
        elapsed = time.perf_counter() - began
        log.info("batch of %d x %d tokens in %.2f s", len(batch), prompt_len, elapsed)
        return self._decode(new, inputs["attention_mask"].sum(dim=1).tolist(), elapsed)

    def _learn_memory(self, base: int, rows: int, row_tokens: int) -> None:
        """Remember the peak bytes a batch used per token, to size the next batches."""
        import torch

        total = torch.cuda.max_memory_allocated(self.loaded.device)
        self.peak_memory = max(self.peak_memory, total)
        peak = total - base
        per_token = peak / (rows * row_tokens)
        self._bytes_per_token = max(per_token, self._bytes_per_token or 0.0)
        log.info(
            "batch of %d: peak %.2f GiB, %.2f above the weights", rows, total / 2**30, peak / 2**30
        )

    def _decode(self, new, prompt_tokens: list[int], elapsed: float) -> list[Answer]:
        tokenizer = self.loaded.processor.tokenizer
        stop_ids = set(_as_list(self.loaded.model.generation_config.eos_token_id))
        pad_id = tokenizer.pad_token_id
        answers = []
        for row, tokens_in in zip(new.tolist(), prompt_tokens, strict=True):
            kept = []
            for token in row:
                if token in stop_ids:
                    break
                kept.append(token)
            stopped = len(kept) < len(row) and row[len(kept)] != pad_id
            text = tokenizer.decode(kept, skip_special_tokens=True)
            answers.append(
                Answer(text, int(tokens_in), len(kept) + int(stopped), elapsed, len(new), stopped)
            )
        return answers


def _report_grammar(loaded: LoadedModel):
    from models.grammar import ReportGrammar

    vocab = loaded.model.config.get_text_config().vocab_size
    return ReportGrammar(loaded.processor.tokenizer, vocab)


def _estimated_bytes_per_token(loaded: LoadedModel) -> float:
    """Before the first batch is measured: KV cache plus prefill activations, per token."""
    import torch

    text = loaded.model.config.get_text_config()
    size = torch.finfo(loaded.compute_dtype).bits // 8
    head_dim = getattr(text, "head_dim", text.hidden_size // text.num_attention_heads)
    kv = 2 * text.num_hidden_layers * text.num_key_value_heads * head_dim * size
    activations = 2 * (3 * text.intermediate_size + 8 * text.hidden_size) * size
    return float(kv + activations)


def apply_memory_cap(device: str, memory_gib: float) -> int:
    """Cap this process's CUDA allocations (FLEETSCRIBE_GPU_MEMORY_GIB); 0 means the card."""
    if not memory_gib:
        return 0
    import torch

    index = torch.device(device).index
    index = torch.cuda.current_device() if index is None else index
    total = torch.cuda.get_device_properties(index).total_memory
    cap = int(memory_gib * 2**30)
    torch.cuda.set_per_process_memory_fraction(min(1.0, cap / total), index)
    return min(cap, total)


def _allow_compiling_nf4(model) -> None:
    """Let `generate` compile the decode step of a bitsandbytes 4-bit model.

    bitsandbytes (0.46 on, torch 2.8 on) registers its 4-bit matmul as torch custom ops, so
    `Linear4bit` compiles without graph breaks (bitsandbytes PR #1616); transformers' bnb
    quantizer still answers `is_compileable = False`, which makes `generate` run every
    decode step eagerly. The step then costs ~110 ms of Python at any batch size."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is None or quantizer.is_compileable:
        return
    base = type(quantizer)
    model.hf_quantizer.__class__ = type(base.__name__, (base,), {"is_compileable": True})
    log.info("compiling the decode step of the 4-bit model")


def _as_list(value) -> list[int]:
    if value is None:
        return []
    return list(value) if isinstance(value, list | tuple) else [value]


_engine: Engine | None = None
_engine_lock = threading.Lock()


def get_engine(settings: Settings) -> Engine:
    """This process's engine, loaded on first use."""
    global _engine
    with _engine_lock:
        if _engine is None:
            _engine = Engine.from_settings(settings)
        return _engine
