"""Celery tasks. Thin: parse the message, call the pipeline, record the outcome.

Registered on the process's app by `worker.app.make_app`; each reads the runtime that the
app's start-up step opened (`self.app.runtime`)."""

from __future__ import annotations

import logging

from celery.exceptions import Reject
from sqlalchemy.exc import OperationalError

from db.models import INTERNAL_ERROR
from worker.lifecycle import Stopping
from worker.pipeline import describe_video, fail

log = logging.getLogger(__name__)


def describe(
    self, video_id: int, path: str, frames: int | None = None, sampling: str | None = None
) -> str:
    """Describe one video and store its report; returns the video's final state. A message
    from before sampling modes carries no `sampling`: the video's, else the setting."""
    rt = self.app.runtime
    try:
        return describe_video(rt, video_id=video_id, path=path, frames=frames, sampling=sampling)
    except Stopping as e:
        # A cold shutdown cut it short: the video is not failed, its message goes back.
        log.warning("%s; its message goes back to the queue", e)
        raise Reject(str(e), requeue=True) from None
    except Exception as e:
        if rt.stopping:
            raise Reject("the worker is shutting down", requeue=True) from None
        if isinstance(e, OperationalError):
            # The database went away: try again later, with backoff, up to max_retries.
            countdown = min(2 ** (self.request.retries + 1), 120)
            log.warning(
                "database unavailable (video %s), retry in %s s: %s", video_id, countdown, e
            )
            raise self.retry(exc=e, countdown=countdown) from None
        # Unexpected: keep the traceback in the log, and give the video a reason that says
        # it was the worker's fault (a redelivered message for it runs again).
        fail(rt, video_id, f"{INTERNAL_ERROR}: {type(e).__name__}: {str(e)[:200]}")
        raise
