"""A describe worker process's lifecycle: one object owns everything the process holds.

`WorkerRuntime.open(settings)` builds it: the database engine and sessions, the model
runner (the model is loaded now, so a worker without its model never consumes), the frame
sampler (decoding processes, spawned on the first video) and the batcher (the GPU thread).
`close()` stops them in the reverse order. While it is open, the process's interpreter
switch interval is SWITCH_INTERVAL_MS (the GPU thread takes the GIL back sooner). A Celery
worker opens it in its start-up step (`worker/app.py`), after any fork and before the
consumer starts, starts its heartbeat, and closes it at shutdown; `python -m worker
describe` opens one without a store. Nothing here runs at import time, and nothing keeps a
module-level copy.

The heartbeat thread renews this process's row in `workers` every HEARTBEAT_S and, every
SWEEP_S, sends again what was lost (delivery.outbox.send_again): videos running on a worker
whose heartbeat lapsed, and queued videos whose message was never confirmed.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from config.settings import Settings
from video.processes import FrameSampler

if TYPE_CHECKING:
    from sqlalchemy import Engine
    from sqlalchemy.orm import Session, sessionmaker

    from metrics.catalog import DescribeMetrics
    from metrics.server import MetricsServer
    from models.runner import ModelRunner
    from worker.batcher import Batcher

log = logging.getLogger(__name__)


class Stopping(Exception):
    """The worker is shutting down: the video goes back to the queue, not to `failed`."""


@dataclass
class WorkerRuntime:
    """What a describe worker process holds for its life."""

    settings: Settings
    runner: ModelRunner
    sampler: FrameSampler
    batcher: Batcher
    host: str  # host:pid, stored on each report and claimed video
    metrics: DescribeMetrics
    sessions: sessionmaker[Session] | None = None  # None: no store (`worker describe`)
    db_engine: Engine | None = field(default=None, repr=False)
    metrics_server: MetricsServer | None = field(default=None, repr=False)
    # Set when a shutdown cuts tasks short: what fails then is the shutdown, not the video.
    stopping: bool = False
    _closed: bool = field(default=False, repr=False)
    _close_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _heartbeat: threading.Thread | None = field(default=None, repr=False)
    _quiet: threading.Event = field(default_factory=threading.Event, repr=False)
    _switch_interval: float = field(default_factory=sys.getswitchinterval, repr=False)

    @classmethod
    def open(cls, settings: Settings, *, with_store: bool = True) -> WorkerRuntime:
        """Build the process's runtime; a ModelError, StoreError or MetricsPortError
        says what is wrong."""
        from metrics.catalog import DescribeMetrics
        from metrics.server import serve_process
        from models.runner import build_runner
        from worker.batcher import Batcher

        db_engine = sessions = None
        if with_store:
            from db.migrate import check_revision
            from db.session import make_engine, make_sessionmaker

            db_engine = make_engine(settings.db_url)
            try:
                check_revision(db_engine)  # only `python -m db upgrade` changes the schema
            except BaseException:
                db_engine.dispose()
                raise
            sessions = make_sessionmaker(db_engine)
        try:
            runner = build_runner(settings, adapter_path=adapter_path(settings, sessions))
        except BaseException:
            if db_engine is not None:
                db_engine.dispose()
            raise
        sampler = FrameSampler(
            processes=settings.decode_processes,
            timeout_s=settings.decode_timeout_s,
            memory_gib=settings.decode_memory_gib,
        )
        metrics = DescribeMetrics()
        batcher = Batcher(
            runner,
            wait_s=settings.batch_wait_ms / 1000,
            stall_s=settings.gpu_stall_s,
            on_batch=metrics.batch,
        )
        host = f"{socket.gethostname()}:{os.getpid()}"
        rt = cls(settings, runner, sampler, batcher, host, metrics, sessions, db_engine)
        sys.setswitchinterval(settings.switch_interval_ms / 1000)  # close() puts it back
        if with_store:
            try:
                rt.metrics_server = serve_process(
                    metrics,
                    settings,
                    host=host,
                    model=runner.model_id,
                    adapter=runner.adapter or "",
                    gpu_memory=runner.memory.in_use,
                    sessions=sessions,
                )
            except BaseException:
                rt.close()
                raise
        log.info("worker runtime open: %s, %s", runner.model_id, host)
        return rt

    def start_heartbeat(self) -> None:
        """Beat now, then every HEARTBEAT_S on a thread that also sweeps every SWEEP_S."""
        if self.sessions is None or self._heartbeat is not None:
            return
        self._beat()
        self._heartbeat = threading.Thread(
            target=self._beat_and_sweep, name="fleetscribe-heartbeat", daemon=True
        )
        self._heartbeat.start()

    def claim(self, video_id: int) -> None:
        """This process took the video's message (Celery's task_received, worker/app.py)."""
        from db import store
        from db.session import session_scope

        with session_scope(self.sessions) as session:
            store.claim(session=session, video_id=video_id, worker=self.host)

    def _beat(self) -> None:
        from db import store
        from db.session import session_scope

        with session_scope(self.sessions) as session:
            store.beat(session=session, worker=self.host)

    def _beat_and_sweep(self) -> None:
        from delivery.heartbeat import beat_and_sweep

        beat_and_sweep(
            self._quiet,
            heartbeat_s=self.settings.heartbeat_s,
            sweep_s=self.settings.sweep_s,
            beat=self._beat,
            sweep=self._sweep,
            sweep_at_first_beat=True,  # a worker started after a crash finds what it left
            what="heartbeat or sweep",
        )

    def _sweep(self) -> None:
        from delivery.outbox import restore_held, send_again

        restore_held(sessions=self.sessions, settings=self.settings)
        send_again(sessions=self.sessions, settings=self.settings)

    def close(self, *, cold: bool = False) -> None:
        """Stop the heartbeat (the row says stopped), the GPU thread, the decoding
        processes and the database pool (once). `cold`: a cold shutdown, tasks still
        running are cut short and their videos go back to the queue (`stopping`)."""
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        if cold:
            self.stopping = True
        self._quiet.set()
        if self._heartbeat is not None:
            self._heartbeat.join(timeout=30)
            try:
                from db import store
                from db.session import session_scope

                with session_scope(self.sessions) as session:
                    store.stop_worker(session=session, worker=self.host)
            except Exception as e:
                log.warning("could not mark worker %s stopped: %s", self.host, e)
        self.batcher.close(cancel=cold)
        self.sampler.close()
        if self.metrics_server is not None:
            self.metrics_server.close()
        if self.db_engine is not None:
            self.db_engine.dispose()
        sys.setswitchinterval(self._switch_interval)
        log.info("worker runtime closed")

    def __enter__(self) -> WorkerRuntime:
        return self

    def __exit__(self, *_exc) -> None:
        self.close()


def adapter_path(settings: Settings, sessions: sessionmaker[Session] | None) -> str | None:
    """Where FLEETSCRIBE_ADAPTER's weights lie: a name registered in the store's `adapters`
    table (by a finished training run), else the value itself (a folder or a hub id).
    Without a store (`worker describe`), a configured or existing embedded store is asked."""
    from pathlib import Path

    name = settings.adapter
    if not name:
        return None
    if sessions is None and Path(name).expanduser().exists():
        return name
    row = _registered(settings, sessions, name)
    if row is None:
        return name
    base, path = row
    if not _same_model(base, settings.model):
        from models.errors import ModelLoadError

        raise ModelLoadError(
            f"adapter {name} was trained on {base}, but this worker loads {settings.model} "
            "(FLEETSCRIBE_MODEL)"
        )
    log.info("adapter %s: registered at %s", name, path)
    return path


def _registered(settings: Settings, sessions, name: str) -> tuple[str, str] | None:
    from db import training
    from db.session import make_engine, make_sessionmaker, session_scope

    engine = None
    if sessions is None:
        if settings.embedded_store and not (settings.home / "fleetscribe.db").exists():
            return None
        engine = make_engine(settings.db_url)
        sessions = make_sessionmaker(engine)
    try:
        with session_scope(sessions) as session:
            row = training.resolve_adapter(session=session, name=name)
            return None if row is None else (row.base_model, row.path)
    except Exception as e:  # an older store without the table, a database away
        if engine is None:
            raise
        log.warning("could not look adapter %s up in the store: %s", name, e)
        return None
    finally:
        if engine is not None:
            engine.dispose()


def _same_model(a: str, b: str) -> bool:
    from pathlib import Path

    if a == b:
        return True
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    return pa.exists() and pb.exists() and pa.resolve() == pb.resolve()
