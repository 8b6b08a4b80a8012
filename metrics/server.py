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


def serve(registry: CollectorRegistry, port: int) -> MetricsServer | None:
    """The server for `port`; None when metrics are off (port 0)."""
    return MetricsServer(registry, port=port) if port else None
