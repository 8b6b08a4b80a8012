"""Celery tasks. Thin: parse the message, call the pipeline, record the outcome.

Registered on the process's app by `worker.app.make_app`; each reads the runtime that the
app's start-up step opened (`self.app.runtime`)."""

from __future__ import annotations

import logging

from celery.exceptions import SoftTimeLimitExceeded
from sqlalchemy.exc import OperationalError

from worker.pipeline import describe_video, fail

log = logging.getLogger(__name__)


def describe(self, video_id: int, path: str, frames: int | None = None) -> str:
    """Describe one video and store its report; returns the video's final state."""
    rt = self.app.runtime
    try:
        return describe_video(rt, video_id=video_id, path=path, frames=frames)
    except SoftTimeLimitExceeded:
        reason = f"took longer than {rt.settings.task_soft_time_limit} s (soft time limit)"
        fail(rt, video_id, reason)
        return "failed"
    except OperationalError as e:
        # The database went away: try again later, with backoff, up to max_retries.
        countdown = min(2 ** (self.request.retries + 1), 120)
        log.warning("database unavailable (video %s), retry in %s s: %s", video_id, countdown, e)
        raise self.retry(exc=e, countdown=countdown) from None
    except Exception as e:
        # Unexpected: keep the traceback in the log, but give the video a reason.
        fail(rt, video_id, f"internal error: {type(e).__name__}: {str(e)[:200]}")
        raise
