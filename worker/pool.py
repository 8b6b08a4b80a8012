"""The describe worker's Celery pool: Celery's threads pool, with the cold shutdown it lacks.

Celery's threads pool implements no `terminate_job` (celery/celery#10490, open), so a cold
shutdown (a second Ctrl-C, SIGQUIT) raises NotImplementedError inside the signal handler
and then waits for every running task. A thread cannot be killed; what can end this
worker's tasks at once is closing what they wait on. So when the pool is stopped for a
cold shutdown (Celery has set `state.should_terminate` by then), it first closes the
process's runtime cold (`WorkerRuntime.close(cold=True)`): GPU work not started is
cancelled and the decoding processes are stopped; each task then sees `stopping` and
returns its message to the queue (Reject with requeue) instead of failing its video.

`terminate_job` alone (a lost broker connection, `revoke --terminate`) stops nothing: the
task runs to its end, and its message, if it comes back, finds the report stored.
"""

from __future__ import annotations

import logging

from celery.concurrency.thread import TaskPool
from celery.worker import state

log = logging.getLogger(__name__)


class ThreadPool(TaskPool):
    """Celery's threads pool; a cold shutdown cuts this worker's tasks short."""

    def terminate_job(self, pid, signal=None) -> None:
        log.debug("a running task cannot be stopped in the threads pool; it runs to its end")

    def on_stop(self) -> None:
        runtime = getattr(self.app, "runtime", None)
        if state.should_terminate and runtime is not None and not runtime.stopping:
            log.warning("cold shutdown: the running tasks return their videos to the queue")
            runtime.close(cold=True)
        super().on_stop()
