"""A training worker process's lifecycle: one object owns what the process holds.

`TrainingRuntime.open(settings)` (the Celery worker's start-up step, training/app.py)
opens the store and starts one thread that, every HEARTBEAT_S, renews the lease of the
run this process trains and, every SWEEP_S, sends a message for each run that needs one:
a running run whose lease lapsed (its worker was killed) and a queued run whose message
was never confirmed. The model is loaded per run (runs may use different bases), inside
the task, in this process: nothing forks after CUDA is up. `close()` stops the thread
and the database pool.

A run's state lives in SQL, not in the broker: a run lasts longer than any Redis
visibility timeout, and the lease (not the message) says who trains it. A redelivered
or duplicated message is harmless: `db.training.acquire` lets one worker hold a run.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from config.settings import Settings

if TYPE_CHECKING:
    from celery import Celery
    from sqlalchemy import Engine
    from sqlalchemy.orm import Session, sessionmaker

    from metrics.catalog import TrainingMetrics
    from metrics.server import MetricsServer

log = logging.getLogger(__name__)


@dataclass
class TrainingRuntime:
    settings: Settings
    app: Celery
    sessions: sessionmaker[Session]
    db_engine: Engine = field(repr=False)
    host: str  # host:pid, the lease owner
    metrics: TrainingMetrics
    metrics_server: MetricsServer | None = field(default=None, repr=False)
    stopping: bool = False  # a shutdown asked the run to checkpoint and give itself back
    run_id: int | None = None  # the run this process trains now
    lease_lost: bool = False
    _quiet: threading.Event = field(default_factory=threading.Event, repr=False)
    _thread: threading.Thread | None = field(default=None, repr=False)
    _closed: bool = field(default=False, repr=False)

    @classmethod
    def open(cls, settings: Settings, app: Celery) -> TrainingRuntime:
        from db.session import make_sessionmaker, open_store
        from metrics.catalog import TrainingMetrics
        from metrics.server import serve_process
        from models.memory import cuda_memory

        db_engine = open_store(settings, wait_s=60)  # at the revision this code needs
        host = f"{socket.gethostname()}:{os.getpid()}"
        sessions = make_sessionmaker(db_engine)
        rt = cls(settings, app, sessions, db_engine, host, TrainingMetrics())
        try:
            rt.metrics_server = serve_process(
                rt.metrics,
                settings,
                host=host,
                model=settings.model,
                adapter="",
                gpu_memory=cuda_memory,  # CUDA starts in the task, with the run's model
            )
        except BaseException:
            db_engine.dispose()
            raise
        log.info("training runtime open: %s, runs under %s", host, settings.train_root)
        return rt

    @property
    def lease_s(self) -> float:
        return self.settings.heartbeat_lapse_s

    def start(self) -> None:
        """Sweep once now (a worker started after a crash resumes its run at once), then
        beat and sweep on a thread."""
        self.sweep()
        self._thread = threading.Thread(target=self._loop, name="fleetscribe-lease", daemon=True)
        self._thread.start()

    def hold(self, run_id: int | None) -> None:
        """The run this process trains now (None: none); its lease is renewed."""
        self.run_id = run_id
        self.lease_lost = False

    def renew(self) -> None:
        from db import training as runs
        from db.session import session_scope

        run_id = self.run_id
        if run_id is None:
            return
        with session_scope(self.sessions) as session:
            held = runs.renew(session=session, run_id=run_id, owner=self.host, lease_s=self.lease_s)
        if not held and self.run_id == run_id:
            log.error("run %s: lease lost (another worker holds it); stopping", run_id)
            self.lease_lost = True

    def sweep(self) -> None:
        """Send a message for each run that needs one (lapsed lease, never confirmed)."""
        from db import training as runs
        from db.session import session_scope
        from training.messages import send_run

        with session_scope(self.sessions) as session:
            due = runs.to_send(session=session, grace_s=self.settings.outbox_grace_s)
            due = [(r.id, r.name, r.state.value) for r in due]
        for run_id, name, state in due:
            if run_id == self.run_id:
                continue
            log.warning("run %s (%s, lease lapsed or never sent): sending it again", name, state)
            send_run(self.app, self.sessions, run_id)

    def _loop(self) -> None:
        from delivery.heartbeat import beat_and_sweep

        beat_and_sweep(
            self._quiet,
            heartbeat_s=self.settings.heartbeat_s,
            sweep_s=self.settings.sweep_s,
            beat=self.renew,
            sweep=self.sweep,
            sweep_at_first_beat=False,  # start() has swept already
            what="lease renewal or sweep",
        )

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._quiet.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        if self.metrics_server is not None:
            self.metrics_server.close()
        self.db_engine.dispose()
        log.info("training runtime closed")
