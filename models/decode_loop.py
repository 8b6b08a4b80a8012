"""The engine's own greedy decode loop over a static KV cache, with one CUDA graph per
batch-size bucket.

`generate` (HF) spends most of a decode step in Python: about 70 ms at 128 rows, against
about 28 ms for the same step's kernels. Here the prompt is prefilled by the model's own
forward (HF `generate` for one token: chunked, the vision tower run once), and then each
step is one forward of the text decoder over fixed buffers:

- the cache: one static cache for the batch, `rows` x (prompt width + answer room); the
  bucket of the live rows reads the first `bucket` rows of every buffer (views);
- inputs: the last chosen token per row, its multimodal position (4 x rows, one step on
  from the prompt's last), and a 4-D attention mask over the cache slots (the rows' real
  prompt slots and their answer so far), all updated in place between steps.

On CUDA the step of each bucket is captured once as a CUDA graph (after one eager step of
that bucket, which serves as the warm-up) and replayed; on the CPU (and where capture
fails, logged once with the reason) the same step runs eagerly. Between replays: the
grammar's masks (filled while the step ran) are applied, the
argmax is taken, rows that chose a stop token stop, and when the live rows fit a smaller
bucket they are moved to the front of every buffer (one gather per layer) so finished rows
stop costing. A batch that reaches the end of its answer room with rows still writing (the
grammar's rare long answers) continues those rows in a larger cache from where they
stopped, instead of describing them again from the prompt.

Knows nothing of videos, queues or SQL: `models.runner` prepares the batch and calls it.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import logging
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

from models.errors import one_line

log = logging.getLogger(__name__)

_NEG_INF = float("-inf")


@dataclass
class LoopResult:
    """Per row (in the batch's order) the tokens chosen, and the loop's timing."""

    tokens: list[list[int]]
    finished: list[bool]  # the row chose a stop token (else: it ran out of answer room)
    prefill_s: float = 0.0  # prompt in, first token chosen (the device synchronised)
    prefill_peak: int = 0  # CUDA: the most memory allocated by then (bytes)
    steps: int = 0  # decode steps after the first token
    buckets: list[int] = field(default_factory=list)  # the bucket of each run of steps
    graphs: bool = False  # the steps were captured and replayed (no capture failed)


def buckets_for(rows: int) -> list[int]:
    """The batch sizes a batch of `rows` may be compacted to: powers of two below it, and
    itself (a batch starts at its own size, never padded)."""
    sizes = {rows}
    size = 1
    while size < rows:
        sizes.add(size)
        size *= 2
    return sorted(sizes)


def _bucket_for(sizes: list[int], rows: int) -> int:
    """The smallest bucket that holds `rows` live rows."""
    return min(b for b in sizes if b >= rows)


class _Step:
    """One bucket's decode step over views of the batch's buffers; captured on CUDA."""

    def __init__(self, loop: DecodeLoop, size: int):
        self.loop = loop
        state = loop.state
        self.cache = _view_cache(state.cache, size)
        self.kwargs = {
            "input_ids": state.input_ids[:size],
            "attention_mask": state.mask[:size],
            "position_ids": state.positions[:, :size],
            "cache": self.cache,
            "use_cache": True,
            "logits_to_keep": 1,
        }
        self.graph = None
        self.logits = None
        self.eager_steps = 0

    def __call__(self):
        """Run one step; returns this bucket's logits (size x vocab)."""
        import torch

        loop = self.loop
        if self.graph is not None:
            self.graph.replay()
            return self.logits[:, -1]
        self.eager_steps += 1
        if not (loop.use_graphs and self.eager_steps == 1):
            return loop.model(**self.kwargs).logits[:, -1]
        # This bucket's first step is eager, on the capture stream: it is the warm-up that
        # PyTorch asks for (cuBLAS and the allocator set up for that stream outside the
        # capture), and a real step. The next is captured, and replayed from then on.
        try:
            stream, current = loop.capture_stream(), torch.cuda.current_stream()
        except Exception as e:  # no stream, no capture: this batch goes on eagerly
            loop.capture_failed(e)
            return loop.model(**self.kwargs).logits[:, -1]
        stream.wait_stream(current)
        with torch.cuda.stream(stream):
            out = loop.model(**self.kwargs).logits
        current.wait_stream(stream)
        out.record_stream(current)
        try:
            graph = torch.cuda.CUDAGraph()
            # thread_local: the feeders' threads keep pinning host memory meanwhile, which
            # the default (global) mode forbids any thread while a capture is under way.
            with torch.cuda.graph(
                graph, pool=loop.pool, stream=stream, capture_error_mode="thread_local"
            ):
                logits = loop.model(**self.kwargs).logits
            self.graph, self.logits = graph, logits
        except Exception as e:  # the eager step stays correct, only slower
            loop.capture_failed(e)
        return out[:, -1]


@dataclass
class _State:
    """The batch's device buffers (rows of the largest bucket; live rows at the front)."""

    cache: Any
    input_ids: Any  # (rows, 1) long: the token each row feeds the next step
    positions: Any  # (4, rows, 1) long: text, temporal, height, width positions
    mask: Any  # (rows, 1, 1, slots) bool: the cache slots each row attends to
    slot: int  # the cache slot the next step writes


class DecodeLoop:
    """Decodes one prefilled batch greedily; see the module's docstring.

    `model`: the loaded Qwen3-VL; `stop_ids`/`pad_id`: the stop tokens and the padding
    token; `graphs`: capture each bucket's step (CUDA only); `pool`: the graph memory pool
    shared by every bucket of the process (its graphs replay one at a time); `prefill`: a
    context put around each prefill (models.fused_prefill), or None."""

    def __init__(
        self,
        model,
        *,
        stop_ids: list[int],
        pad_id: int,
        graphs: bool,
        pool=None,
        prefill: Callable[[], AbstractContextManager] | None = None,
    ):
        self.model = model
        self.prefill = prefill or contextlib.nullcontext
        self.stop_ids = stop_ids
        self.pad_id = pad_id
        self.use_graphs = graphs
        self.pool = pool
        self.failure: str | None = None  # why capture failed, once (the runner falls back)
        self.state: _State | None = None
        self._stream = None

    def capture_stream(self):
        """The side stream every bucket's step is warmed up and captured on."""
        import torch

        if self._stream is None:
            self._stream = torch.cuda.Stream()
        return self._stream

    def capture_failed(self, error: Exception) -> None:
        self.use_graphs = False
        self.failure = one_line(error)
        log.warning("CUDA graph capture of the decode step failed (%s); eager", self.failure)

    def run(self, inputs: dict[str, Any], **options) -> LoopResult:
        """Greedy answers for a collated batch (`inputs`: input_ids, attention_mask,
        position_ids (4 x rows x width), mm_token_type_ids, pixel_values, image_grid_thw,
        on the device; the frames as pixels, or as the vision tower's features in
        `mm_encoder_outputs`). Room for `answer_tokens` first; rows still writing then continue
        up to `max_answer_tokens`. `grammar`: the batch's GrammarMasks, or None.
        `stop_after` (benchmarks): each row stops after this many tokens, as if it had
        chosen a stop token there. `between_steps()` is called once a step, while the
        step runs on the device (the runner encodes the next batch's frames there)."""
        try:
            return self._run(inputs, **options)
        finally:
            self.state = None  # the cache goes with the batch (on out-of-memory too)

    def _run(
        self,
        inputs: dict[str, Any],
        *,
        answer_tokens: int,
        max_answer_tokens: int,
        min_new_tokens: int = 0,
        grammar=None,
        prefill_chunk: int = 0,
        compute_dtype=None,
        stop_after: list[int] | None = None,
        between_steps=None,
    ) -> LoopResult:
        import torch

        began = time.perf_counter()
        rows, width = inputs["input_ids"].shape
        device = inputs["input_ids"].device
        self.state = self._allocate(rows, width + answer_tokens, device, compute_dtype)
        first = self._prefill(inputs, min_new_tokens, grammar, prefill_chunk)
        state = self.state
        state.mask[:rows, 0, 0, :width] = inputs["attention_mask"].bool()
        state.mask[:rows, 0, 0, width] = True  # the first answer token's own slot
        # One on from each row's last prompt position, for each of the 4 position kinds.
        state.positions[:, :rows] = inputs["position_ids"][..., -1:] + 1
        state.input_ids[:rows, 0] = first
        first = first.tolist()  # synchronises: the prefill is done
        result = LoopResult([[t] for t in first], [t in self.stop_ids for t in first])
        if stop_after is not None:
            result.finished = [f or stop_after[i] <= 1 for i, f in enumerate(result.finished)]
        result.prefill_s = time.perf_counter() - began
        if device.type == "cuda":
            result.prefill_peak = torch.cuda.max_memory_allocated(device)
        live = [i for i in range(rows) if not result.finished[i]]  # original rows still writing
        order = list(range(rows))  # order[k]: the original row at buffer position k
        steps: dict[int, _Step] = {}
        sizes, bucket, room, written = buckets_for(rows), rows, answer_tokens, 1
        # A step launched before the previous one's tokens reached the host (its logits).
        launched = None
        picks = _Picks(rows, device)
        while live:
            if launched is not None:  # the same bucket and layout as the step before
                logits, launched = launched, None
            else:
                keep = None
                if written >= room:
                    if room >= max_answer_tokens:
                        break
                    # Rows still writing at the end of the room: continue them, from where
                    # they stopped, in a cache with room for the longest answer.
                    keep = [order.index(i) for i in live]
                    room = max_answer_tokens
                    self._grow(keep, width + room, compute_dtype)
                    state, steps = self.state, {}
                    bucket = len(keep)
                    sizes = buckets_for(bucket)
                else:
                    smaller = _bucket_for(sizes, len(live))
                    if smaller < bucket:
                        keep = [order.index(i) for i in live]
                        self._compact(keep)
                        bucket = smaller
                if keep is not None:
                    order = [order[k] for k in keep]
                    if grammar is not None:
                        grammar.keep(keep)
                if bucket not in steps:
                    steps[bucket] = _Step(self, bucket)
                    result.buckets.append(bucket)
                logits = steps[bucket]().float()
            if min_new_tokens and written < min_new_tokens:
                logits[:, self.stop_ids] = _NEG_INF
            n = len(order)
            if grammar is not None:
                grammar(None, logits[:n])
            chosen = logits.argmax(dim=-1)
            # The next step's inputs, queued behind this one's argmax.
            state.input_ids[:bucket, 0] = chosen
            state.slot += 1
            state.positions[:, :bucket] += 1
            if state.slot < state.mask.shape[-1]:
                state.mask[:bucket, 0, 0, state.slot] = True
            written += 1
            result.steps += 1
            # Launch the next step now, before this one's tokens reach the host, so the
            # device runs it while the host does its bookkeeping (the grammar's matchers,
            # the rows' answers): unless the rows still writing would fit a smaller bucket
            # or the answer room is full (both change the buffers first). A row that stops
            # here costs that one more step, whose token is ignored.
            if written < room and _bucket_for(sizes, len(live)) == bucket:
                picks.send(chosen[:n])
                launched = steps[bucket]().float()
            if between_steps is not None:
                between_steps()
            # The one synchronisation of a step.
            picked = picks.receive() if launched is not None else chosen[:n].tolist()
            if grammar is not None:  # rows already finished are ignored by their matchers
                # Filled here while the device runs the next step; on the background
                # thread when none is launched (the buffers change first).
                grammar.accept(picked, fill_now=launched is not None)
            live = self._record(picked, order, result, stop_after)
        result.graphs = self.use_graphs  # False once a capture failed
        return result

    def _record(self, picked, order, result: LoopResult, stop_after) -> list[int]:
        """Each live row's new token; returns the rows (original indices) still writing."""
        live = []
        for k, token in enumerate(picked):
            row = order[k]
            if result.finished[row]:
                continue
            result.tokens[row].append(token)
            long_enough = stop_after is not None and len(result.tokens[row]) >= stop_after[row]
            if token in self.stop_ids or long_enough:
                result.finished[row] = True
            else:
                live.append(row)
        return live

    # -- buffers --------------------------------------------------------------------------

    def _allocate(self, rows: int, slots: int, device, dtype, *, now: bool = False) -> _State:
        """Buffers for `rows` rows of `slots` cache slots. The cache itself is allocated by
        the prefill, layer by layer as it reaches them (as `generate` does), unless `now`:
        so the vision tower's activations never coincide with the whole cache."""
        import torch
        from transformers import StaticCache

        cache = StaticCache(config=self.model.config, max_cache_len=slots)
        layer = _filled_layer()
        if all(type(x) is layer.__base__ for x in cache.layers):
            cache.layers = [layer(max_cache_len=slots) for _ in cache.layers]
        if now:
            text = self.model.config.get_text_config()
            head_dim = getattr(text, "head_dim", text.hidden_size // text.num_attention_heads)
            cache.early_initialization(rows, text.num_key_value_heads, head_dim, dtype, device)
        return _State(
            cache=cache,
            input_ids=torch.full((rows, 1), self.pad_id, dtype=torch.long, device=device),
            positions=torch.zeros((4, rows, 1), dtype=torch.long, device=device),
            mask=torch.zeros((rows, 1, 1, slots), dtype=torch.bool, device=device),
            slot=0,
        )

    def _prefill(self, inputs, min_new_tokens: int, grammar, prefill_chunk: int):
        """The prompt into the cache and each row's first token: the model's own forward,
        through `generate` for one token (chunked, vision tower once)."""
        width = inputs["input_ids"].shape[1]
        options: dict[str, Any] = {
            "max_new_tokens": 1,
            "do_sample": False,
            "disable_compile": True,
            "cache": self.state.cache,  # the batch's own size: no view
        }
        if min_new_tokens:
            options["min_new_tokens"] = 1
        if grammar is not None:
            options["logits_processor"] = [grammar]
            options["stopping_criteria"] = [grammar.after_step]
        if prefill_chunk and width > prefill_chunk:
            options["prefill_chunk_size"] = prefill_chunk
        _prefilling(self.state.cache, True)
        try:
            with self.prefill():
                out = self.model.generate(**inputs, **options)
        finally:
            _prefilling(self.state.cache, False)
        self.state.slot = width
        return out[:, width]

    def _compact(self, keep: list[int]) -> None:
        """Move the rows at buffer positions `keep` (ascending) to the front, in place."""
        import torch

        state = self.state
        index = torch.tensor(keep, device=state.input_ids.device)
        n = len(keep)
        for layer in state.cache.layers:
            layer.keys[:n] = layer.keys.index_select(0, index)
            layer.values[:n] = layer.values.index_select(0, index)
        state.input_ids[:n] = state.input_ids.index_select(0, index)
        state.positions[:, :n] = state.positions.index_select(1, index)
        state.mask[:n] = state.mask.index_select(0, index)

    def _grow(self, keep: list[int], slots: int, dtype) -> None:
        """A new state for the rows at `keep`, with `slots` cache slots, continuing them."""
        import torch

        old = self.state
        device = old.input_ids.device
        index = torch.tensor(keep, device=device)
        new = self._allocate(len(keep), slots, device, dtype, now=True)
        used = old.mask.shape[-1]
        for src, dst in zip(old.cache.layers, new.cache.layers, strict=True):
            dst.keys[:, :, :used] = src.keys.index_select(0, index)
            dst.values[:, :, :used] = src.values.index_select(0, index)
            dst.cumulative_length.copy_(src.cumulative_length)
        new.input_ids.copy_(old.input_ids.index_select(0, index))
        new.positions.copy_(old.positions.index_select(1, index))
        new.mask[..., :used] = old.mask.index_select(0, index)
        new.slot = old.slot
        new.mask[:, 0, 0, new.slot] = True  # the next step's own slot, past the old room
        self.state = None
        del old
        self.state = new


@functools.cache
def _filled_layer():
    """transformers' static cache layer, except that while `prefilling` it gives attention
    only the slots written so far: each chunk of a prompt then attends over the chunks
    before it and itself, not over the whole cache (about 2,300 slots at 8 frames, most
    of them still empty and masked). Decode steps see every slot, as the captured graphs
    need (fixed shapes)."""
    from transformers.cache_utils import StaticLayer

    class FilledLayer(StaticLayer):
        prefilling = False
        filled = 0  # slots written while prefilling (the prompt goes in from slot 0)

        def update(self, key_states, value_states, *args, **kwargs):
            keys, values = super().update(key_states, value_states, *args, **kwargs)
            if not self.prefilling:
                return keys, values
            self.filled += key_states.shape[-2]
            return keys[:, :, : self.filled], values[:, :, : self.filled]

        def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
            if not self.prefilling:
                return super().get_mask_sizes(query_length)
            return self.filled + query_length, 0

    return FilledLayer


def _prefilling(cache, on: bool) -> None:
    for layer in cache.layers:
        if hasattr(layer, "prefilling"):
            layer.prefilling = on


class _Picks:
    """The chosen tokens on their way to the host without waiting for later work on the
    stream: copied into pinned memory behind the argmax, then waited for by an event (on
    CUDA); on the CPU, at once."""

    def __init__(self, rows: int, device):
        import torch

        self.cuda = device.type == "cuda"
        self.host = torch.empty(rows, dtype=torch.long, pin_memory=self.cuda)
        self.event = torch.cuda.Event() if self.cuda else None
        self.n = 0

    def send(self, chosen) -> None:
        self.n = len(chosen)
        self.host[: self.n].copy_(chosen, non_blocking=self.cuda)
        if self.cuda:
            self.event.record()

    def receive(self) -> list[int]:
        if self.cuda:
            self.event.synchronize()
        return self.host[: self.n].tolist()


def _view_cache(cache, rows: int):
    """A cache object over the first `rows` rows of `cache`'s buffers (shared lengths)."""
    if rows == cache.layers[0].keys.shape[0]:
        return cache
    view = copy.copy(cache)
    view.layers = []
    for layer in cache.layers:
        part = copy.copy(layer)
        part.keys, part.values = layer.keys[:rows], layer.values[:rows]
        part.batch_size = rows
        view.layers.append(part)
    return view
