"""The training worker's Celery app, built per process from its settings (never at import).

A training worker consumes only the `train` queue, one run at a time, on Celery's solo
pool: the task runs in the worker's own process, so CUDA starts there and nothing forks
after it (the data loader's processes are spawned, training/__main__.py). It never shares
a process with a describe worker: it is its own command, `python -m training worker`.

`Lifecycle` opens the process's TrainingRuntime before the consumer starts (and sweeps for
runs to resume); a warm shutdown (SIGTERM) sets `stopping`, so the run in progress saves
a checkpoint at its next step, gives its lease back and is sent to the next worker,
instead of holding the shutdown for hours.
"""

from __future__ import annotations

import logging

from celery import bootsteps
from celery.signals import worker_shutting_down

from broker.celery_app import TRAIN_TASK, RuntimeApp, make_celery
from config.errors import ExpectedError
from config.settings import Settings

log = logging.getLogger(__name__)


class TrainingApp(RuntimeApp):
    """The training worker's app; its runtime is a training.lifecycle.TrainingRuntime."""


class Lifecycle(bootsteps.StartStopStep):
    def start(self, worker) -> None:
        from training.lifecycle import TrainingRuntime

        app: TrainingApp = worker.app
        try:
            app.runtime = TrainingRuntime.open(app.settings, app)
        except ExpectedError as e:
            app.startup_error = e
            raise SystemExit(2) from None
        app.runtime.start()

    def stop(self, worker) -> None:
        if worker.app.runtime is not None:
            worker.app.runtime.close()


def make_app(settings: Settings) -> TrainingApp:
    from training import tasks

    app = make_celery(settings, cls=TrainingApp)
    app.conf.worker_redirect_stdouts = False
    app.conf.worker_pool = "solo"
    app.settings = settings
    app.steps["worker"].add(Lifecycle)
    # Progress is task state: the train task keeps its result (the others ignore theirs).
    app.task(name=TRAIN_TASK, bind=True, ignore_result=False, track_started=True)(tasks.train)

    @worker_shutting_down.connect(weak=False)
    def _stopping(**_):
        if app.runtime is not None:
            log.warning("shutting down: the run in progress checkpoints and goes back")
            app.runtime.stopping = True

    return app
