"""Cross-task batching: many task threads submit one video each, one thread drives the GPU.

A Celery worker runs the `threads` pool with twice `batch_size` slots. Each slot takes one
message, samples and prepares its video on the CPU, then `submit`s it here and waits. The
device thread takes whatever is queued (up to the runner's batch limit), waits at most
`wait_s` for a partial batch to fill, runs it, and hands every slot its own answer or
exception. While one batch is on the GPU the other half of the slots prepare the next (and
the runner encodes the frames of those already queued, `_upcoming`), so a worker with a
full queue keeps the GPU busy, and every message keeps its own late ack, retry and failure.

The GPU thread cannot be killed, so a watchdog bounds it: a batch running longer than
max(`stall_s`, 10x its expected time from the step time measured so far) is stuck (a hung
kernel, a deadlock in a library), and `on_stall` ends the process (by default: one
critical log line, exit 70). Its messages are unacknowledged, so they are redelivered, and
its lapsed heartbeat has its videos sent again at once; the supervisor starts a new worker.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field

from models.runner import Answer, ModelRunner, Prepared

log = logging.getLogger(__name__)

_MAX_WAITS = 40  # a partial batch waits at most this many idle intervals (2 s at 50 ms)
# While callers are still preparing videos (`preparing()`), a partial batch waits for them,
# but never longer than this: a decode costs the same for 2 rows as for 64, so a batch
# started early for a few ready videos would cost the others a whole extra decode.
_MAX_GATHER_S = 10.0
# A batch may take this many times its expected time before the watchdog calls it stuck.
_STALL_FACTOR = 10
EXIT_STALLED = 70  # EX_SOFTWARE: the supervisor restarts the worker


@dataclass
class BatcherStats:
    batches: int = 0
    videos: int = 0
    busy_s: float = 0.0
    cpu_s: float = 0.0  # CPU time of the GPU thread itself (Python driving the kernels)
    sizes: list[int] = field(default_factory=list)
    steps: list[int] = field(default_factory=list)  # decode steps of each batch (longest row)


class Batcher:
    """Feeds a ModelRunner from many threads; `submit` returns a Future of the video's Answer."""

    def __init__(
        self,
        runner: ModelRunner,
        *,
        wait_s: float = 0.05,
        stall_s: float = 0.0,
        on_stall: Callable[[str], None] | None = None,
        on_batch: Callable[..., None] | None = None,
    ):
        self.runner = runner
        self.wait_s = wait_s
        self.stats = BatcherStats()
        # Told of each batch that ran: rows=, seconds=, tokens= (the worker's metrics).
        self._on_batch = on_batch
        self._queue: queue.Queue[tuple[Prepared, Future] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="fleetscribe-gpu", daemon=True)
        self._closed = False
        self._preparing = 0  # callers between `preparing()` and `submit`
        self._arrived = threading.Condition()
        # The watchdog: when the batch on the GPU began (None: none is), and how many rows.
        self.stall_s = stall_s
        self._on_stall = on_stall or _exit_stalled
        self._began: float | None = None
        self._rows = 0
        self._step_s = 0.0  # the slowest decode step seen, per batch (busy time / steps)
        self._thread.start()
        if stall_s:
            threading.Thread(target=self._watch, name="fleetscribe-watchdog", daemon=True).start()

    @contextmanager
    def preparing(self):
        """Wrap a caller's CPU work (sampling, `runner.prepare`) and its `submit`, so a
        partial batch knows more videos are on the way and waits for them."""
        with self._arrived:
            self._preparing += 1
        try:
            yield
        finally:
            with self._arrived:
                self._preparing -= 1
                self._arrived.notify_all()

    def submit(self, prepared: Prepared) -> Future[Answer]:
        future: Future[Answer] = Future()
        if self._closed:
            future.set_exception(RuntimeError("the batcher is closed"))
        else:
            self._queue.put((prepared, future))
        return future

    def answer(self, prepared: Prepared, timeout: float | None = None) -> Answer:
        """Submit one video and wait for its answer."""
        return self.submit(prepared).result(timeout)

    def close(self, *, cancel: bool = False) -> None:
        """Stop taking videos. The batch on the GPU is finished (or, with `cancel`, only
        waited for briefly); with `cancel` the videos still queued fail at once instead of
        being run (a cold shutdown returns their messages to the queue)."""
        self._closed = True
        if cancel:
            while True:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is not None:
                    item[1].set_exception(RuntimeError("the worker is shutting down"))
        self._queue.put(None)
        self._thread.join(timeout=5 if cancel else None)

    def stall_limit(self) -> float:
        """Seconds after which the batch now on the GPU counts as stuck."""
        steps = self.runner.first_pass_tokens + self.runner.answer_tokens  # both passes
        return max(self.stall_s, _STALL_FACTOR * self._step_s * steps)

    def _watch(self) -> None:
        while not self._closed:
            time.sleep(min(5.0, self.stall_s / 10))
            began, limit = self._began, self.stall_limit()
            if began is not None and time.monotonic() - began > limit:
                self._on_stall(
                    f"GPU batch of {self._rows} videos running for "
                    f"{time.monotonic() - began:.0f} s, past its limit of {limit:.0f} s "
                    f"(FLEETSCRIBE_GPU_STALL_S={self.stall_s:g}, or 10x the expected time): "
                    "stuck; exiting so its videos are redelivered"
                )
                return

    def _run(self) -> None:
        while True:
            batch = self._take()
            if batch is None:
                return
            self._serve(batch)

    def _take(self) -> list[tuple[Prepared, Future]] | None:
        """Block for one video, then gather more up to the batch limit.

        Decoding costs about the same per step for 2 rows as for 64, so a fuller batch is
        nearly free: keep gathering while videos keep arriving (each resets a `wait_s`
        idle timer), but never past `_MAX_WAITS` x `wait_s` in all; while callers are
        still preparing videos (`preparing()`), wait for them up to `_MAX_GATHER_S`.
        """
        first = self._queue.get()
        if first is None:
            return None
        batch = [first]
        limit = self.runner.batch_limit(first[0].tokens)
        now = time.monotonic()
        idle_deadline, final_deadline = now + self.wait_s, now + _MAX_WAITS * self.wait_s
        gather_deadline = now + _MAX_GATHER_S
        while len(batch) < limit:
            now = time.monotonic()
            if now >= gather_deadline or (now >= final_deadline and not self._preparing):
                break
            try:
                item = self._queue.get(timeout=max(0.0, idle_deadline - now))
            except queue.Empty:
                if self._wait_for_preparing(gather_deadline):
                    continue  # one arrived while others were still being prepared
                break
            idle_deadline = time.monotonic() + self.wait_s
            if item is None:
                self._queue.put(None)  # close after this batch
                break
            batch.append(item)
        return batch

    def _wait_for_preparing(self, deadline: float) -> bool:
        """Wait until a video arrives while others are still being prepared.

        False when nothing is being prepared (or the gather deadline passed): the batch
        should run with what it has."""
        with self._arrived:
            while self._preparing and self._queue.empty():
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._arrived.wait(min(left, self.wait_s))
            return not self._queue.empty()

    def _serve(self, batch: list[tuple[Prepared, Future]]) -> None:
        live = [(p, f) for p, f in batch if f.set_running_or_notify_cancel()]
        if not live:
            return
        began, cpu_began = time.perf_counter(), time.thread_time()
        answered: set[int] = set()  # answers handed out before a second pass

        def ready(i: int, answer: Answer) -> None:
            live[i][1].set_result(answer)
            answered.add(i)

        self._began, self._rows = time.monotonic(), len(live)
        try:
            prepared = [p for p, _ in live]
            answers = self.runner.generate(prepared, ready=ready, upcoming=self._upcoming)
        except Exception as e:
            rest = [item for i, item in enumerate(live) if i not in answered]
            if len(rest) == 1:
                rest[0][1].set_exception(e)
                return
            # One bad input must not fail its batch-mates: run them one by one.
            log.warning("batch of %d failed (%s); retrying its videos singly", len(rest), e)
            for item in rest:
                self._serve_one(*item)
            return
        finally:
            self._began = None
        for i, ((_, future), answer) in enumerate(zip(live, answers, strict=True)):
            if i not in answered:
                future.set_result(answer)
        seconds = time.perf_counter() - began
        self.stats.batches += 1
        self.stats.videos += len(live)
        self.stats.busy_s += seconds
        self.stats.cpu_s += time.thread_time() - cpu_began
        self.stats.sizes.append(len(live))
        self.stats.steps.append(max(a.tokens_out for a in answers))
        self._step_s = max(self._step_s, seconds / max(self.stats.steps[-1], 1))
        if self._on_batch is not None:
            tokens = sum(a.tokens_out for a in answers)
            self._on_batch(rows=len(live), seconds=seconds, tokens=tokens)

    def _upcoming(self) -> list[Prepared]:
        """The videos queued for the next batches, in order (the runner encodes their
        frames while this batch decodes)."""
        with self._queue.mutex:
            return [item[0] for item in self._queue.queue if item is not None]

    def _serve_one(self, prepared: Prepared, future: Future) -> None:
        self._began, self._rows = time.monotonic(), 1
        try:
            future.set_result(self.runner.generate([prepared])[0])
        except Exception as e:  # the waiting task records it; this thread lives on
            future.set_exception(e)
        finally:
            self._began = None


def _exit_stalled(message: str) -> None:
    """The default `on_stall`: say why in one critical line, then end the process at once
    (the GPU thread cannot be stopped, and a clean exit would wait for it)."""
    log.critical(message)
    logging.shutdown()
    os._exit(EXIT_STALLED)
