"""The `train` message: a nudge that names a run. The run itself lives in SQL.

`send_run` publishes it (JSON: `{"run_id": N}`) on the train queue and then marks the run
sent, so the training workers' sweep knows it needs no other; if the broker is away the
mark stays empty and a sweep sends it later.
"""

from __future__ import annotations

import logging

from broker.celery_app import TRAIN_QUEUE, TRAIN_TASK

log = logging.getLogger(__name__)


def send_run(app, sessions, run_id: int) -> str:
    """Publish the run's message and mark it sent; returns the Celery task id."""
    from db import training as runs
    from db.session import session_scope

    with session_scope(sessions) as session:
        run = runs.get_run(session=session, run_id=run_id)
        name = run.name if run is not None else None
    result = app.send_task(
        TRAIN_TASK,
        kwargs={"run_id": run_id},
        kwargsrepr=repr({"run_id": run_id, "run": name}),  # what Flower shows of it
        queue=TRAIN_QUEUE,
        routing_key=TRAIN_QUEUE,
    )
    with session_scope(sessions) as session:
        runs.mark_sent(session=session, run_id=run_id, task_id=result.id)
    log.info("run %s: message %s sent", run_id, result.id)
    return result.id
