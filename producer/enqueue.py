"""Discover, probe, hash, dedupe and record input files in a stream: chunk by chunk, each
chunk its own transaction, probing on every core, the broker's window kept full as the
chunks land (its messages: delivery.outbox.feed). A producer killed at any point loses
nothing: what it recorded waits in SQL as the backlog, and the same command run again
resumes the batch, skipping the paths it recorded. Never imports torch."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from config.settings import Settings
from db import store
from db.models import Video, VideoState
from db.session import session_scope
from producer.fingerprint import fast_key, sha256_file
from video.errors import VideoError
from video.files import check_allowed, check_file
from video.media import VideoInfo, probe
from video.processes import KillablePool

log = logging.getLogger(__name__)

# Inputs recorded per transaction: the first chunks are small, so the first message
# leaves within a second or two whatever the archive's size, then they grow to CHUNK.
FIRST_CHUNK = 16
CHUNK = 256
FLUSH_S = 1.0  # a chunk is recorded at the latest this long after its first input came
FEED_S = 0.5  # the window is topped up this often, and whenever a chunk is recorded
REJECTED_KEPT = 1000  # rejected (path, reason) kept for the summary; the store has all


class Outcome:
    """What one input became (stored on its submission row)."""

    QUEUED = "queued"
    DUPLICATE = "duplicate"  # same content as an earlier input of this batch
    ALREADY_QUEUED = "already_queued"
    ALREADY_DONE = "already_done"
    REQUEUED = "requeued"  # failed before; sent round again
    RESENT = "resent"  # queued before, its message never sent or never confirmed
    REJECTED = "rejected"


TO_SEND = (Outcome.QUEUED, Outcome.REQUEUED, Outcome.RESENT)


@dataclass
class Inspected:
    path: str
    sha256: str | None = None
    fast_key: str | None = None
    size: int | None = None
    info: VideoInfo | None = None
    reason: str | None = None


@dataclass
class EnqueueSummary:
    batch_id: int
    outcomes: Counter = field(default_factory=Counter)
    rejected: list[tuple[str, str]] = field(default_factory=list)  # the first REJECTED_KEPT
    sent: int = 0
    resumed: int = 0  # inputs an earlier run of the same command had recorded (not probed)
    missing: list[str] = field(default_factory=list)  # inputs that do not exist

    @property
    def rejected_count(self) -> int:
        return self.outcomes[Outcome.REJECTED]


@dataclass
class Counts:
    """What the progress bar shows, and the rates it derives."""

    found: int = 0
    resumed: int = 0
    probed: int = 0
    queued: int = 0
    rejected: int = 0
    sent: int = 0
    started: float = field(default_factory=time.monotonic)
    first_sent_s: float | None = None  # seconds from the start to the first message

    def rate(self, n: int) -> float:
        return n / max(time.monotonic() - self.started, 1e-9)


def inspect_file(path: str, settings: Settings) -> Inspected:
    """Fingerprint, hash (DEDUPE_KEY=sha256) and probe one file; an unusable file comes
    back with a one-line reason."""
    result = Inspected(path)
    try:
        real = str(check_allowed(path, settings.video_roots))
    except VideoError as e:
        result.reason = str(e)
        return result
    try:
        result.size = check_file(real)  # before hashing: a FIFO would block the read
        if result.size > settings.max_video_bytes:
            raise VideoError(
                f"file is {result.size / 2**30:.1f} GiB, over the "
                f"{settings.max_video_bytes / 2**30:.0f} GiB limit (FLEETSCRIBE_MAX_VIDEO_BYTES)"
            )
        result.fast_key = fast_key(real, result.size)
        if settings.dedupe_key == "sha256":
            result.sha256 = sha256_file(real)
        result.info = probe(real)
    except VideoError as e:
        result.reason = str(e)
    except OSError as e:
        result.reason = f"cannot read: {e.strerror or e}"
    return result


def probe_pool(settings: Settings) -> KillablePool:
    """The killable processes that inspect files: one per core (PROBE_PROCESSES)."""
    return KillablePool(
        processes=settings.probe_processes or os.cpu_count() or 1,
        timeout_s=settings.probe_timeout_s,
        memory_gib=settings.decode_memory_gib,
        what="probing",
    )


def inspect_stream(
    paths: Iterator[str], pool: KillablePool, settings: Settings, *, ahead: int = 4 * CHUNK
) -> Iterator[Inspected]:
    """Inspect paths as they come in killable processes (a file whose open or read blocks,
    or whose probe crashes, is rejected alone, after `probe_timeout_s`), every pool process
    busy, at most `ahead` in flight;
    results in input order, each as soon as it and those before it are done. Paths are
    pulled on a thread of their own, so a slow listing (a network mount) never holds up
    the results already done, nor the results a slow listing."""
    threads = ThreadPoolExecutor(max_workers=pool.processes, thread_name_prefix="probe")
    futures: queue.Queue = queue.Queue(maxsize=ahead)
    stop = threading.Event()

    def pull() -> None:
        try:
            for path in paths:
                if stop.is_set():
                    return
                futures.put(threads.submit(_inspect_in, pool, path, settings))
        except BaseException as e:  # a manifest that cannot be read: raised below
            futures.put(e)
            return
        futures.put(None)

    puller = threading.Thread(target=pull, name="fleetscribe-discover", daemon=True)
    puller.start()
    try:
        while (item := futures.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            yield item.result()
    finally:
        stop.set()
        while puller.is_alive():  # let a puller blocked on a full queue see `stop`
            with contextlib.suppress(queue.Empty):
                futures.get(timeout=0.1)
        threads.shutdown(wait=True, cancel_futures=True)


def _inspect_in(pool: KillablePool, path: str, settings: Settings) -> Inspected:
    try:
        return pool.run(inspect_file, path, settings)
    except VideoError as e:  # killed past the timeout, crashed, or over the memory cap
        return Inspected(path, reason=str(e))


def command_key(
    inputs: list[str], manifest: str | None, *, frames: int, priority: int, sampling: str
) -> str:
    """The fingerprint of an enqueue command: the same inputs (as absolute paths), frames,
    priority and sampling give the same key, so a second run resumes the first's batch."""
    absolute = [os.path.abspath(os.path.expanduser(p)) for p in inputs]
    document = {
        "inputs": absolute,
        "manifest": os.path.abspath(manifest) if manifest else None,
        "frames": frames,
        "priority": priority,
        "sampling": sampling,
    }
    return hashlib.sha256(json.dumps(document, sort_keys=True).encode()).hexdigest()


class Enqueue:
    """One `producer enqueue`: discover -> probe (every core) -> record a chunk per
    transaction -> top up the broker's window. `feed` sends what the window has room for
    (delivery.outbox.feed) and returns how many it sent; `on_progress` sees the counts
    after every input. `sampling` is stored on each new video (None: each worker's
    setting decides)."""

    def __init__(
        self,
        *,
        sessions: sessionmaker[Session],
        settings: Settings,
        frames: int,
        priority: int,
        note: str,
        key: str | None,
        sampling: str | None = None,
        feed: Callable[[], int] | None = None,
        on_progress: Callable[[Counts], None] | None = None,
    ) -> None:
        self.sessions = sessions
        self.settings = settings
        self.frames = frames
        self.sampling = sampling
        self.priority = priority
        self.note = note
        self.key = key
        self.feed = feed
        self.on_progress = on_progress or (lambda _c: None)
        self.counts = Counts()
        self.summary: EnqueueSummary | None = None
        self._in_flight: set[str] = set()  # found, not yet recorded
        self._feeder: _Feeder | None = None

    def run(self, paths: Iterable[str]) -> EnqueueSummary:
        """Record and send every input; the batch is created (or resumed) first. The window
        is topped up on a thread of its own, so a slow or hung broker never holds the
        recording up: everything is in SQL before the last feed. BrokerUnavailable, once
        everything is recorded, if the broker refused."""
        self._open_batch()
        self._feeder = _Feeder(self._feed_once) if self.feed is not None else None
        pool = probe_pool(self.settings)
        try:
            self._record_stream(inspect_stream(self._fresh(iter(paths)), pool, self.settings))
        finally:
            pool.close()
        with session_scope(self.sessions) as session:
            store.complete_batch(session=session, batch_id=self.summary.batch_id)
        if self._feeder is not None:
            self._feeder.finish()
        return self.summary

    def _open_batch(self) -> None:
        with session_scope(self.sessions) as session:
            batch, recorded = store.open_batch(
                session=session,
                key=self.key,
                frames=self.frames,
                priority=self.priority,
                note=self.note,
            )
            self.summary = EnqueueSummary(batch.id, resumed=recorded)
        if recorded:
            log.info("resuming batch %d: %d inputs already recorded", batch.id, recorded)

    def _fresh(self, paths: Iterator[str]) -> Iterator[str]:
        """The paths not yet recorded in this batch (by an earlier run of the same command,
        or earlier in this one), asked of the store a group at a time."""
        group: list[str] = []
        size = FIRST_CHUNK
        for path in paths:
            self.counts.found += 1
            group.append(path)
            if len(group) >= size:
                yield from self._unrecorded(group)
                group, size = [], CHUNK
        yield from self._unrecorded(group)

    def _unrecorded(self, group: list[str]) -> Iterator[str]:
        if not group:
            return
        with session_scope(self.sessions) as session:
            known = store.recorded_paths(
                session=session, batch_id=self.summary.batch_id, paths=group
            )
        for path in group:
            if path in known:
                self.counts.resumed += 1
            elif path not in self._in_flight:
                self._in_flight.add(path)
                yield path
        self.on_progress(self.counts)

    def _record_stream(self, results: Iterator[Inspected]) -> None:
        chunk: list[Inspected] = []
        size, since = FIRST_CHUNK, time.monotonic()
        for item in results:
            self.counts.probed += 1
            if not chunk:
                since = time.monotonic()
            chunk.append(item)
            if len(chunk) >= size or time.monotonic() - since >= FLUSH_S:
                self._record(chunk)
                chunk, size = [], min(size * 2, CHUNK)
            self.on_progress(self.counts)
        if chunk:
            self._record(chunk)

    def _record(self, chunk: list[Inspected]) -> None:
        if self.settings.dedupe_key == "fast":
            self._hash_where_only_sha256_knows(chunk)
        outcomes = record_chunk(
            chunk,
            sessions=self.sessions,
            batch_id=self.summary.batch_id,
            frames=self.frames,
            priority=self.priority,
            sampling=self.sampling,
        )
        for item, (outcome, reason) in zip(chunk, outcomes, strict=True):
            self._in_flight.discard(item.path)
            self.summary.outcomes[outcome] += 1
            if outcome in TO_SEND:
                self.counts.queued += 1
            elif outcome == Outcome.REJECTED:
                self.counts.rejected += 1
                if len(self.summary.rejected) < REJECTED_KEPT:
                    self.summary.rejected.append((item.path, reason))
                if item.size is None and not os.path.lexists(item.path):
                    self.summary.missing.append(item.path)
        if self._feeder is not None:
            self._feeder.poke()
        self.on_progress(self.counts)

    def _hash_where_only_sha256_knows(self, chunk: list[Inspected]) -> None:
        """DEDUPE_KEY=fast: an input whose size equals that of a video recorded without a
        fast key (before the fast key existed) is hashed whole, so that the same content
        is found under its sha256 instead of recorded twice."""
        sizes = {item.size for item in chunk if item.size is not None and item.sha256 is None}
        with session_scope(self.sessions) as session:
            shared = store.sizes_without_fast_key(session=session, sizes=sizes)
        for item in chunk:
            if item.size in shared and item.sha256 is None and item.reason is None:
                try:
                    item.sha256 = sha256_file(item.path)
                except OSError as e:
                    item.reason = f"cannot read: {e.strerror or e}"

    def _feed_once(self) -> None:
        sent = self.feed()
        if sent and self.counts.first_sent_s is None:
            self.counts.first_sent_s = time.monotonic() - self.counts.started
        self.counts.sent += sent
        self.summary.sent += sent


class _Feeder:
    """Tops the broker's window up on its own thread: at once when poked (a chunk was
    recorded), else every FEED_S; `finish` feeds once more, waits for it, and raises what
    a feed raised (after which it stopped feeding: the rest stays backlog)."""

    def __init__(self, feed_once: Callable[[], None]) -> None:
        self._feed_once = feed_once
        self._wake = threading.Event()
        self._last = False
        self.error: Exception | None = None
        self._thread = threading.Thread(target=self._loop, name="fleetscribe-feeder", daemon=True)
        self._thread.start()

    def poke(self) -> None:
        self._wake.set()

    def _loop(self) -> None:
        while True:
            self._wake.wait(FEED_S)
            self._wake.clear()
            last = self._last
            try:
                self._feed_once()
            except Exception as e:  # BrokerUnavailable, a store error: said by finish
                self.error = e
                return
            if last:
                return

    def finish(self) -> None:
        self._last = True
        self._wake.set()
        self._thread.join()
        if self.error is not None:
            raise self.error


def record_chunk(
    items: list[Inspected],
    *,
    sessions: sessionmaker[Session],
    batch_id: int,
    frames: int,
    priority: int,
    sampling: str | None = None,
) -> list[tuple[str, str]]:
    """Record one chunk of inspected inputs in one transaction: a video row per new
    content (queued: the backlog, its message sent by the feeder) and a submission per
    input, in a few statements for the whole chunk. Returns each input's (outcome,
    reason). If another producer stored some of the same content meanwhile (a unique
    key refused the chunk), the chunk is recorded again an input at a time. New and
    requeued videos get `frames`, `priority` and `sampling` (None: the worker's)."""
    place = _Placement(batch_id=batch_id, frames=frames, priority=priority, sampling=sampling)
    try:
        with session_scope(sessions) as session:
            out = place.chunk(session, items)
            store.count_inputs(session=session, batch_id=batch_id, added=len(items))
            return out
    except IntegrityError:
        log.info("another producer recorded some of these files meanwhile: one at a time")
    out = []
    with session_scope(sessions) as session:
        for item in items:
            for attempt in (1, 2):  # the second finds the other producer's row
                try:
                    with session.begin_nested():
                        out += place.chunk(session, [item])
                    break
                except IntegrityError:
                    if attempt == 2:
                        raise
        store.count_inputs(session=session, batch_id=batch_id, added=len(items))
    return out


def record(
    items: list[Inspected],
    *,
    sessions: sessionmaker[Session],
    frames: int,
    priority: int,
    note: str,
    sampling: str | None = None,
) -> tuple[EnqueueSummary, list[Video]]:
    """Record a list of inspected inputs as one new, complete batch. Returns the summary
    and the videos that need a message (new or requeued)."""
    with session_scope(sessions) as session:
        batch = store.create_batch(
            session=session, frames=frames, priority=priority, inputs=0, note=note
        )
        store.complete_batch(session=session, batch_id=batch.id)
    summary = EnqueueSummary(batch.id)
    outcomes = record_chunk(
        items,
        sessions=sessions,
        batch_id=batch.id,
        frames=frames,
        priority=priority,
        sampling=sampling,
    )
    for item, (outcome, reason) in zip(items, outcomes, strict=True):
        summary.outcomes[outcome] += 1
        if outcome == Outcome.REJECTED:
            summary.rejected.append((item.path, reason))
    with session_scope(sessions) as session:
        ids = store.batch_backlog_ids(session=session, batch_id=batch.id)
        to_send = [session.get(Video, i) for i in ids]
    return summary, to_send


def _video_fields(
    item: Inspected, *, batch_id: int, frames: int, priority: int, sampling: str | None
) -> dict:
    fields = {
        "path": item.path,
        "sha256": item.sha256,
        "fast_key": item.fast_key,
        "dedupe": "sha256" if item.sha256 else ("fast" if item.fast_key else None),
        "bytes": item.size,
        "batch_id": batch_id,
        "frames": frames,
        "sampling": sampling,
        "priority": priority,
    }
    if item.info is not None:
        info = item.info
        fields.update(
            duration=info.duration,
            codec=info.codec,
            container=info.container,
            width=info.width,
            height=info.height,
            fps=info.fps,
            rotation=info.rotation,
            state=VideoState.QUEUED,
        )
    else:
        fields.update(state=VideoState.REJECTED, reason=item.reason)
    return fields


@dataclass
class _Placement:
    """Decides what each input of a chunk becomes, with a few queries for the chunk: the
    stored videos with the same sha256 or fast key, and which of them this batch has."""

    batch_id: int
    frames: int
    priority: int
    sampling: str | None

    def chunk(self, session: Session, items: list[Inspected]) -> list[tuple[str, str]]:
        by_sha = store.videos_by_sha256(
            session=session, sha256s={i.sha256 for i in items if i.sha256}
        )
        by_key = store.videos_by_fast_key(
            session=session, fast_keys={i.fast_key for i in items if i.fast_key}
        )
        known = {v.id for v in by_sha.values()} | {v.id for vs in by_key.values() for v in vs}
        in_batch = store.submitted_videos(session=session, batch_id=self.batch_id, ids=known)
        placed: list[tuple[Video, str]] = []
        new: list[Video] = []
        for item in items:
            existing = _same_content(item, by_sha, by_key)
            if existing is None:
                video = Video(
                    **_video_fields(
                        item,
                        batch_id=self.batch_id,
                        frames=self.frames,
                        priority=self.priority,
                        sampling=self.sampling,
                    )
                )
                new.append(video)
                if item.sha256:
                    by_sha[item.sha256] = video
                if item.fast_key:
                    by_key.setdefault(item.fast_key, []).insert(0, video)
                in_batch.add(id(video))
                queued = video.state == VideoState.QUEUED
                placed.append((video, Outcome.QUEUED if queued else Outcome.REJECTED))
                continue
            placed.append((existing, self._again(session, existing, in_batch)))
        if new:
            session.add_all(new)
            session.flush()  # one INSERT for the chunk's new videos: their ids
        store.add_submissions(
            session=session,
            rows=[
                {"batch_id": self.batch_id, "path": item.path, "video_id": video.id, "outcome": o}
                for item, (video, o) in zip(items, placed, strict=True)
            ],
        )
        return [
            (o, video.reason or item.reason or "")
            for item, (video, o) in zip(items, placed, strict=True)
        ]

    def _again(self, session: Session, existing: Video, in_batch: set) -> str:
        """The outcome of an input whose content is already stored as `existing`."""
        mark = existing.id if existing.id is not None else id(existing)
        if mark in in_batch:
            return Outcome.DUPLICATE
        in_batch.add(mark)
        if existing.state == VideoState.FAILED:
            store.requeue_video(
                session=session,
                video=existing,
                batch_id=self.batch_id,
                frames=self.frames,
                priority=self.priority,
                sampling=self.sampling,
            )
            return Outcome.REQUEUED
        if existing.state == VideoState.REJECTED:
            return Outcome.REJECTED
        if existing.state == VideoState.DONE:
            return Outcome.ALREADY_DONE
        if existing.state == VideoState.QUEUED and existing.published_at is None:
            # waiting in the backlog, or its message was never confirmed: the feeder sends it
            return Outcome.RESENT
        return Outcome.ALREADY_QUEUED


def _same_content(
    item: Inspected, by_sha: dict[str, Video], by_key: dict[str, list[Video]]
) -> Video | None:
    """The stored (or just placed) video with this input's content: by sha256 when the
    input has one, else by the fast key; a video recorded by its fast key alone (no
    sha256) is matched by the fast key in either mode. A fast key shared by two videos
    whose sha256 differ is a collision: logged, and the sha256 decides."""
    if item.sha256 and (found := by_sha.get(item.sha256)) is not None:
        if found.fast_key is None and item.fast_key:
            found.fast_key = item.fast_key  # recorded before the fast key existed
        return found
    for candidate in by_key.get(item.fast_key or "", []):
        if candidate.sha256 is None or item.sha256 is None:
            return candidate
        log.warning(
            "fast key collision: %s and video %s (%s) share fast key %s but not their "
            "sha256; kept apart",
            item.path,
            candidate.id,
            candidate.path,
            item.fast_key,
        )
    return None
