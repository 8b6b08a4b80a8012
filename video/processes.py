"""Killable child processes for reading video: the producer's probing, the worker's frames.

A worker's task slots are threads, and a thread stuck inside FFmpeg (a decoder that loops,
a file whose open or read blocks) can never be stopped. So each video is decoded in a
process of a small pool (pebble), and that process is killed when the video takes longer
than `decode_timeout_s`. A process that dies (a decoder crash, the memory cap) fails only
its own video; the pool starts a new one. The processes are spawned, never forked: the
worker has CUDA up. Frames come back pickled (8 frames of 640x360 are about 5.5 MB).
The producer hashes and probes files through the same kind of pool (`KillablePool`).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from video.errors import VideoError
from video.files import check_allowed
from video.media import SampledVideo, sample_frames

log = logging.getLogger(__name__)

T = TypeVar("T")


def sample_enqueued(
    path: str,
    k: int,
    *,
    expected_bytes: int | None,
    roots: list[Path],
    max_side: int,
    sampling: str,
) -> SampledVideo:
    """The video's k frames chosen by `sampling` ("uniform" | "events"), if it is still the
    allowed, unchanged file that was enqueued (`expected_bytes`; None: a file given
    directly, checked as it is).

    Runs in a decoding process: even resolving the path can block on a stalled mount."""
    real = check_allowed(path, roots)
    if expected_bytes is None:  # not enqueued (`worker describe`): the file as it is now
        return sample_frames(real, k, max_side=max_side, sampling=sampling)
    size = os.path.getsize(real) if real.exists() else None
    if size is None:
        raise VideoError("the file is gone since it was enqueued")
    if size != expected_bytes:
        raise VideoError(
            f"the file changed since it was enqueued ({size} bytes, was {expected_bytes})"
        )
    return sample_frames(real, k, max_side=max_side, sampling=sampling)


def _limit_memory(limit_bytes: int) -> None:
    """Decoding process start-up: cap its heap, so a decompression bomb fails alone."""
    if limit_bytes:
        import resource

        # RLIMIT_DATA counts memory the process can write to (heap, frame buffers, thread
        # stacks); RLIMIT_AS would also count address space reserved and never used (each
        # malloc arena reserves 64 MiB), which a decoder's many threads inflate.
        resource.setrlimit(resource.RLIMIT_DATA, (limit_bytes, limit_bytes))


class _TimedOut(Exception):
    """A call ran past the pool's timeout and its process was killed."""


class KillablePool:
    """Spawned processes, started on first use, that run calls past which `timeout_s` they
    are killed; `run` is thread-safe and turns a timeout, a crash or the memory cap into a
    VideoError whose message starts with `what` ("frame decoding", "probing").

    A call that times out is run once more, in a new process, before it fails: a decoder
    can hang on a race of its own threads (PyAV #1849) and not the next time, while a file
    that really blocks (a stalled mount) or loops blocks again and fails after two."""

    def __init__(self, *, processes: int, timeout_s: float, memory_gib: float, what: str):
        self.processes = processes or os.cpu_count() or 1
        self.timeout_s = timeout_s
        self.memory_gib = memory_gib
        self.what = what
        self._lock = threading.Lock()
        self._pool = None
        self._closing = False

    def _live_pool(self, broken=None):
        """The pool, made anew if it is missing or is `broken` (a pool that failed)."""
        import multiprocessing

        from pebble import ProcessPool

        with self._lock:
            if self._closing:
                raise self._closed_error()
            if self._pool is not None and (self._pool is broken or not self._pool.active):
                self._pool.stop()
                self._pool = None
            if self._pool is None:
                self._pool = ProcessPool(
                    max_workers=self.processes,
                    initializer=_limit_memory,
                    initargs=(int(self.memory_gib * 2**30),),
                    context=multiprocessing.get_context("spawn"),
                )
            return self._pool

    def run(self, fn: Callable[..., T], /, *args, **kwargs) -> T:
        """`fn(*args, **kwargs)` in one of the processes (`fn` and its arguments pickle)."""
        try:
            return self._attempt(fn, args, kwargs)
        except _TimedOut:
            log.warning(
                "%s took longer than %g s; killed, trying once more in a new process",
                self.what,
                self.timeout_s,
            )
        try:
            return self._attempt(fn, args, kwargs)
        except _TimedOut:
            raise VideoError(
                f"{self.what} took longer than {self.timeout_s:g} s, twice; killed"
            ) from None

    def _attempt(self, fn, args: tuple, kwargs: dict):
        from concurrent.futures.process import BrokenProcessPool

        pool = self._live_pool()
        try:
            return self._run(pool, fn, args, kwargs)
        except BrokenProcessPool as e:
            if self._closing:  # stopped by `close`, not broken: no new pool now
                raise self._closed_error() from None
            # pebble gives up on a pool whose processes all died while none ran a task
            # (e.g. the OOM killer took an idle one): this call goes again, on a new pool
            log.warning("%s pool broken (%s); starting a new one", self.what, e)
            return self._run(self._live_pool(broken=pool), fn, args, kwargs)

    def _closed_error(self) -> VideoError:
        return VideoError(f"{self.what} stopped: its processes were closed")

    def _run(self, pool, fn, args: tuple, kwargs: dict):
        from pebble import ProcessExpired

        future = pool.schedule(fn, args=args, kwargs=kwargs, timeout=self.timeout_s)
        try:
            return self._result(future)
        except TimeoutError:
            raise _TimedOut() from None
        except ProcessExpired as e:
            raise VideoError(f"{self.what} crashed: {_death(e.exitcode)}") from None
        except MemoryError:
            if not self.memory_gib:
                raise VideoError(f"{self.what} ran out of memory") from None
            raise VideoError(
                f"{self.what} needs more than {self.memory_gib:g} GiB of memory"
            ) from None

    def _result(self, future):
        """The call's result. Waits in steps: a pool stopped by `close` may leave a call it
        had not started pending for ever, so a closed pool fails its waiting callers."""
        while True:
            try:
                return future.result(timeout=1.0)
            except TimeoutError:
                if future.done():
                    raise  # pebble's own timeout: the call ran past timeout_s
                if self._closing:
                    future.cancel()
                    raise self._closed_error() from None

    def close(self) -> None:
        """Stop the processes (a running call is killed, a waiting one fails)."""
        self._closing = True
        with self._lock:
            if self._pool is not None:
                self._pool.stop()
                self._pool.join(timeout=10)
                self._pool = None


class FrameSampler(KillablePool):
    """A describe worker's decoding processes; `sample` is thread-safe. The worker's
    lifecycle makes one and closes it at shutdown."""

    def __init__(self, *, processes: int, timeout_s: float, memory_gib: float):
        super().__init__(
            processes=processes, timeout_s=timeout_s, memory_gib=memory_gib, what="frame decoding"
        )

    def sample(
        self,
        path: str,
        k: int,
        *,
        expected_bytes: int | None,
        roots: list[Path],
        max_side: int,
        sampling: str,
    ) -> SampledVideo:
        """`sample_enqueued` in a decoding process; VideoError says why it gave nothing."""
        return self.run(
            sample_enqueued,
            path,
            k,
            expected_bytes=expected_bytes,
            roots=roots,
            max_side=max_side,
            sampling=sampling,
        )


def _death(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        hint = " (out of memory?)" if name == "SIGKILL" else ""
        return f"its process died of {name}{hint}"
    return f"its process exited with status {exitcode}"
