"""The loop a worker process runs on its heartbeat thread: renew its claim often, send
again what was lost less often. The describe worker renews its `workers` row and sweeps
the outbox (worker/lifecycle.py); the training worker renews its run's lease and sends
runs whose lease lapsed (training/lifecycle.py)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)


def beat_and_sweep(
    quiet: threading.Event,
    *,
    heartbeat_s: float,
    sweep_s: float,
    beat: Callable[[], None],
    sweep: Callable[[], None],
    sweep_at_first_beat: bool,
    what: str,
) -> None:
    """Until `quiet` is set: `beat` every min(heartbeat_s, sweep_s), and `sweep` every
    `sweep_s` (at the first beat too, if `sweep_at_first_beat`). A failure (the database
    or the broker is away) is logged as "`what` failed" and tried again at the next beat."""
    next_sweep = time.monotonic() + (0 if sweep_at_first_beat else sweep_s)
    while not quiet.wait(min(heartbeat_s, sweep_s)):
        try:
            beat()
            if time.monotonic() >= next_sweep:
                sweep()
                next_sweep = time.monotonic() + sweep_s
        except Exception as e:
            log.warning("%s failed (%s: %s); again soon", what, type(e).__name__, e)
