"""Celery tasks. Thin: parse the message, call plain functions, record the outcome."""

from __future__ import annotations

import logging
from functools import lru_cache

from celery.exceptions import SoftTimeLimitExceeded
from celery.signals import worker_shutdown
from sqlalchemy.exc import OperationalError

from worker.app import DESCRIBE_TASK, app
from worker.describe import Runtime, describe_video
from worker.sampler import close_sampler

log = logging.getLogger(__name__)


@lru_cache(maxsize=1)
def runtime() -> Runtime:
    """This process's settings, database sessions and engine, made after the fork."""
    return Runtime.create()


@worker_shutdown.connect
def _stop_decoding(**_) -> None:
    """The decoding processes (started on the first video) stop with the worker."""
    close_sampler()


def warm_up() -> None:
    """Load the model and start the GPU thread before consuming; ModelError stops start-up.

    A worker without its model would fail every video it takes, so it must not consume.
    """
    runtime().batcher()


@app.task(name=DESCRIBE_TASK, bind=True, max_retries=8)
def describe(self, video_id: int, path: str, frames: int | None = None) -> str:
    """Describe one video and store its report; returns the video's final state."""
    rt = runtime()
    try:
        return describe_video(rt, video_id=video_id, path=path, frames=frames)
    except SoftTimeLimitExceeded:
        reason = f"took longer than {rt.settings.task_soft_time_limit} s (soft time limit)"
        rt.fail(video_id, reason)
        return "failed"
    except OperationalError as e:
        # The database went away: try again later, with backoff, up to max_retries.
        countdown = min(2 ** (self.request.retries + 1), 120)
        log.warning("database unavailable (video %s), retry in %s s: %s", video_id, countdown, e)
        raise self.retry(exc=e, countdown=countdown) from None
    except Exception as e:
        # Unexpected: keep the traceback in the log, but give the video a reason.
        rt.fail(video_id, f"internal error: {type(e).__name__}: {str(e)[:200]}")
        raise
