"""The describe worker's Celery app, built per process from its settings (never at import).

`make_app(settings)` takes the shared configuration (`broker/celery_app.py`), registers
the tasks (`worker/tasks.py`) and adds `Lifecycle`, the start-up step that opens this
process's `WorkerRuntime` before the consumer starts and closes it at shutdown. The
threads pool never forks, so CUDA is initialised once, in the worker's own process, after
Celery has started and before any message is taken.
"""

from __future__ import annotations

import logging

from celery import bootsteps
from celery.exceptions import Reject
from celery.signals import task_received, worker_shutdown

from broker.celery_app import DESCRIBE_TASK, RuntimeApp, make_celery
from config.errors import ExpectedError
from config.settings import Settings

log = logging.getLogger(__name__)


class WorkerApp(RuntimeApp):
    """The describe worker's app; its runtime is a worker.lifecycle.WorkerRuntime."""


class Lifecycle(bootsteps.StartStopStep):
    """Opens the process's WorkerRuntime when the worker starts, before the consumer
    (Celery's last step), so a worker whose model does not load never takes a message.

    Closed after the pool has drained (worker_shutdown, sent once every step has stopped)
    on a warm shutdown; at once on a cold one."""

    def __init__(self, worker, **kwargs):
        super().__init__(worker, **kwargs)

    def start(self, worker) -> None:
        from worker.lifecycle import WorkerRuntime

        app: WorkerApp = worker.app
        try:
            app.runtime = WorkerRuntime.open(app.settings)
        except ExpectedError as e:
            app.startup_error = e  # `python -m worker` prints it as one line, exit 2
            raise SystemExit(2) from None
        app.runtime.start_heartbeat()

    def terminate(self, worker) -> None:
        # Cold shutdown: the tasks still running are cut short; they see `stopping` and
        # return their messages to the queue instead of failing their videos.
        _close(worker.app, cold=True)


class _RejectWithoutTraceback(logging.Filter):
    """A task that returns its message at a cold shutdown raises Reject, which Celery logs
    with a traceback; the one line says all there is (the video goes back to the queue)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], Reject):
            record.exc_info = record.exc_text = None
        return True


def _close(app: WorkerApp, *, cold: bool = False) -> None:
    if app.runtime is not None:
        app.runtime.close(cold=cold)


def make_app(settings: Settings) -> WorkerApp:
    """This process's describe worker app."""
    from worker import tasks

    app = make_celery(settings, cls=WorkerApp)
    # Print to the real stderr: a start-up error stays one plain line, not a log record.
    app.conf.worker_redirect_stdouts = False
    # Celery's threads pool, plus the cold shutdown it lacks (worker/pool.py). The slots
    # share the process's one model and GPU thread, and nothing forks after CUDA is up.
    app.conf.worker_pool = "worker.pool:ThreadPool"
    app.settings = settings
    app.steps["worker"].add(Lifecycle)
    trace_log = logging.getLogger("celery.app.trace")
    if not any(isinstance(f, _RejectWithoutTraceback) for f in trace_log.filters):
        trace_log.addFilter(_RejectWithoutTraceback())
    app.task(name=DESCRIBE_TASK, bind=True, max_retries=8)(tasks.describe)

    @worker_shutdown.connect(weak=False)
    def _closed(sender=None, **_):
        if getattr(sender, "app", None) is app:
            _close(app)

    @task_received.connect(weak=False)
    def _claimed(request=None, **_):
        # Before a slot runs it: a worker killed while holding the message is known to hold
        # it, so the sweep sends it again without waiting for the visibility timeout.
        if request is None or request.task.app is not app or app.runtime is None:
            return
        video_id = (request.kwargs or {}).get("video_id")
        if isinstance(video_id, int):
            try:
                app.runtime.claim(video_id)
            except Exception as e:  # the task itself will still run and record the video
                log.warning("could not record the claim of video %s: %s", video_id, e)

    return app
