"""What a scrape reads at that moment: queue depths, the store's videos by state, GPU memory.

Each is a prometheus_client custom collector. The broker and the store are asked at most
once per `ttl_s` (several workers are scraped every 15 s, and each would otherwise ask on
every scrape); a broker or store that does not answer leaves the family out of that scrape
and sets `fleetscribe_source_up{source=...}` to 0, so a dashboard sees it go dark instead
of a stale number.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)


class _Cached(Collector):
    """Reads its source at most once per `ttl_s`; a failed read is remembered as down."""

    source = ""

    def __init__(self, ttl_s: float = 5.0) -> None:
        self.ttl_s = ttl_s
        self._lock = threading.Lock()
        self._at = float("-inf")
        self._value = None
        self._up = False

    def read(self):
        raise NotImplementedError

    def families(self, value) -> Iterator[Metric]:
        raise NotImplementedError

    def describe(self) -> list[Metric]:
        return []  # nothing is read at registration; the names come with the first scrape

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            if time.monotonic() - self._at >= self.ttl_s:
                self._at = time.monotonic()
                try:
                    self._value, self._up = self.read(), True
                except Exception as e:  # a broker or store away must not break the scrape
                    log.warning("metrics: could not read the %s: %s", self.source, e)
                    self._value, self._up = None, False
            value, up = self._value, self._up
        gauge = GaugeMetricFamily(
            "fleetscribe_source_up",
            "1 when the last read of the source for these metrics answered.",
            labels=["source"],
        )
        gauge.add_metric([self.source], 1.0 if up else 0.0)
        yield gauge
        if up and value is not None:
            yield from self.families(value)


class QueueDepthCollector(_Cached):
    """`fleetscribe_queue_depth{queue}` for every fleetscribe queue (all priorities), read
    from the broker (broker.celery_app.queue_depths), whether or not a worker consumes it;
    `fleetscribe_queue_unacked` on Redis: messages taken by workers and not yet acked."""

    source = "broker"

    def __init__(self, settings, ttl_s: float = 5.0) -> None:
        super().__init__(ttl_s)
        self.settings = settings

    def read(self):
        from broker.celery_app import queue_depths

        depths = queue_depths(self.settings, timeout_s=2.0)
        if depths.unknown:
            raise RuntimeError(depths.unknown)
        return depths

    def families(self, depths) -> Iterator[Metric]:
        from broker.celery_app import DESCRIBE_QUEUE, TRAIN_QUEUE

        gauge = GaugeMetricFamily(
            "fleetscribe_queue_depth",
            "Messages waiting in each fleetscribe queue (all priorities), from the broker.",
            labels=["queue"],
        )
        for queue in (DESCRIBE_QUEUE, TRAIN_QUEUE):
            gauge.add_metric([queue], float(depths.waiting(queue) or 0))
        yield gauge
        if depths.unacked is not None:
            yield GaugeMetricFamily(
                "fleetscribe_queue_unacked",
                "Messages workers took and have not acknowledged yet (Redis, all queues).",
                value=float(depths.unacked),
            )


class StoreCollector(_Cached):
    """`fleetscribe_videos{state}`: the store's videos in each state, the producer's
    rejections included (every worker reports the same store: take max() across them)."""

    source = "store"

    def __init__(self, sessions, ttl_s: float = 15.0) -> None:
        super().__init__(ttl_s)
        self.sessions = sessions

    def read(self):
        from db import store
        from db.session import session_scope

        with session_scope(self.sessions) as session:
            return store.state_counts(session=session).counts

    def families(self, counts) -> Iterator[Metric]:
        from db.models import VideoState

        gauge = GaugeMetricFamily(
            "fleetscribe_videos", "Videos in the store by state.", labels=["state"]
        )
        for state in VideoState:
            gauge.add_metric([state.value], float(counts.get(state, 0)))
        yield gauge


class GpuMemoryCollector(Collector):
    """`fleetscribe_gpu_memory_bytes{kind}` (in_use, reserved, peak) from `read`, a function
    of the worker's (models.memory.gpu_memory) that returns None off the GPU."""

    def __init__(self, read: Callable[[], dict[str, int] | None]) -> None:
        self.read = read

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        try:
            memory = self.read()
        except Exception as e:
            log.warning("metrics: could not read GPU memory: %s", e)
            return
        if memory is None:
            return
        gauge = GaugeMetricFamily(
            "fleetscribe_gpu_memory_bytes",
            "GPU memory of this process: in_use (allocated), reserved (the allocator's "
            "cache) and peak (most allocated since start).",
            labels=["kind"],
        )
        for kind, value in sorted(memory.items()):
            gauge.add_metric([kind], float(value))
        yield gauge
