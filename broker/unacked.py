"""Messages a Redis broker handed out and never saw acknowledged (kombu's `unacked` hash).

Celery on Redis gives a dead worker's unacknowledged messages back only after the
visibility timeout (30 minutes by default): unlike Sidekiq's super_fetch, nothing returns
them when the worker that held them is gone. `delivery.outbox.send_again` uses these two
functions to do it at once: it lists the messages held longer than a heartbeat lapse,
decides from the store which ones no live worker holds, and restores those to their queue
through kombu's own `restore_by_tag`. Other transports keep no such record: nothing.

`missing_from_broker` finds the videos whose message Redis holds nowhere, waiting or
handed out: kombu pops a message (BRPOP) before it records it as handed out, so a worker
killed between the two loses it outright, and only a video the store says was sent but
the broker no longer holds shows it (`delivery.outbox.send_again`, "vanished").
"""

from __future__ import annotations

import base64
import json
import logging
import time
from dataclasses import dataclass

from broker.celery_app import DESCRIBE_QUEUE, make_celery, redis_lists
from config.settings import Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Held:
    """One unacknowledged message: its delivery tag and the video it asks for."""

    tag: str
    video_id: int | None
    since_s: float  # seconds since it was handed out


def held_messages(settings: Settings, *, older_than_s: float) -> list[Held]:
    """Describe messages handed out more than `older_than_s` ago and not acknowledged."""
    if not settings.broker_url.startswith(("redis://", "rediss://")):
        return []
    app = make_celery(settings)
    try:
        with app.connection_for_write() as conn:
            channel = conn.default_channel
            client = channel.client
            now = time.time()
            tags = client.zrangebyscore(
                channel.unacked_index_key, 0, now - older_than_s, withscores=True
            )
            held = []
            for tag, score in tags:
                tag = tag.decode() if isinstance(tag, bytes) else tag
                raw = client.hget(channel.unacked_key, tag)
                held.append(Held(tag, _video_id(raw), round(now - score, 1)))
            return held
    finally:
        app.close()


def missing_from_broker(settings: Settings, video_ids: list[int]) -> list[int] | None:
    """Of these videos (all those the store says were sent and no worker claimed, so each
    one's describe message should be on the queue or handed out), those whose message a
    Redis broker holds nowhere; None where the broker cannot be read this way (not Redis).

    Cheap while nothing is missing, which is nearly always: the handed-out messages are
    read (a few per worker), the queue's lists only counted, and listed only when they
    hold fewer messages than the other videos need (a fleet's window is thousands of
    messages, read by every worker's sweep). A duplicate message on the queue can hide a
    lost one from the count until it is taken."""
    if not settings.broker_url.startswith(("redis://", "rediss://")):
        return None
    keys = redis_lists(settings, DESCRIBE_QUEUE)
    app = make_celery(settings)
    try:
        with app.connection_for_write() as conn:
            channel = conn.default_channel
            with channel.client.pipeline(transaction=True) as pipe:  # one moment's view
                for key in keys:
                    pipe.llen(key)
                pipe.hvals(channel.unacked_key)
                *lengths, handed_out = pipe.execute()
            held = _video_ids(handed_out)
            rest = [video_id for video_id in video_ids if video_id not in held]
            if sum(lengths) >= len(rest):
                return []
            with channel.client.pipeline(transaction=True) as pipe:
                for key in keys:
                    pipe.lrange(key, 0, -1)
                pipe.hvals(channel.unacked_key)  # again: some were taken meanwhile
                *waiting, handed_out = pipe.execute()
    finally:
        app.close()
    present = _video_ids([raw for queue in waiting for raw in queue] + list(handed_out))
    return [video_id for video_id in rest if video_id not in present]


def _video_ids(raws) -> set[int]:
    return {video_id for raw in raws if (video_id := _video_id(raw)) is not None}


def restore(settings: Settings, tags: list[str]) -> int:
    """Put these messages back on their queues (kombu's restore_by_tag); how many."""
    if not tags:
        return 0
    app = make_celery(settings)
    try:
        with app.connection_for_write() as conn:
            qos = conn.default_channel.qos
            for tag in tags:
                qos.restore_by_tag(tag)
        return len(tags)
    finally:
        app.close()


def _video_id(raw: bytes | str | None) -> int | None:
    """The `video_id` a describe message carries (Celery protocol 2, JSON body): as the
    unacked hash keeps it (`[message, exchange, routing_key]`) or as a queue's list does
    (the message alone)."""
    if not raw:
        return None
    try:
        message = json.loads(raw)
        if isinstance(message, list):
            message = message[0]
        body = message["body"]
        if message.get("properties", {}).get("body_encoding") == "base64":
            body = base64.b64decode(body)
        _args, kwargs, _embed = json.loads(body)
        video_id = kwargs.get("video_id")
        return video_id if isinstance(video_id, int) else None
    except (ValueError, KeyError, TypeError, IndexError):
        return None  # not a describe message (or not JSON): left to the visibility timeout
