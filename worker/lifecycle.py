"""A describe worker process's lifecycle: one object owns everything the process holds.

`WorkerRuntime.open(settings)` builds it: the database engine and sessions, the model
runner (the model is loaded now, so a worker without its model never consumes), the frame
sampler (decoding processes, spawned on the first video) and the batcher (the GPU thread).
`close()` stops them in the reverse order. A Celery worker opens it in its start-up step
(`worker/app.py`), after any fork and before the consumer starts, and closes it at
shutdown; `python -m worker describe` opens one without a store. Nothing here runs at
import time, and nothing keeps a module-level copy.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from config.settings import Settings
from video.processes import FrameSampler

if TYPE_CHECKING:
    from sqlalchemy import Engine
    from sqlalchemy.orm import Session, sessionmaker

    from models.runner import ModelRunner
    from worker.batcher import Batcher

log = logging.getLogger(__name__)


@dataclass
class WorkerRuntime:
    """What a describe worker process holds for its life."""

    settings: Settings
    runner: ModelRunner
    sampler: FrameSampler
    batcher: Batcher
    host: str  # host:pid, stored on each report and claimed video
    sessions: sessionmaker[Session] | None = None  # None: no store (`worker describe`)
    db_engine: Engine | None = field(default=None, repr=False)
    _closed: bool = field(default=False, repr=False)
    _close_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @classmethod
    def open(cls, settings: Settings, *, with_store: bool = True) -> WorkerRuntime:
        """Build the process's runtime; a ModelError or StoreError says what is wrong."""
        from models.runner import build_runner
        from worker.batcher import Batcher

        db_engine = sessions = None
        if with_store:
            from db.session import make_engine, make_sessionmaker

            db_engine = make_engine(settings.db_url)
            sessions = make_sessionmaker(db_engine)
        try:
            runner = build_runner(settings)
        except BaseException:
            if db_engine is not None:
                db_engine.dispose()
            raise
        sampler = FrameSampler(
            processes=settings.decode_processes,
            timeout_s=settings.decode_timeout_s,
            memory_gib=settings.decode_memory_gib,
        )
        batcher = Batcher(runner, wait_s=settings.batch_wait_ms / 1000)
        host = f"{socket.gethostname()}:{os.getpid()}"
        log.info("worker runtime open: %s, %s", runner.model_id, host)
        return cls(settings, runner, sampler, batcher, host, sessions, db_engine)

    def close(self) -> None:
        """Stop the GPU thread, the decoding processes and the database pool (once)."""
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        self.batcher.close()
        self.sampler.close()
        if self.db_engine is not None:
            self.db_engine.dispose()
        log.info("worker runtime closed")

    def __enter__(self) -> WorkerRuntime:
        return self

    def __exit__(self, *_exc) -> None:
        self.close()
