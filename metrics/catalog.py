"""The metrics each worker process exports: names, help texts, labels and buckets.

`DescribeMetrics` for a describe worker, `TrainingMetrics` for a training worker; both
carry the process-wide part (`fleetscribe_worker_info`). Each builds its own
CollectorRegistry, so two workers in one test process never share a counter.
"""

from __future__ import annotations

import contextlib

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

# Seconds, from a few milliseconds (storing one row) to minutes (a long GPU batch).
SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60, 150, 300, 600)
# Queue wait: from "taken at once" to a backlog of hours.
WAIT_SECONDS = (0.1, 0.5, 1, 5, 15, 60, 300, 900, 1800, 3600, 4 * 3600, 12 * 3600, 86400)
ROWS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 512)

# Why a describe worker failed a video (the `reason` label; the full one-line reason is in
# the store): the model could not answer, no answer within the task soft time limit, or a
# fault of the worker itself. A video failed for its file counts as rejected instead.
FAIL_REASONS = ("model", "timeout", "internal")
# The describe pipeline's stages, timed per video (the `stage` label).
STAGES = ("decode", "preprocess", "generate", "store")


class _ProcessMetrics:
    def __init__(self, kind: str) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.kind = kind
        self.info = Info(
            "fleetscribe_worker",
            "This worker process: its kind (describe or train), host:pid, model and adapter.",
            registry=self.registry,
        )

    def describe_process(self, *, host: str, model: str, adapter: str) -> None:
        self.info.info({"kind": self.kind, "host": host, "model": model, "adapter": adapter})


class DescribeMetrics(_ProcessMetrics):
    """A describe worker's counters and histograms, updated by worker.pipeline."""

    def __init__(self) -> None:
        super().__init__("describe")
        r = self.registry
        self.described = Counter(
            "fleetscribe_videos_described",
            "Videos this worker described: one report stored each (valid: schema v1 or not).",
            ["valid"],
            registry=r,
        )
        self.failed = Counter(
            "fleetscribe_videos_failed",
            "Videos this worker failed for its own side: model, timeout or internal.",
            ["reason"],
            registry=r,
        )
        self.rejected = Counter(
            "fleetscribe_videos_rejected",
            "Videos this worker failed for their file (gone, changed, not decodable, ...).",
            registry=r,
        )
        self.stage = Histogram(
            "fleetscribe_stage_seconds",
            "Seconds one video spent in each pipeline stage (generate: submit to answer, "
            "batching included).",
            ["stage"],
            buckets=SECONDS,
            registry=r,
        )
        self.queue_wait = Histogram(
            "fleetscribe_queue_wait_seconds",
            "Seconds from a video's message being sent to a worker starting it.",
            buckets=WAIT_SECONDS,
            registry=r,
        )
        self.batch_size = Histogram(
            "fleetscribe_batch_size",
            "Videos per GPU batch.",
            buckets=ROWS,
            registry=r,
        )
        self.batch_seconds = Histogram(
            "fleetscribe_batch_seconds",
            "Seconds one GPU batch took (prefill and decode).",
            buckets=SECONDS,
            registry=r,
        )
        self.answer_tokens = Counter(
            "fleetscribe_answer_tokens",
            "Answer tokens generated (rate() of it: tokens per second over time).",
            registry=r,
        )
        self.tokens_per_second = Gauge(
            "fleetscribe_answer_tokens_per_second",
            "Answer tokens per second of the last GPU batch.",
            registry=r,
        )
        for reason in FAIL_REASONS:  # every series exists from the start, at 0
            self.failed.labels(reason=reason)
        for valid in ("true", "false"):
            self.described.labels(valid=valid)
        for stage in STAGES:
            self.stage.labels(stage=stage)

    def batch(self, *, rows: int, seconds: float, tokens: int) -> None:
        """One GPU batch ran (worker.batcher)."""
        self.batch_size.observe(rows)
        self.batch_seconds.observe(seconds)
        self.answer_tokens.inc(tokens)
        if seconds > 0:
            self.tokens_per_second.set(tokens / seconds)


# The gauges of the run a training worker trains: the PROGRESS field each is set from,
# its metric name and its help text.
RUN_GAUGES = {
    "step": ("fleetscribe_training_step", "Optimizer steps done in the run."),
    "total_steps": ("fleetscribe_training_total_steps", "Steps the run will take."),
    "loss": ("fleetscribe_training_loss", "Training loss at the last logged step."),
    "learning_rate": ("fleetscribe_training_learning_rate", "Learning rate at the last step."),
    "samples_per_s": (
        "fleetscribe_training_samples_per_second",
        "Training samples per second since the run (re)started.",
    ),
}


class TrainingMetrics(_ProcessMetrics):
    """A training worker's gauges of the run it trains, and its runs by outcome."""

    def __init__(self) -> None:
        super().__init__("train")
        self.gauges = {
            field: Gauge(name, text, ["run"], registry=self.registry)
            for field, (name, text) in RUN_GAUGES.items()
        }
        self.runs = Counter(
            "fleetscribe_training_runs",
            "Runs this worker ended, by outcome (done, failed, cancelled, released, lost).",
            ["outcome"],
            registry=self.registry,
        )

    def progress(self, run: str, progress: dict) -> None:
        """A logged step of `run` (the fields of the train task's PROGRESS state)."""
        for field, gauge in self.gauges.items():
            value = progress.get(field)
            if isinstance(value, int | float):
                gauge.labels(run=run).set(value)

    def forget(self, run: str) -> None:
        """The run left this worker: its gauges go, so a dashboard shows no stale run."""
        for gauge in self.gauges.values():
            with contextlib.suppress(KeyError):  # the run never logged a step here
                gauge.remove(run)
