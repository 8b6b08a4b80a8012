"""Data-access verbs for training runs, their leases and steps, and adapters. Each takes the
session as a keyword; the caller owns the transaction.

A training worker holds a run by a lease (lease_owner, lease_until) that it renews while it
trains: `acquire` takes it in one conditional UPDATE, so two workers given the same
(redelivered) message never both train. A lapsed lease means the holder died; `to_send`
then names the run for a new message, and the next worker resumes from its checkpoint."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, and_, func, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from config.errors import ExpectedError
from db.models import FINAL_RUN_STATES, Adapter, RunState, TrainingRun, TrainingStep, utcnow

_LIVE_STATES = (RunState.QUEUED, RunState.RUNNING)


class RunExists(ExpectedError):
    def __init__(self, name: str, state: str) -> None:
        super().__init__(f"a training run named {name!r} already exists (state {state})")
        self.name, self.state = name, state


class NoSuchRun(ExpectedError):
    def __init__(self, name: str) -> None:
        super().__init__(f"no training run named {name!r}")
        self.name = name


class NoSuchAdapter(ExpectedError):
    def __init__(self, name: str) -> None:
        super().__init__(f"no adapter named {name!r}")
        self.name = name


class AdapterExists(ExpectedError):
    def __init__(self, name: str, run: str | None) -> None:
        by = f"made by training run {run!r}" if run is not None else "made by no training run"
        super().__init__(f"an adapter named {name!r} already exists ({by})")
        self.name, self.run = name, run


class LeaseLost(ExpectedError):
    """The worker no longer holds the run (its lease lapsed and another worker took it, or
    the run was finished): it must stop training it and write nothing more."""

    def __init__(self, run_id: int, owner: str, holder: str | None) -> None:
        now = f"held by {holder}" if holder else "held by no worker"
        super().__init__(f"training run {run_id} is no longer held by {owner} (now {now})")
        self.run_id, self.owner, self.holder = run_id, owner, holder


# --- runs -----------------------------------------------------------------------------------


def create_run(
    *, session: Session, name: str, base_model: str, dataset: str, config: dict[str, Any]
) -> TrainingRun:
    """A new queued run; RunExists if the name is taken (by a run in any state)."""
    existing = find_run(session=session, name=name)
    if existing is not None:
        raise RunExists(name, existing.state)
    run = TrainingRun(
        name=name, base_model=base_model, dataset=dataset, config=config, state=RunState.QUEUED
    )
    try:
        with session.begin_nested():
            session.add(run)
    except IntegrityError:
        # Another submit of the same name committed first.
        existing = find_run(session=session, name=name)
        if existing is None:
            raise
        raise RunExists(name, existing.state) from None
    return run


def find_run(*, session: Session, name: str) -> TrainingRun | None:
    return session.scalar(select(TrainingRun).where(TrainingRun.name == name))


def list_runs(*, session: Session, name: str | None = None) -> list[TrainingRun]:
    """All runs (or the one named), newest first."""
    query = select(TrainingRun)
    if name is not None:
        query = query.where(TrainingRun.name == name)
    newest_first = (TrainingRun.created_at.desc(), TrainingRun.id.desc())
    return list(session.scalars(query.order_by(*newest_first)))


def mark_sent(*, session: Session, run_id: int, task_id: str) -> None:
    """A message for the run went to the broker (as Celery task `task_id`)."""
    session.execute(
        update(TrainingRun)
        .where(TrainingRun.id == run_id)
        .values(sent_at=utcnow(), task_id=task_id)
        .execution_options(synchronize_session=False)
    )


def _free_for(owner: str, now: datetime) -> ColumnElement[bool]:
    """Held by no live lease, or by `owner`'s own."""
    return or_(
        TrainingRun.lease_owner.is_(None),
        TrainingRun.lease_until < now,
        TrainingRun.lease_owner == owner,
    )


def acquire(*, session: Session, run_id: int, owner: str, lease_s: float) -> TrainingRun | None:
    """Take the run for `owner` (running, one more attempt, leased for `lease_s` s).

    None when another worker holds a live lease, or the run is final. A run whose cancel
    was requested and that no live lease holds is cancelled here, and None returned."""
    now = utcnow()
    taken = session.execute(
        update(TrainingRun)
        .where(
            TrainingRun.id == run_id,
            TrainingRun.state.in_(_LIVE_STATES),
            TrainingRun.cancel_requested_at.is_(None),
            _free_for(owner, now),
        )
        .values(
            state=RunState.RUNNING,
            lease_owner=owner,
            lease_until=now + timedelta(seconds=lease_s),
            attempts=TrainingRun.attempts + 1,
            started_at=func.coalesce(TrainingRun.started_at, now),
            reason=None,
        )
        .execution_options(synchronize_session=False)
    )
    if taken.rowcount == 1:
        return _reread(session, run_id)
    # Its worker stopped (or died) before it could see the cancel: nobody else will.
    session.execute(
        update(TrainingRun)
        .where(
            TrainingRun.id == run_id,
            TrainingRun.state.in_(_LIVE_STATES),
            TrainingRun.cancel_requested_at.is_not(None),
            _free_for(owner, now),
        )
        .values(state=RunState.CANCELLED, finished_at=now, lease_owner=None, lease_until=None)
        .execution_options(synchronize_session=False)
    )
    return None


def _reread(session: Session, run_id: int) -> TrainingRun | None:
    return session.get(TrainingRun, run_id, populate_existing=True)


def renew(*, session: Session, run_id: int, owner: str, lease_s: float) -> bool:
    """Extend `owner`'s lease by `lease_s` s from now; False if it no longer holds the run."""
    renewed = session.execute(
        update(TrainingRun)
        .where(
            TrainingRun.id == run_id,
            TrainingRun.state == RunState.RUNNING,
            TrainingRun.lease_owner == owner,
        )
        .values(lease_until=utcnow() + timedelta(seconds=lease_s))
        .execution_options(synchronize_session=False)
    )
    return renewed.rowcount == 1


def _held(session: Session, run_id: int, owner: str) -> TrainingRun:
    """The run, if `owner` holds it (running, its lease); LeaseLost otherwise."""
    run = session.get(TrainingRun, run_id, populate_existing=True)
    if run is None or run.state != RunState.RUNNING or run.lease_owner != owner:
        raise LeaseLost(run_id, owner, run.lease_owner if run is not None else None)
    return run


def record_step(
    *,
    session: Session,
    run_id: int,
    owner: str,
    step: int,
    total_steps: int | None,
    epoch: float | None,
    loss: float | None,
    learning_rate: float | None,
    grad_norm: float | None = None,
    samples_per_s: float | None = None,
    eta_s: float | None = None,
) -> None:
    """The run's progress as of optimizer step `step`, and that step's row for this attempt
    (written again, not duplicated, when the same step is logged twice). LeaseLost if
    `owner` no longer holds the run."""
    run = _held(session, run_id, owner)
    run.step = step
    run.total_steps = total_steps
    run.epoch = epoch
    run.loss = loss
    run.learning_rate = learning_rate
    run.samples_per_s = samples_per_s
    run.eta_s = eta_s
    if total_steps:
        run.progress = min(step / total_steps, 1.0)
    values = {"loss": loss, "learning_rate": learning_rate, "grad_norm": grad_norm, "epoch": epoch}
    row = session.scalar(
        select(TrainingStep).where(
            TrainingStep.run_id == run_id,
            TrainingStep.step == step,
            TrainingStep.attempt == run.attempts,
        )
    )
    if row is None:
        session.add(TrainingStep(run_id=run_id, step=step, attempt=run.attempts, **values))
    else:
        for key, value in values.items():
            setattr(row, key, value)
        row.at = utcnow()
    session.flush()


def record_checkpoint(*, session: Session, run_id: int, path: str) -> None:
    """The run's latest checkpoint, the one a resumed attempt starts from."""
    session.execute(
        update(TrainingRun)
        .where(TrainingRun.id == run_id)
        .values(checkpoint_path=path)
        .execution_options(synchronize_session=False)
    )


def get_run(*, session: Session, run_id: int) -> TrainingRun | None:
    return session.get(TrainingRun, run_id, populate_existing=True)


def record_start(
    *,
    session: Session,
    run_id: int,
    split: dict[str, Any],
    skipped: list[dict[str, Any]],
    quantization: dict[str, Any] | None,
) -> None:
    """What an attempt found when it set up: the train/held-out split with the rows it
    could not use (their reasons; the first 1,000), and, at the first attempt, the base's
    quantisation config, which every resume must rebuild identically."""
    run = session.get(TrainingRun, run_id, populate_existing=True)
    if run is None:
        return
    run.split = {**split, "skipped_rows": skipped[:1000]}
    if "quantization" not in (run.config or {}):
        run.config = {**(run.config or {}), "quantization": quantization}
    session.flush()


def record_metrics(*, session: Session, run_id: int, stage: str, metrics: dict[str, Any]) -> None:
    """Metrics measured at `stage` ("before" training: kept for the resumed attempts)."""
    run = session.get(TrainingRun, run_id, populate_existing=True)
    if run is None:
        return
    run.metrics = {**(run.metrics or {}), stage: metrics}
    session.flush()


def cancel_requested(*, session: Session, run_id: int) -> bool:
    """Whether the run's worker should stop (a cancel was asked for, or it is cancelled)."""
    row = session.execute(
        select(TrainingRun.cancel_requested_at, TrainingRun.state).where(TrainingRun.id == run_id)
    ).one_or_none()
    if row is None:
        return False
    requested_at, state = row
    return requested_at is not None or state == RunState.CANCELLED


def request_cancel(*, session: Session, name: str) -> TrainingRun:
    """Cancel the run named so: a queued one that no live lease holds at once; otherwise its
    worker stops at its next step. A final run is returned unchanged. NoSuchRun if none."""
    run = session.scalar(select(TrainingRun).where(TrainingRun.name == name).with_for_update())
    if run is None:
        raise NoSuchRun(name)
    if run.state in FINAL_RUN_STATES:
        return run
    now = utcnow()
    lease_live = run.lease_owner is not None and _aware(run.lease_until) >= now
    if run.state == RunState.QUEUED and not lease_live:
        run.state = RunState.CANCELLED
        run.finished_at = now
        run.lease_owner = None
        run.lease_until = None
    if run.cancel_requested_at is None:
        run.cancel_requested_at = now
    session.flush()
    return run


def _aware(moment: datetime | None) -> datetime:
    """SQLite gives back naive datetimes; the store writes every one in UTC."""
    if moment is None:
        return datetime.min.replace(tzinfo=UTC)
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def finish(
    *,
    session: Session,
    run_id: int,
    owner: str,
    state: RunState,
    reason: str | None = None,
    metrics: dict[str, Any] | None = None,
    output_path: str | None = None,
) -> None:
    """`owner` ends the run in a final state (done, failed or cancelled) and gives up its
    lease. Finishing it again in the same state (a retried commit) changes nothing;
    LeaseLost if `owner` does not hold it otherwise."""
    state = RunState(state)
    if state not in FINAL_RUN_STATES:
        raise ValueError(f"finish needs a final state, not {state}")
    current = session.get(TrainingRun, run_id, populate_existing=True)
    if current is not None and current.state == state and current.lease_owner is None:
        return
    run = _held(session, run_id, owner)
    run.state = state
    run.reason = reason
    if metrics is not None:
        run.metrics = metrics
    if output_path is not None:
        run.output_path = output_path
    if state == RunState.DONE:
        run.progress = 1.0
    run.finished_at = utcnow()
    run.lease_owner = None
    run.lease_until = None
    session.flush()


def release(*, session: Session, run_id: int, owner: str, reason: str) -> None:
    """`owner` gives the run back unfinished (a shutdown): queued, held by no worker, its
    message to be sent again; `reason` says where it stopped. LeaseLost if not held."""
    run = _held(session, run_id, owner)
    run.state = RunState.QUEUED
    run.reason = reason
    run.lease_owner = None
    run.lease_until = None
    run.sent_at = None
    session.flush()


def to_send(*, session: Session, grace_s: float) -> list[TrainingRun]:
    """Runs that need a (new) message. Final runs never.

    - running on a lease that lapsed (its worker died) and not sent since it lapsed: at
      once, one message per lapse (the lease's end is when the holder was last alive);
    - queued and held by no live lease, with no message sent in the last `grace_s` s
      (never sent, or the one sent was lost)."""
    now = utcnow()
    lapsed = or_(TrainingRun.lease_until.is_(None), TrainingRun.lease_until < now)
    not_sent_lately = or_(
        TrainingRun.sent_at.is_(None), TrainingRun.sent_at < now - timedelta(seconds=grace_s)
    )
    dead_holder = and_(
        TrainingRun.state == RunState.RUNNING,
        lapsed,
        or_(
            TrainingRun.sent_at.is_(None),
            TrainingRun.lease_until.is_(None),
            TrainingRun.sent_at < TrainingRun.lease_until,
        ),
    )
    unheld_queued = and_(
        TrainingRun.state == RunState.QUEUED,
        or_(TrainingRun.lease_owner.is_(None), lapsed),
        not_sent_lately,
    )
    return list(
        session.scalars(
            select(TrainingRun)
            .where(or_(dead_holder, unheld_queued))
            .order_by(TrainingRun.id)
            .with_for_update(skip_locked=True)
        )
    )


# --- steps ----------------------------------------------------------------------------------


def steps(*, session: Session, run_id: int) -> list[TrainingStep]:
    """Every logged step of every attempt, by (step, attempt)."""
    return list(
        session.scalars(
            select(TrainingStep)
            .where(TrainingStep.run_id == run_id)
            .order_by(TrainingStep.step, TrainingStep.attempt)
        )
    )


def loss_curve(*, session: Session, run_id: int) -> list[tuple[int, float]]:
    """(step, loss) by step, each from the latest attempt that logged it: a resumed run
    trains the steps after its checkpoint again, and those replace the lost attempt's."""
    logged = and_(TrainingStep.run_id == run_id, TrainingStep.loss.is_not(None))
    latest = (
        select(TrainingStep.step, func.max(TrainingStep.attempt).label("attempt"))
        .where(logged)
        .group_by(TrainingStep.step)
        .subquery()
    )
    rows = session.execute(
        select(TrainingStep.step, TrainingStep.loss)
        .join(
            latest,
            and_(TrainingStep.step == latest.c.step, TrainingStep.attempt == latest.c.attempt),
        )
        .where(logged)
        .order_by(TrainingStep.step)
    )
    return [(step, loss) for step, loss in rows]


# --- adapters -------------------------------------------------------------------------------


def register_adapter(
    *,
    session: Session,
    name: str,
    path: str,
    base_model: str,
    run_id: int | None,
    metrics: dict[str, Any] | None,
) -> Adapter:
    """Make the adapter loadable by name. The same run registering it again (a retried
    finish) updates it; AdapterExists if another run made an adapter of that name."""
    adapter = resolve_adapter(session=session, name=name)
    if adapter is None:
        adapter = Adapter(
            name=name, path=path, base_model=base_model, training_run_id=run_id, metrics=metrics
        )
        try:
            with session.begin_nested():
                session.add(adapter)
            return adapter
        except IntegrityError:
            # Registered meanwhile by another transaction: judged like any existing one.
            adapter = resolve_adapter(session=session, name=name)
            if adapter is None:
                raise
    if adapter.training_run_id != run_id:
        raise AdapterExists(name, _run_name(session, adapter.training_run_id))
    adapter.path = path
    adapter.base_model = base_model
    adapter.metrics = metrics
    session.flush()
    return adapter


def _run_name(session: Session, run_id: int | None) -> str | None:
    if run_id is None:
        return None
    return session.scalar(select(TrainingRun.name).where(TrainingRun.id == run_id))


def resolve_adapter(*, session: Session, name: str) -> Adapter | None:
    return session.scalar(select(Adapter).where(Adapter.name == name))
