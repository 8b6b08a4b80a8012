"""Prometheus metrics of the worker processes (the official prometheus_client).

Each describe or training worker process builds one `metrics.catalog` object on its own
registry (never the library's global one, never at import time), updates it as it works,
and serves it on FLEETSCRIBE_METRICS_PORT (`metrics.server`, 0 = off). What is read only
when Prometheus scrapes lives in `metrics.collectors`: the depth of every fleetscribe queue
(from the broker), the store's videos by state, and GPU memory (through a function the
worker hands in, so this package never imports torch).

Shared by both workers, so it sits below them, beside `delivery`, and above `db` and
`broker`, which it reads. `names()` lists every metric name the code exports: the Grafana
dashboard (compose/grafana) is checked against it.
"""
