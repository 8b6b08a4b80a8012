"""The `train` task: take a run's lease, run the job, record how it ended. Thin.

Progress goes three ways: the run's row (and one `training_steps` row a step) for
`python -m training status` and SQL, the Celery task state (`PROGRESS`, with step, loss,
learning rate, samples/s and ETA) for Flower beside the describe tasks, and the log.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict

from celery.exceptions import Reject

from config.errors import ExpectedError
from db import training as runs
from db.models import INTERNAL_ERROR, RunState
from db.session import session_scope
from models.runner import RunnerConfig
from training.job import JobSpec, Outcome, Progress, Stop, run_job
from training.lifecycle import TrainingRuntime
from training.recipe import from_stored

log = logging.getLogger(__name__)
# Cancel requests are read from SQL at most this often (not at every step of a fast run).
_CANCEL_POLL_S = 2.0


class RunHooks:
    """The job's hooks for one run: records to SQL and Celery, answers when to stop."""

    def __init__(self, task, rt: TrainingRuntime, run_id: int, stored: dict, name: str = ""):
        self.task = task
        self.rt = rt
        self.run_id = run_id
        self.name = name or str(run_id)  # the run's label in the metrics
        self.stored = stored  # the run's config as submitted
        self._cancel_checked = 0.0
        self._cancelled = False

    def started(self, *, split: dict, skipped: list, quantization: dict | None) -> None:
        # Recorded by the first attempt (record_start); every resume must match it.
        if "quantization" in self.stored and self.stored["quantization"] != quantization:
            raise RunMismatch(
                f"the base now loads with quantization {quantization}, but this run started "
                f"with {self.stored['quantization']}: a resume must rebuild the identical "
                "4-bit base"
            )
        with session_scope(self.rt.sessions) as session:
            runs.record_start(
                session=session,
                run_id=self.run_id,
                split=split,
                skipped=[asdict(s) for s in skipped],
                quantization=quantization,
            )
        self.stored["quantization"] = quantization

    def step(self, progress: Progress) -> None:
        with session_scope(self.rt.sessions) as session:
            runs.record_step(
                session=session,
                run_id=self.run_id,
                owner=self.rt.host,
                step=progress.step,
                total_steps=progress.total_steps,
                epoch=progress.epoch,
                loss=progress.loss,
                learning_rate=progress.learning_rate,
                grad_norm=progress.grad_norm,
                samples_per_s=progress.samples_per_s,
                eta_s=progress.eta_s,
            )
        meta = {"run_id": self.run_id, **asdict(progress)}
        self.rt.metrics.progress(self.name, meta)
        try:
            self.task.update_state(state="PROGRESS", meta=meta)
            self.task.send_event("task-progress", **meta)
        except Exception as e:  # Flower's view is a convenience; the store has it all
            log.debug("could not publish progress: %s", e)
        log.info(
            "run %s: step %d/%d loss %.4f lr %s, %s samples/s, eta %s s",
            self.run_id,
            progress.step,
            progress.total_steps,
            progress.loss,
            progress.learning_rate,
            progress.samples_per_s,
            progress.eta_s,
        )

    def checkpoint(self, path: str) -> None:
        with session_scope(self.rt.sessions) as session:
            runs.record_checkpoint(session=session, run_id=self.run_id, path=path)
        log.info("run %s: checkpoint %s", self.run_id, path)

    def measured(self, stage: str, metrics: dict) -> None:
        with session_scope(self.rt.sessions) as session:
            runs.record_metrics(session=session, run_id=self.run_id, stage=stage, metrics=metrics)
        log.info("run %s: %s training: %s", self.run_id, stage, metrics)

    def stop_reason(self) -> Stop | None:
        if self.rt.lease_lost:
            return Stop.LEASE_LOST
        if self.rt.stopping:
            return Stop.SHUTDOWN
        now = time.monotonic()
        if not self._cancelled and now - self._cancel_checked >= _CANCEL_POLL_S:
            self._cancel_checked = now
            with session_scope(self.rt.sessions) as session:
                self._cancelled = runs.cancel_requested(session=session, run_id=self.run_id)
        return Stop.CANCEL if self._cancelled else None


class RunMismatch(ExpectedError):
    """A resumed run would not train what it started with."""


def train(self, run_id: int) -> str:
    """Train one run (or resume it) to an end; returns the run's state afterwards."""
    rt: TrainingRuntime = self.app.runtime
    if rt.stopping:
        # A message taken while this worker shuts down goes back for another worker.
        raise Reject("the training worker is shutting down", requeue=True)
    with session_scope(rt.sessions) as session:
        run = runs.acquire(session=session, run_id=run_id, owner=rt.host, lease_s=rt.lease_s)
        if run is None:
            # Held by a live worker, finished, or cancelled: a redelivered or duplicate
            # message, dropped. One worker trains a run.
            current = runs.get_run(session=session, run_id=run_id)
            state = current.state.value if current is not None else "missing"
            log.info("run %s: not taken (%s)", run_id, state)
            return state
        spec = _spec(rt, run)
        stored = dict(run.config)
        log.info("run %s (%s): attempt %d, %s", run.name, run_id, run.attempts, _resumes(spec))
    rt.hold(run_id)
    try:
        outcome = run_job(spec, RunHooks(self, rt, run_id, stored, spec.name))
    except Exception as e:
        _ended(rt, spec.name, "released" if rt.stopping else RunState.FAILED.value)
        reason = (
            str(e) if isinstance(e, ExpectedError) else f"{INTERNAL_ERROR}: {type(e).__name__}: {e}"
        )
        with session_scope(rt.sessions) as session:
            if rt.stopping:
                runs.release(session=session, run_id=run_id, owner=rt.host, reason=reason[:500])
            else:
                runs.finish(
                    session=session,
                    run_id=run_id,
                    owner=rt.host,
                    state=RunState.FAILED,
                    reason=reason.splitlines()[0][:500],
                )
        if isinstance(e, ExpectedError):
            log.error("run %s failed: %s", run_id, reason)
            return RunState.FAILED.value
        raise
    finally:
        rt.hold(None)
    state = _record(rt, run_id, spec, outcome)
    _ended(rt, spec.name, "released" if state == RunState.QUEUED.value else state)
    return state


def _ended(rt: TrainingRuntime, name: str, outcome: str) -> None:
    """The run left this worker (done, failed, cancelled, released, lost): counted, and
    its gauges dropped."""
    rt.metrics.runs.labels(outcome=outcome).inc()
    rt.metrics.forget(name)


def _spec(rt: TrainingRuntime, run) -> JobSpec:
    settings = rt.settings
    config = run.config
    return JobSpec(
        name=run.name,
        base_model=run.base_model,
        dataset=run.dataset,
        recipe=from_stored(config),
        run_dir=settings.train_root / run.name,
        quant=config.get("quant", settings.quant),
        compute=config.get("compute"),
        memory_gib=settings.gpu_memory_gib,
        resume_from=run.checkpoint_path,
        before=(run.metrics or {}).get("before"),
        constrained=settings.constrained,
        runner_config=RunnerConfig.from_settings(settings),
    )


def _resumes(spec: JobSpec) -> str:
    return f"resuming from {spec.resume_from}" if spec.resume_from else "from the start"


def _record(rt: TrainingRuntime, run_id: int, spec: JobSpec, outcome: Outcome) -> str:
    with session_scope(rt.sessions) as session:
        if outcome.state == "lost":
            log.warning(
                "run %s: lease lost at step %d; another worker has it", run_id, outcome.step
            )
            return "lost"
        if outcome.state == "interrupted":
            runs.release(
                session=session,
                run_id=run_id,
                owner=rt.host,
                reason=f"interrupted at step {outcome.step} by a worker shutdown; resumes "
                "from its last checkpoint",
            )
        elif outcome.state == "cancelled":
            runs.finish(
                session=session,
                run_id=run_id,
                owner=rt.host,
                state=RunState.CANCELLED,
                reason=f"cancelled at step {outcome.step}; its last checkpoint is kept",
            )
        else:
            runs.register_adapter(
                session=session,
                name=spec.name,
                path=outcome.adapter_path,
                base_model=spec.base_model,
                run_id=run_id,
                metrics=outcome.metrics,
            )
            runs.finish(
                session=session,
                run_id=run_id,
                owner=rt.host,
                state=RunState.DONE,
                metrics=outcome.metrics,
                output_path=outcome.adapter_path,
            )
    if outcome.state == "interrupted":
        # Not sent from here: this worker would take the message itself before it exits.
        # Released unsent, the run is due at once for the next sweep of any training
        # worker (every SWEEP_S, and when one starts).
        return RunState.QUEUED.value
    log.info("run %s: %s at step %d", run_id, outcome.state, outcome.step)
    return {"cancelled": RunState.CANCELLED, "done": RunState.DONE}[outcome.state].value
