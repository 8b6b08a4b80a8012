"""Send describe messages and keep the store's outbox mark true.

A video row is written `queued` before its message is sent. Once the broker has taken the
message (kombu's publish returned: Redis answered the LPUSH), the row gets `published_at`.
So a producer killed mid-send, or a broker that accepted the connection and never
answered, leaves rows that say their message is unconfirmed, and `send_again` finds them.
A message sent twice is harmless: the worker finds the stored report, or the report's
unique key keeps a second one out.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import timedelta

from sqlalchemy.orm import Session, sessionmaker

from broker.celery_app import DESCRIBE_QUEUE, DESCRIBE_TASK, make_celery
from config.settings import Settings, hide_password
from db import store
from db.models import Video, utcnow
from db.session import session_scope
from delivery.errors import BrokerUnavailable

log = logging.getLogger(__name__)

# Messages between two outbox marks: a producer killed mid-send resends at most this many
# messages that had in fact gone out.
CHUNK = 200


def send(videos: Sequence[Video], *, sessions: sessionmaker[Session], settings: Settings) -> int:
    """One describe message per video (at its own priority), each chunk marked published
    once the broker took it. If the broker fails, BrokerUnavailable says so; the videos
    not confirmed stay queued and unconfirmed, to be sent again."""
    if not videos:
        return 0
    app = make_celery(settings)
    sent = 0
    try:
        with app.producer_or_acquire() as producer:
            for start in range(0, len(videos), CHUNK):
                chunk = videos[start : start + CHUNK]
                for video in chunk:
                    app.send_task(
                        DESCRIBE_TASK,
                        kwargs={"video_id": video.id, "path": video.path, "frames": video.frames},
                        # What Flower (and the task events) show of it: the video's id,
                        # path and sha256; the message itself carries what the task needs.
                        kwargsrepr=repr(
                            {"video_id": video.id, "path": video.path, "sha256": video.sha256}
                        ),
                        queue=DESCRIBE_QUEUE,
                        priority=video.priority,
                        producer=producer,
                        retry=True,
                        retry_policy={"max_retries": 3, "interval_start": 0.5, "interval_step": 1},
                    )
                with session_scope(sessions) as session:
                    store.mark_published(session=session, video_ids=[v.id for v in chunk])
                sent += len(chunk)
    except Exception as e:  # kombu raises OperationalError, OSError... depending on transport
        unsent = len(videos) - sent
        raise BrokerUnavailable(
            f"broker {hide_password(settings.broker_url)} did not accept messages: {e}; "
            f"{unsent} videos stay queued, unconfirmed: `producer enqueue` of the same inputs, "
            "`producer reap` or a worker's sweep sends them again"
        ) from e
    finally:
        app.close()
    return sent


@dataclass
class Lost:
    """One video `send_again` found: why, and where it was."""

    video_id: int
    path: str
    why: str  # "unconfirmed", "orphaned" (its worker is dead), "stale" (running too long)
    worker: str | None = None


@dataclass
class Resent:
    """What `send_again` found, and how many messages it sent."""

    found: list[Lost] = field(default_factory=list)
    sent: int = 0

    def count(self, why: str) -> int:
        return sum(lost.why == why for lost in self.found)


def send_again(
    *,
    sessions: sessionmaker[Session],
    settings: Settings,
    unconfirmed_after_s: float | None = None,
    lapse_s: float | None = None,
    running_over_s: float | None = None,
    dry_run: bool = False,
) -> Resent:
    """Send again what was lost: every queued video whose message was never confirmed
    (recorded more than `unconfirmed_after_s` ago, default OUTBOX_GRACE_S: a producer may
    still be sending younger ones), every video running on a dead worker (stopped, or its
    heartbeat older than `lapse_s`, default 3 beats) and, if `running_over_s` is given, every
    video running longer than that. Run by `producer reap` and, every SWEEP_S, by each
    describe worker. `dry_run` only lists them."""
    if unconfirmed_after_s is None:
        unconfirmed_after_s = settings.outbox_grace_s
    if lapse_s is None:
        lapse_s = settings.heartbeat_lapse_s
    now = utcnow()
    with session_scope(sessions) as session:
        unconfirmed = store.unpublished(
            session=session, older_than=now - timedelta(seconds=unconfirmed_after_s)
        )
        orphans = store.orphaned(session=session, lapsed_before=now - timedelta(seconds=lapse_s))
        stale = []
        if running_over_s is not None:
            seen = {v.id for v in orphans}
            older = now - timedelta(seconds=running_over_s)
            stale = [
                v
                for v in store.stale_running(session=session, older_than=older)
                if v.id not in seen
            ]
        result = Resent(
            [Lost(v.id, v.path, "unconfirmed") for v in unconfirmed]
            + [Lost(v.id, v.path, "orphaned", v.worker) for v in orphans]
            + [Lost(v.id, v.path, "stale", v.worker) for v in stale]
        )
        if dry_run or not result.found:
            return result
        for video in unconfirmed:
            video.updated_at = now  # claimed: another sweep leaves it for the grace period
        for video in [*orphans, *stale]:
            store.resend(session=session, video=video)
    log.warning(
        "sending again %d unconfirmed, %d orphaned and %d stale videos",
        result.count("unconfirmed"),
        result.count("orphaned"),
        result.count("stale"),
    )
    result.sent = send([*unconfirmed, *orphans, *stale], sessions=sessions, settings=settings)
    return result


def restore_held(
    *, sessions: sessionmaker[Session], settings: Settings, lapse_s: float | None = None
) -> int:
    """Give back to their queue the messages a Redis broker still counts as handed out (for
    longer than `lapse_s`) whose videos no live worker holds: their worker was killed. Run
    before `send_again`: a video whose own message is back needs no second one, and one
    whose worker died before it could note taking it is found only this way."""
    from broker.unacked import held_messages, restore

    lapse_s = settings.heartbeat_lapse_s if lapse_s is None else lapse_s
    held = [h for h in held_messages(settings, older_than_s=lapse_s) if h.video_id is not None]
    if not held:
        return 0
    with session_scope(sessions) as session:
        lost = set(
            store.unheld(
                session=session,
                video_ids=[h.video_id for h in held],
                lapsed_before=utcnow() - timedelta(seconds=lapse_s),
            )
        )
    chosen = [h for h in held if h.video_id in lost]
    if not chosen:
        return 0
    log.warning("restoring %d messages held by a dead worker to their queue", len(chosen))
    count = restore(settings, [h.tag for h in chosen])
    with session_scope(sessions) as session:  # their own message is back: no new one
        store.restored(session=session, video_ids=[h.video_id for h in chosen])
    return count
