"""Send describe messages, keep the store's outbox mark true, and keep the broker's
window full from the backlog in SQL.

A video row is written `queued` with no message: the backlog. The feeder (`feed`) sends
the backlog's first videos (highest priority, then oldest) while the broker holds fewer
than the window's size (QUEUE_WINDOW: a few minutes of the workers' throughput), so a
million queued videos cost the broker a window of messages, not a gigabyte. Once the
broker has taken a message (kombu's publish returned: Redis answered the LPUSH), the row
gets `published_at`. A producer killed mid-send, or a broker that accepted the connection
and never answered, leaves rows without the mark: they are still backlog, and are sent
again. A message sent twice is harmless: the worker finds the stored report, or the
report's unique key keeps a second one out.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from math import ceil

from sqlalchemy.orm import Session, sessionmaker

from broker.celery_app import DESCRIBE_QUEUE, DESCRIBE_TASK, make_celery, queue_depths
from config.settings import Settings, hide_password
from db import store
from db.models import Video, utcnow
from db.session import exclusive, session_scope
from delivery.errors import BrokerUnavailable

log = logging.getLogger(__name__)

# Messages between two outbox marks: a producer killed mid-send resends at most this many
# messages that had in fact gone out.
CHUNK = 200
# The window when QUEUE_WINDOW is 0: never under WINDOW_FLOOR messages nor 2 batches per
# live worker, else QUEUE_WINDOW_MINUTES of the throughput measured over RATE_WINDOW.
WINDOW_FLOOR = 256
RATE_WINDOW = timedelta(minutes=5)
_FEED_LOCK = 0x666C656574  # PostgreSQL advisory lock key: one feeder at a time


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
                        kwargs={
                            "video_id": video.id,
                            "path": video.path,
                            "frames": video.frames,
                            "sampling": video.sampling,
                        },
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


def window_size(*, session: Session, settings: Settings) -> int:
    """How many describe messages the broker may hold: QUEUE_WINDOW, or when 0, sized from
    the workers' measured throughput (QUEUE_WINDOW_MINUTES of work), at least two batches
    per live worker and WINDOW_FLOOR."""
    if settings.queue_window:
        return settings.queue_window
    now = utcnow()
    live = store.live_workers(
        session=session, lapsed_before=now - timedelta(seconds=settings.heartbeat_lapse_s)
    )
    finished = store.finished_since(session=session, since=now - RATE_WINDOW)
    per_minute = finished / (RATE_WINDOW.total_seconds() / 60)
    by_rate = ceil(per_minute * settings.queue_window_minutes)
    return max(WINDOW_FLOOR, 2 * settings.batch_size * max(live, 1), by_rate)


@dataclass
class Window:
    """The broker's window of describe messages, and the backlog behind it."""

    size: int
    waiting: int  # messages the broker holds for the describe queue (or the store's count)
    backlog: int  # queued videos whose message is not sent
    counted_by: str  # "broker" or "store" (a broker that cannot say: the in-memory one)


def window(*, sessions: sessionmaker[Session], settings: Settings) -> Window:
    with session_scope(sessions) as session:
        size = window_size(session=session, settings=settings)
        waiting, counted_by = _waiting(session, settings)
        return Window(size, waiting, store.backlog_count(session=session), counted_by)


def _waiting(session: Session, settings: Settings) -> tuple[int, str]:
    waiting = queue_depths(settings).waiting(DESCRIBE_QUEUE)
    if waiting is None:
        return store.sent_not_taken(session=session), "store"
    return waiting, "broker"


def feed(*, sessions: sessionmaker[Session], settings: Settings) -> int:
    """Top the broker's window up from the backlog, highest priority first, then oldest;
    how many messages it sent. One feeder at a time on PostgreSQL (another one busy: 0).
    BrokerUnavailable if the broker refuses; what was not confirmed stays backlog."""
    with exclusive(sessions, _FEED_LOCK) as mine:
        if not mine:
            return 0
        with session_scope(sessions) as session:
            size = window_size(session=session, settings=settings)
            waiting, _ = _waiting(session, settings)
            videos = store.backlog(session=session, limit=size - waiting)
        return send(videos, sessions=sessions, settings=settings)


@dataclass
class Lost:
    """One video `send_again` found: why, and where it was."""

    video_id: int
    path: str
    # "orphaned" (its worker is dead), "stale" (running too long), "vanished" (its message
    # is nowhere on the broker: popped by a worker killed before it recorded taking it)
    why: str
    worker: str | None = None


@dataclass
class Resent:
    """What `send_again` found, the backlog it joined, and how many messages it sent."""

    found: list[Lost] = field(default_factory=list)
    sent: int = 0
    backlog: int = 0  # queued videos whose message is not sent, before feeding

    def count(self, why: str) -> int:
        return sum(lost.why == why for lost in self.found)


def send_again(
    *,
    sessions: sessionmaker[Session],
    settings: Settings,
    lapse_s: float | None = None,
    running_over_s: float | None = None,
    dry_run: bool = False,
    recheck_s: float = 1.0,
) -> Resent:
    """Put back in the backlog every video running on a dead worker (stopped, or its
    heartbeat older than `lapse_s`, default 3 beats), every video whose message vanished
    (`_vanished`) and, if `running_over_s` is given, every video running longer than that;
    then top the window up (`feed`), which also sends what a dead producer left unsent. Run
    by `producer reap` and, every SWEEP_S, by each describe worker. `dry_run` only lists
    them."""
    if lapse_s is None:
        lapse_s = settings.heartbeat_lapse_s
    now = utcnow()
    lapsed_before = now - timedelta(seconds=lapse_s)
    vanished_ids = _vanished(
        sessions=sessions, settings=settings, published_before=lapsed_before, recheck_s=recheck_s
    )
    with session_scope(sessions) as session:
        orphans = store.orphaned(session=session, lapsed_before=lapsed_before)
        seen = {v.id for v in orphans}
        vanished = [
            v
            for v in store.still_sent_unclaimed(
                session=session, video_ids=vanished_ids, published_before=lapsed_before
            )
            if v.id not in seen
        ]
        seen |= {v.id for v in vanished}
        stale = []
        if running_over_s is not None:
            older = now - timedelta(seconds=running_over_s)
            stale = [
                v
                for v in store.stale_running(session=session, older_than=older)
                if v.id not in seen
            ]
        result = Resent(
            [Lost(v.id, v.path, "orphaned", v.worker) for v in orphans]
            + [Lost(v.id, v.path, "vanished") for v in vanished]
            + [Lost(v.id, v.path, "stale", v.worker) for v in stale]
        )
        if not dry_run:
            for video in [*orphans, *vanished, *stale]:
                store.resend(session=session, video=video)
        result.backlog = store.backlog_count(session=session)
    if dry_run:
        return result
    if result.found:
        log.warning(
            "sending again %d orphaned, %d vanished and %d stale videos",
            result.count("orphaned"),
            result.count("vanished"),
            result.count("stale"),
        )
    result.sent = feed(sessions=sessions, settings=settings)
    return result


def _vanished(
    *,
    sessions: sessionmaker[Session],
    settings: Settings,
    published_before: datetime,
    recheck_s: float,
) -> list[int]:
    """Videos sent before `published_before`, claimed by no worker, whose message the
    broker holds at neither of two looks `recheck_s` apart. kombu's Redis transport pops a
    message before it records it as handed out, so a worker killed between the two loses
    it: no visibility timeout ever brings it back. A live worker records what it popped
    within milliseconds, hence the second look. Brokers that cannot be listed: none."""
    from broker.unacked import missing_from_broker

    with session_scope(sessions) as session:
        rows = store.sent_unclaimed(session=session, published_before=published_before)
    # All of them, for the broker's count; only those sent before the lapse can be lost.
    sent = [video_id for video_id, _ in rows]
    missing = [video_id for video_id, old in rows if old]
    for look in range(2):
        if not missing:
            return []
        if look:
            time.sleep(recheck_s)
        try:
            gone = missing_from_broker(settings, sent)
        except Exception as e:  # redis, kombu or OSError: the broker is away; next sweep
            log.warning("could not list the broker's messages (%s: %s)", type(e).__name__, e)
            return []
        if gone is None:
            return []
        gone_now = set(gone)
        missing = [video_id for video_id in missing if video_id in gone_now]
    return missing


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
