"""Constrained decoding: xgrammar holds every batch row to the report grammar
(`models.grammar`), with each step's masks filled off the decode path."""

from __future__ import annotations

import threading
from functools import lru_cache

from models.grammar import report_grammar


class ReportGrammar:
    """Compiles the report grammar once per frame count for one tokenizer."""

    # A batch's masks: GrammarMasks, or a subclass (a benchmark's random model ends its texts)
    masks_type: type[GrammarMasks] | None = None

    def __init__(self, tokenizer, vocab_size: int, stop_ids: list[int] | None = None):
        """`stop_ids`: every token the engine stops a row at (the model's generation config;
        by default the tokenizer's end-of-sequence token)."""
        import xgrammar as xgr

        info = _tokenizer_info(tokenizer, vocab_size, stop_ids or [tokenizer.eos_token_id])
        self._compiler = xgr.GrammarCompiler(info, max_threads=2)
        self._lock = threading.Lock()
        self._batch = None  # xgrammar's thread pool for whole-batch masks, made on first use
        self._filler = None  # the one background thread that fills the next step's masks

    def compiled(self, frames: int):
        with self._lock:
            return self._compile(frames)

    @lru_cache(maxsize=64)  # noqa: B019 - one instance per loaded model, kept for its life
    def _compile(self, frames: int):
        return self._compiler.compile_grammar(report_grammar(frames))

    def generate_options(self, frames_per_row: list[int]) -> dict[str, list]:
        """`generate` arguments for one batch: a fresh mask per row, fresh matchers."""
        masks = self.masks(frames_per_row)
        return {"logits_processor": [masks], "stopping_criteria": [masks.after_step]}

    def masks(self, frames_per_row: list[int]) -> GrammarMasks:
        """Fresh matchers and masks for one batch (the engine's own loop drives them)."""
        if self._batch is None:
            from concurrent.futures import ThreadPoolExecutor

            import xgrammar as xgr

            self._batch = xgr.BatchGrammarMatcher()
            self._filler = ThreadPoolExecutor(1, thread_name_prefix="fleetscribe-grammar")
        grammars = [self.compiled(k) for k in frames_per_row]
        return (self.masks_type or GrammarMasks)(grammars, self._batch, self._filler)


def _tokenizer_info(tokenizer, vocab_size: int, stop_ids: list[int]):
    """xgrammar's view of the tokenizer, with every stop token a stop token and the other
    special tokens never allowed.

    xgrammar takes a token for text unless it decodes to nothing: a special token such as
    Qwen's `<|endoftext|>` is printable ASCII, so a text could hold it. The engine stops a
    row at any of the model's stop tokens (`<|im_end|>` and `<|endoftext|>`): the report
    would end mid-text. The special tokens other than the stops are written as empty,
    which xgrammar never allows, and every stop token ends only a whole report."""
    import xgrammar as xgr

    stops = sorted(set(stop_ids))
    info = xgr.TokenizerInfo.from_huggingface(
        tokenizer, vocab_size=vocab_size, stop_token_ids=stops
    )
    special = {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    encoded = [""] * vocab_size
    for token, i in tokenizer.get_vocab().items():
        if i < vocab_size and (i not in special or i in stops):
            encoded[i] = token
    # the same vocabulary type, size and stop tokens, the other special tokens emptied
    return xgr.TokenizerInfo.from_vocab_and_metadata(encoded, info.dump_metadata())


class GrammarMasks:
    """Masks every row of a batch to its grammar, with the mask work off the decode path.

    The mask for step t depends only on the tokens before it, so it is computed while the
    model runs step t: `after_step` (a stopping criterion, called by `generate` right after
    each step's tokens are chosen) hands the new tokens to the rows' matchers and starts
    filling the next masks on a background thread (xgrammar releases the GIL and fills the
    rows on its own C++ threads); the logits processor (`__call__`) then only waits for
    that, copies the mask to the device and applies it. xgrammar's own HF processor
    (xgrammar.contrib.hf) does all of it in line, one row at a time, with one device sync
    per row per step."""

    def __init__(self, grammars: list, batch_matcher, filler):
        import xgrammar as xgr

        self._xgr = xgr
        self._batch = batch_matcher
        self._filler = filler
        self.matchers = [xgr.GrammarMatcher(g) for g in grammars]
        # Which rows' matchers have ended (accepted a stop token), kept here rather than
        # asked of each matcher every step: each call into xgrammar gives up the GIL, and
        # with busy threads beside (a worker's feeders) taking it back costs up to the
        # interpreter's switch interval (5 ms) a call, 128 rows a step.
        self.ended = [False] * len(grammars)
        self._stops = set(grammars[0].tokenizer_info.stop_token_ids)
        vocab = grammars[0].tokenizer_info.vocab_size
        self.bitmask = xgr.allocate_token_bitmask(len(grammars), vocab)
        self._next = None  # the Future of the next step's masks
        self.after_step = _AfterStep(self)

    def _fill(self) -> None:
        live = [i for i, ended in enumerate(self.ended) if not ended]
        if live:
            self._batch.batch_fill_next_token_bitmask(
                [self.matchers[i] for i in live], self.bitmask, live
            )

    def accept(self, tokens: list[int], *, fill_now: bool = False) -> None:
        """The tokens just chosen, one per row; starts filling the next step's masks, on the
        background thread, or with `fill_now` here (the engine's loop, whose thread has
        nothing else to do while the device runs the next step: no hand-over between two
        threads, each a wait for the GIL, on the path between one step and the next)."""
        live = [i for i, ended in enumerate(self.ended) if not ended]
        accepted = self._xgr.BatchGrammarMatcher.batch_accept_token(
            [self.matchers[i] for i in live], [tokens[i] for i in live]
        )
        if not all(accepted):
            raise RuntimeError("a token outside the grammar was chosen")
        for i in live:  # a matcher ends exactly when it accepts a stop token
            self.ended[i] = tokens[i] in self._stops
        if not fill_now:
            self._next = self._filler.submit(self._fill)
            return
        # Any fill still queued (the first step's, or after `keep`) was waited for by the
        # step that used it, so the filler thread is idle: still one thread at a time.
        self._fill()
        self._next = _DONE

    def keep(self, rows: list[int]) -> None:
        """Only the rows at these positions go on, in this order (the engine's loop moved
        them to the front of its buffers): masks from now on are for them."""
        if self._next is not None:
            self._next.result()
        self.matchers = [self.matchers[i] for i in rows]
        self.ended = [self.ended[i] for i in rows]
        self.bitmask = self.bitmask[: len(rows)]
        self._next = self._filler.submit(self._fill)

    def __call__(self, input_ids, scores):
        if self._next is None:  # the first step: nothing to overlap with
            # Still on the filler thread: one thread ever drives the batch matcher, also
            # while a finished batch's last (unused) fill runs out.
            self._next = self._filler.submit(self._fill)
        self._next.result()
        cuda = scores.device.type == "cuda"
        if cuda and not self.bitmask.is_pinned():
            # Pinned, so the copy below need not wait for the step running on the device.
            self.bitmask = self.bitmask.pin_memory()
        # Asynchronous on CUDA: the buffer is refilled only after the step's tokens reached
        # the host (`accept`), which is after this copy in the stream.
        mask = self.bitmask.to(scores.device, non_blocking=cuda)
        self._xgr.apply_token_bitmask_inplace(scores, mask)
        return scores


def _done():
    from concurrent.futures import Future

    future = Future()
    future.set_result(None)
    return future


_DONE = _done()  # the masks are filled already


class _AfterStep:
    """The stopping-criterion side of GrammarMasks: never stops a row, only observes."""

    def __init__(self, masks: GrammarMasks):
        self.masks = masks

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        self.masks.accept(input_ids[:, -1].tolist())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
