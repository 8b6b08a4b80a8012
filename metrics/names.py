"""Every metric name the workers export, as Prometheus sees them (for the dashboard check)."""

from __future__ import annotations

from prometheus_client.core import Metric

from metrics.catalog import DescribeMetrics, TrainingMetrics

# The names of what the collectors yield on a scrape (they read nothing until then).
_COLLECTED = {
    "fleetscribe_source_up": "gauge",
    "fleetscribe_queue_depth": "gauge",
    "fleetscribe_queue_unacked": "gauge",
    "fleetscribe_videos": "gauge",
    "fleetscribe_gpu_memory_bytes": "gauge",
}


def names() -> set[str]:
    """Sample names (with _total, _bucket, _sum, _count, _info), as PromQL names them."""
    found: set[str] = set()
    for metrics in (DescribeMetrics(), TrainingMetrics()):
        metrics.describe_process(host="h:1", model="m", adapter="")
        for family in metrics.registry.collect():
            found |= _sample_names(family)
    return found | set(_COLLECTED)


def _sample_names(family: Metric) -> set[str]:
    suffixes = {
        "counter": ("_total", "_created"),
        "histogram": ("_bucket", "_sum", "_count", "_created"),
        "info": ("_info",),
        "gauge": ("",),
    }[family.type]
    return {family.name + s for s in suffixes}
