"""Serving a registry at /metrics on FLEETSCRIBE_METRICS_PORT (prometheus_client's server)."""

from __future__ import annotations

import logging

from prometheus_client import CollectorRegistry, start_http_server

from config.errors import ExpectedError

log = logging.getLogger(__name__)


class MetricsPortError(ExpectedError):
    """FLEETSCRIBE_METRICS_PORT cannot be listened on (taken, not allowed)."""


class MetricsServer:
    """prometheus_client's HTTP server on its own daemon thread; `close` stops it."""

    def __init__(self, registry: CollectorRegistry, *, port: int, addr: str = "0.0.0.0"):
        try:
            self._server, self._thread = start_http_server(port, addr=addr, registry=registry)
        except OSError as e:
            raise MetricsPortError(
                f"cannot serve metrics on {addr}:{port} (FLEETSCRIBE_METRICS_PORT): "
                f"{e.strerror or e}"
            ) from None
        self.port = self._server.server_address[1]
        log.info("metrics on http://%s:%s/metrics", addr, self.port)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def serve_process(
    metrics, settings, *, host: str, model: str, adapter: str, gpu_memory, sessions=None
) -> MetricsServer | None:
    """A worker process's /metrics on FLEETSCRIBE_METRICS_PORT (None when it is 0): its
    own `metrics` (metrics.catalog), who it is, its GPU memory (`gpu_memory`, a function
    returning None off the GPU), the depth of every queue and, given `sessions`, the
    store's videos by state."""
    from metrics.collectors import GpuMemoryCollector, QueueDepthCollector, StoreCollector

    if not settings.metrics_port:
        return None
    metrics.describe_process(host=host, model=model, adapter=adapter)
    metrics.registry.register(GpuMemoryCollector(gpu_memory))
    metrics.registry.register(QueueDepthCollector(settings))
    if sessions is not None:
        metrics.registry.register(StoreCollector(sessions))
    return MetricsServer(metrics.registry, port=settings.metrics_port)
