"""The training store's verbs on SQLite and PostgreSQL: runs, leases, steps, cancels, the
outbox of training messages, adapters; and migration 0004 down and up with data in it."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime, timedelta

import pytest
from alembic import command
from sqlalchemy import func, insert, inspect, select, text, update
from sqlalchemy.exc import IntegrityError

from db import training
from db.migrate import alembic_config, current_revision, upgrade
from db.models import Adapter, RunState, TrainingRun, TrainingStep, utcnow
from db.session import make_engine, session_scope

LEASE_S = 60.0
LONG_AGO = datetime(2020, 1, 1, tzinfo=UTC)


def _utc(moment: datetime | None) -> datetime | None:
    """SQLite gives datetimes back naive (the store writes them in UTC)."""
    if moment is None or moment.tzinfo is not None:
        return moment
    return moment.replace(tzinfo=UTC)


def new_run(factory, name: str = "r1", **values) -> int:
    with session_scope(factory) as session:
        run = training.create_run(
            session=session,
            name=name,
            base_model="tiny-qwen3-vl",
            dataset="/data/seed.jsonl",
            config={"lr": 2e-4, "epochs": 1},
        )
        session.flush()
        run_id = run.id
    if values:
        set_run(factory, run_id, **values)
    return run_id


def set_run(factory, run_id: int, **values) -> None:
    """Put a run in a state by hand (a lapsed lease, an old message)."""
    with session_scope(factory) as session:
        session.execute(update(TrainingRun).where(TrainingRun.id == run_id).values(**values))


def get_run(factory, run_id: int) -> TrainingRun:
    with session_scope(factory) as session:
        return session.get(TrainingRun, run_id)


def acquire(factory, run_id: int, owner: str) -> TrainingRun | None:
    with session_scope(factory) as session:
        return training.acquire(session=session, run_id=run_id, owner=owner, lease_s=LEASE_S)


def lapse(factory, run_id: int) -> None:
    set_run(factory, run_id, lease_until=utcnow() - timedelta(seconds=1))


def log(factory, run_id: int, owner: str, step: int, loss: float, total: int = 10) -> None:
    with session_scope(factory) as session:
        training.record_step(
            session=session,
            run_id=run_id,
            owner=owner,
            step=step,
            total_steps=total,
            epoch=step / total,
            loss=loss,
            learning_rate=1e-4,
        )


# --- runs -----------------------------------------------------------------------------------


def test_create_run_is_queued_and_a_name_is_taken_once(migrated):
    _engine, factory = migrated
    run_id = new_run(factory)
    run = get_run(factory, run_id)
    assert (run.state, run.step, run.attempts, run.progress) == (RunState.QUEUED, 0, 0, 0.0)
    assert (run.lease_owner, run.sent_at, run.started_at) == (None, None, None)
    assert run.config == {"lr": 2e-4, "epochs": 1}
    set_run(factory, run_id, state=RunState.FAILED)
    with session_scope(factory) as session, pytest.raises(training.RunExists) as caught:
        training.create_run(session=session, name="r1", base_model="m", dataset="d", config={})
    assert str(caught.value) == "a training run named 'r1' already exists (state failed)"
    with session_scope(factory) as session:
        assert session.scalar(select(func.count()).select_from(TrainingRun)) == 1


def test_find_run_and_list_runs_newest_first(migrated):
    _engine, factory = migrated
    ids = {name: new_run(factory, name) for name in ("a", "b", "c")}
    # created_at decides, not the id
    set_run(factory, ids["a"], created_at=utcnow() + timedelta(hours=1))
    set_run(factory, ids["b"], created_at=utcnow() - timedelta(hours=1))
    with session_scope(factory) as session:
        assert [r.name for r in training.list_runs(session=session)] == ["a", "c", "b"]
        assert [r.name for r in training.list_runs(session=session, name="b")] == ["b"]
        assert training.list_runs(session=session, name="zzz") == []
        assert training.find_run(session=session, name="c").id == ids["c"]
        assert training.find_run(session=session, name="zzz") is None


def test_mark_sent_records_the_time_and_the_task_id(migrated):
    _engine, factory = migrated
    run_id = new_run(factory)
    before = utcnow()
    with session_scope(factory) as session:
        training.mark_sent(session=session, run_id=run_id, task_id="celery-123")
    run = get_run(factory, run_id)
    assert run.task_id == "celery-123"
    assert before <= _utc(run.sent_at) <= utcnow()


# --- leases ---------------------------------------------------------------------------------


def test_acquire_leases_a_queued_run_to_one_worker(migrated):
    _engine, factory = migrated
    run_id = new_run(factory, reason="interrupted at step 4")
    before = utcnow()
    run = acquire(factory, run_id, "w1")
    assert run is not None
    assert (run.state, run.lease_owner, run.attempts, run.reason) == (
        RunState.RUNNING,
        "w1",
        1,
        None,
    )
    lease_until = _utc(run.lease_until)
    assert (
        before + timedelta(seconds=LEASE_S) <= lease_until <= utcnow() + timedelta(seconds=LEASE_S)
    )
    started = _utc(run.started_at)
    assert before <= started <= utcnow()

    assert acquire(factory, run_id, "w2") is None  # w1's lease is live
    held = get_run(factory, run_id)
    assert (held.lease_owner, held.attempts) == ("w1", 1)

    # the same worker given the message again (a redelivery) takes it again
    again = acquire(factory, run_id, "w1")
    assert (again.lease_owner, again.attempts) == ("w1", 2)
    assert _utc(again.started_at) == started  # the run's first start is kept


def test_a_lapsed_lease_lets_another_worker_take_the_run(migrated):
    _engine, factory = migrated
    run_id = new_run(factory)
    acquire(factory, run_id, "w1")
    lapse(factory, run_id)
    run = acquire(factory, run_id, "w2")
    assert run is not None
    assert (run.state, run.lease_owner, run.attempts) == (RunState.RUNNING, "w2", 2)
    assert _utc(run.lease_until) > utcnow()
    # w1 (merely slow, not dead) finds out at its next renewal or step, and writes nothing
    with session_scope(factory) as session:
        assert training.renew(session=session, run_id=run_id, owner="w1", lease_s=LEASE_S) is False
    with pytest.raises(training.LeaseLost) as caught:
        log(factory, run_id, "w1", 5, 1.0)
    assert str(caught.value) == f"training run {run_id} is no longer held by w1 (now held by w2)"
    assert get_run(factory, run_id).step == 0


@pytest.mark.parametrize("state", [RunState.DONE, RunState.FAILED, RunState.CANCELLED])
def test_acquire_never_takes_a_final_run(migrated, state):
    _engine, factory = migrated
    run_id = new_run(factory, state=state, finished_at=LONG_AGO)
    assert acquire(factory, run_id, "w1") is None
    run = get_run(factory, run_id)
    assert (run.state, run.lease_owner, run.attempts) == (state, None, 0)


def test_acquire_of_a_run_whose_cancel_was_requested_cancels_it(migrated):
    _engine, factory = migrated
    # the worker stopped (a shutdown) right after the cancel was asked for
    stopped = new_run(factory, "stopped")
    acquire(factory, stopped, "w1")
    with session_scope(factory) as session:
        training.request_cancel(session=session, name="stopped")
        training.release(session=session, run_id=stopped, owner="w1", reason="interrupted")
    assert get_run(factory, stopped).state == RunState.QUEUED
    assert acquire(factory, stopped, "w2") is None
    run = get_run(factory, stopped)
    assert (run.state, run.lease_owner, run.attempts) == (RunState.CANCELLED, None, 1)
    assert run.finished_at is not None

    # the worker died holding it: the next message's acquire cancels it too
    died = new_run(factory, "died")
    acquire(factory, died, "w1")
    with session_scope(factory) as session:
        training.request_cancel(session=session, name="died")
    assert acquire(factory, died, "w2") is None  # w1's lease still live: left to w1
    assert get_run(factory, died).state == RunState.RUNNING
    lapse(factory, died)
    assert acquire(factory, died, "w2") is None
    assert get_run(factory, died).state == RunState.CANCELLED


def test_renew_extends_only_the_holders_lease(migrated):
    _engine, factory = migrated
    run_id = new_run(factory)
    acquire(factory, run_id, "w1")
    soon = utcnow() + timedelta(seconds=2)
    set_run(factory, run_id, lease_until=soon)
    with session_scope(factory) as session:
        assert training.renew(session=session, run_id=run_id, owner="w1", lease_s=LEASE_S)
        assert not training.renew(session=session, run_id=run_id, owner="w2", lease_s=LEASE_S)
    assert _utc(get_run(factory, run_id).lease_until) >= soon + timedelta(seconds=LEASE_S - 3)
    with session_scope(factory) as session:
        training.finish(session=session, run_id=run_id, owner="w1", state=RunState.DONE)
    with session_scope(factory) as session:
        assert not training.renew(session=session, run_id=run_id, owner="w1", lease_s=LEASE_S)


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_two_workers_racing_for_one_message_never_both_win(migrated):
    """Both acquire at once; the first one's transaction stays open until the other is seen
    waiting on its row, so the two really overlap. Exactly one wins."""
    engine, factory = migrated
    run_id = new_run(factory)
    start = threading.Barrier(2)
    commit = threading.Event()
    results: dict[str, object] = {}

    def worker(owner: str) -> None:
        session = factory()
        try:
            start.wait(timeout=10)
            run = training.acquire(session=session, run_id=run_id, owner=owner, lease_s=LEASE_S)
            results[owner] = run.lease_owner if run is not None else None
            commit.wait(timeout=20)
            session.commit()
        except Exception as e:  # surfaced by the assertions below
            results[owner] = e
        finally:
            session.close()

    threads = [threading.Thread(target=worker, args=(o,)) for o in ("w1", "w2")]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 10
    with engine.connect() as watcher:
        while time.monotonic() < deadline:
            waiting = watcher.execute(
                text(
                    "SELECT count(*) FROM pg_stat_activity "
                    "WHERE datname = current_database() AND wait_event_type = 'Lock'"
                )
            ).scalar_one()
            watcher.rollback()
            if len(results) == 1 and waiting == 1:
                break
            time.sleep(0.02)
        else:
            commit.set()
            pytest.fail(f"the second acquire never waited for the first: {results}")
    commit.set()
    for thread in threads:
        thread.join(timeout=20)
        assert not thread.is_alive()
    assert sorted(results, key=str) == ["w1", "w2"]
    winners = [owner for owner, got in results.items() if got == owner]
    losers = [owner for owner, got in results.items() if got is None]
    assert len(winners) == 1 and len(losers) == 1, results
    run = get_run(factory, run_id)
    assert (run.lease_owner, run.attempts, run.state) == (winners[0], 1, RunState.RUNNING)


# --- progress -------------------------------------------------------------------------------


def test_record_step_updates_the_run_and_logs_the_step_once(migrated):
    _engine, factory = migrated
    run_id = new_run(factory)
    acquire(factory, run_id, "w1")
    with session_scope(factory) as session:
        training.record_step(
            session=session,
            run_id=run_id,
            owner="w1",
            step=3,
            total_steps=12,
            epoch=0.25,
            loss=2.5,
            learning_rate=1e-4,
            grad_norm=0.7,
            samples_per_s=4.5,
            eta_s=90.0,
        )
    run = get_run(factory, run_id)
    assert (run.step, run.total_steps, run.epoch, run.loss, run.learning_rate) == (
        3,
        12,
        0.25,
        2.5,
        1e-4,
    )
    assert (run.samples_per_s, run.eta_s, run.progress) == (4.5, 90.0, 0.25)
    log(factory, run_id, "w1", 3, 2.25, total=12)  # the same step logged again
    with session_scope(factory) as session:
        rows = training.steps(session=session, run_id=run_id)
        assert [(r.step, r.attempt, r.loss, r.grad_norm) for r in rows] == [(3, 1, 2.25, None)]
    assert get_run(factory, run_id).loss == 2.25


def test_record_checkpoint_and_cancel_requested(migrated):
    _engine, factory = migrated
    run_id = new_run(factory)
    acquire(factory, run_id, "w1")
    with session_scope(factory) as session:
        training.record_checkpoint(session=session, run_id=run_id, path="/ckpt/checkpoint-40")
        assert training.cancel_requested(session=session, run_id=run_id) is False
    assert get_run(factory, run_id).checkpoint_path == "/ckpt/checkpoint-40"
    with session_scope(factory) as session:
        training.request_cancel(session=session, name="r1")
    with session_scope(factory) as session:
        assert training.cancel_requested(session=session, run_id=run_id) is True


def test_loss_curve_keeps_the_latest_attempt_of_each_step(migrated):
    _engine, factory = migrated
    run_id = new_run(factory)
    first = {1: 3.0, 2: 2.5, 3: 2.25, 4: 2.0}
    acquire(factory, run_id, "w1")
    for step, loss in first.items():
        log(factory, run_id, "w1", step, loss)
    with session_scope(factory) as session:
        training.record_checkpoint(session=session, run_id=run_id, path="/ckpt/checkpoint-2")
    lapse(factory, run_id)  # w1 died after step 4; w2 resumes from checkpoint-2
    acquire(factory, run_id, "w2")
    second = {3: 2.125, 4: 1.875, 5: 1.75}
    for step, loss in second.items():
        log(factory, run_id, "w2", step, loss)
    expected = sorted({**first, **second}.items())
    with session_scope(factory) as session:
        assert training.loss_curve(session=session, run_id=run_id) == expected
        rows = training.steps(session=session, run_id=run_id)
    assert [(r.step, r.attempt) for r in rows] == [
        (1, 1),
        (2, 1),
        (3, 1),
        (3, 2),
        (4, 1),
        (4, 2),
        (5, 2),
    ]
    assert get_run(factory, run_id).step == 5


def test_the_unique_step_key_holds_in_the_database(migrated):
    _engine, factory = migrated
    run_id = new_run(factory)
    row = {"run_id": run_id, "step": 1, "attempt": 1, "loss": 1.0, "at": utcnow()}
    with session_scope(factory) as session:
        session.execute(insert(TrainingStep).values(**row))
    with pytest.raises(IntegrityError), session_scope(factory) as session:
        session.execute(insert(TrainingStep).values(**row))


# --- cancel, finish, release ----------------------------------------------------------------


def test_request_cancel_of_a_queued_run_cancels_it_at_once(migrated):
    _engine, factory = migrated
    run_id = new_run(factory)
    with session_scope(factory) as session:
        run = training.request_cancel(session=session, name="r1")
        assert run.state == RunState.CANCELLED
    run = get_run(factory, run_id)
    assert run.state == RunState.CANCELLED
    assert run.finished_at is not None and run.cancel_requested_at is not None
    with session_scope(factory) as session, pytest.raises(training.NoSuchRun) as caught:
        training.request_cancel(session=session, name="nope")
    assert str(caught.value) == "no training run named 'nope'"


def test_request_cancel_of_a_running_run_leaves_it_to_its_worker(migrated):
    _engine, factory = migrated
    run_id = new_run(factory)
    acquire(factory, run_id, "w1")
    with session_scope(factory) as session:
        run = training.request_cancel(session=session, name="r1")
        assert run.state == RunState.RUNNING
    run = get_run(factory, run_id)
    assert (run.state, run.lease_owner, run.finished_at) == (RunState.RUNNING, "w1", None)
    assert run.cancel_requested_at is not None
    # its worker sees it at its next step and stops
    with session_scope(factory) as session:
        assert training.cancel_requested(session=session, run_id=run_id)
        training.finish(
            session=session,
            run_id=run_id,
            owner="w1",
            state=RunState.CANCELLED,
            reason="cancelled at step 7",
        )
    run = get_run(factory, run_id)
    assert (run.state, run.reason, run.lease_owner) == (
        RunState.CANCELLED,
        "cancelled at step 7",
        None,
    )


def test_request_cancel_of_a_final_run_changes_nothing(migrated):
    _engine, factory = migrated
    run_id = new_run(factory, state=RunState.DONE, finished_at=LONG_AGO)
    with session_scope(factory) as session:
        assert training.request_cancel(session=session, name="r1").state == RunState.DONE
    run = get_run(factory, run_id)
    assert (run.state, run.cancel_requested_at) == (RunState.DONE, None)
    assert _utc(run.finished_at) == LONG_AGO


def test_finish_ends_the_run_and_a_retried_finish_is_harmless(migrated):
    _engine, factory = migrated
    run_id = new_run(factory)
    acquire(factory, run_id, "w1")
    with session_scope(factory) as session, pytest.raises(ValueError):
        training.finish(session=session, run_id=run_id, owner="w1", state=RunState.RUNNING)
    with session_scope(factory) as session, pytest.raises(training.LeaseLost):
        training.finish(session=session, run_id=run_id, owner="w2", state=RunState.DONE)
    assert get_run(factory, run_id).state == RunState.RUNNING
    for _ in range(2):  # the second: a retried commit
        with session_scope(factory) as session:
            training.finish(
                session=session,
                run_id=run_id,
                owner="w1",
                state=RunState.DONE,
                metrics={"held_out_loss": 1.5},
                output_path="/adapters/r1",
            )
    run = get_run(factory, run_id)
    assert (run.state, run.metrics, run.output_path, run.progress) == (
        RunState.DONE,
        {"held_out_loss": 1.5},
        "/adapters/r1",
        1.0,
    )
    assert (run.lease_owner, run.lease_until) == (None, None)
    assert run.finished_at is not None


def test_release_gives_the_run_back_to_be_sent_again(migrated):
    _engine, factory = migrated
    run_id = new_run(factory)
    with session_scope(factory) as session:
        training.mark_sent(session=session, run_id=run_id, task_id="t1")
    acquire(factory, run_id, "w1")
    reason = "interrupted at step 40 by a worker shutdown; resumes from checkpoint-40"
    with session_scope(factory) as session:
        assert training.to_send(session=session, grace_s=0) == []
        training.release(session=session, run_id=run_id, owner="w1", reason=reason)
    run = get_run(factory, run_id)
    assert (run.state, run.reason, run.lease_owner, run.lease_until, run.sent_at) == (
        RunState.QUEUED,
        reason,
        None,
        None,
        None,
    )
    assert run.attempts == 1
    with session_scope(factory) as session:
        assert [r.id for r in training.to_send(session=session, grace_s=300)] == [run_id]
    with session_scope(factory) as session, pytest.raises(training.LeaseLost):
        training.release(session=session, run_id=run_id, owner="w1", reason=reason)
    # the next worker's acquire clears the reason
    assert acquire(factory, run_id, "w2").reason is None


def test_to_send_names_lapsed_and_unsent_runs_only(migrated):
    _engine, factory = migrated
    now = utcnow()
    old = now - timedelta(minutes=10)
    live = now + timedelta(minutes=5)
    dead = now - timedelta(seconds=1)
    running = {"state": RunState.RUNNING, "lease_owner": "w1"}
    cases = {
        "never-sent": ({}, True),
        "sent-old": ({"sent_at": old}, True),
        "sent-just-now": ({"sent_at": now}, False),
        "running-lapsed": ({**running, "lease_until": dead, "sent_at": old}, True),
        "running-live": ({**running, "lease_until": live, "sent_at": old}, False),
        "running-lapsed-resent-just-now": ({**running, "lease_until": dead, "sent_at": now}, False),
        # sent within the grace, but before its holder died: the lapse needs a message now
        "running-lapsed-sent-before-lapse": (
            {**running, "lease_until": dead, "sent_at": dead - timedelta(seconds=30)},
            True,
        ),
        "done": ({"state": RunState.DONE}, False),
        "failed": ({"state": RunState.FAILED, "sent_at": old}, False),
        "cancelled": ({"state": RunState.CANCELLED}, False),
    }
    for name, (values, _) in cases.items():
        new_run(factory, name, **values)
    with session_scope(factory) as session:
        picked = sorted(r.name for r in training.to_send(session=session, grace_s=60))
    assert picked == sorted(name for name, (_, expected) in cases.items() if expected)


# --- adapters -------------------------------------------------------------------------------


def test_register_adapter_is_idempotent_for_its_run_and_refused_for_another(migrated):
    _engine, factory = migrated
    r1, r2 = new_run(factory, "r1"), new_run(factory, "r2")
    with session_scope(factory) as session:
        assert training.resolve_adapter(session=session, name="night-rain") is None
        first = training.register_adapter(
            session=session,
            name="night-rain",
            path="/adapters/a",
            base_model="m",
            run_id=r1,
            metrics={"validity": 0.5},
        )
        first_id = first.id
    with session_scope(factory) as session:  # r1's finish retried
        again = training.register_adapter(
            session=session,
            name="night-rain",
            path="/adapters/b",
            base_model="m",
            run_id=r1,
            metrics={"validity": 0.75},
        )
        assert again.id == first_id
    with session_scope(factory) as session, pytest.raises(training.AdapterExists) as caught:
        training.register_adapter(
            session=session, name="night-rain", path="/x", base_model="m", run_id=r2, metrics=None
        )
    assert str(caught.value) == (
        "an adapter named 'night-rain' already exists (made by training run 'r1')"
    )
    with session_scope(factory) as session:
        assert session.scalar(select(func.count()).select_from(Adapter)) == 1
        adapter = training.resolve_adapter(session=session, name="night-rain")
        assert (adapter.path, adapter.metrics, adapter.training_run_id) == (
            "/adapters/b",
            {"validity": 0.75},
            r1,
        )


def test_the_named_errors_are_one_line_expected_errors():
    from config.errors import ExpectedError

    errors = [
        training.RunExists("r", "queued"),
        training.NoSuchRun("r"),
        training.NoSuchAdapter("a"),
        training.AdapterExists("a", None),
        training.LeaseLost(3, "w1", None),
    ]
    assert all(isinstance(e, ExpectedError) and "\n" not in str(e) for e in errors)
    assert str(errors[2]) == "no adapter named 'a'"
    assert str(errors[3]) == "an adapter named 'a' already exists (made by no training run)"
    assert str(errors[4]) == "training run 3 is no longer held by w1 (now held by no worker)"


# --- migration 0004 -------------------------------------------------------------------------


def _downgrade(engine, revision: str) -> None:
    cfg = alembic_config(engine.url.render_as_string(hide_password=False))
    with engine.connect() as connection:
        cfg.attributes["connection"] = connection
        command.downgrade(cfg, revision)
        connection.commit()


def _insert_run(conn, name: str, state: str) -> None:
    conn.execute(
        text(
            "INSERT INTO training_runs (name, base_model, dataset, config, state, progress, "
            "created_at) VALUES (:name, 'm', 'd', '{\"lr\": 0.1}', :state, 0.5, :at)"
        ),
        {"name": name, "state": state, "at": LONG_AGO.replace(tzinfo=None)},
    )


def test_migration_0004_down_and_up_keeps_existing_rows(db_url):
    engine = make_engine(db_url)
    try:
        upgrade(engine, "0003")
        with engine.begin() as conn:
            _insert_run(conn, "old", "done")
            conn.execute(
                text(
                    "INSERT INTO adapters (name, path, base_model, training_run_id, created_at) "
                    "VALUES ('old-adapter', '/a', 'm', 1, :at)"
                ),
                {"at": LONG_AGO.replace(tzinfo=None)},
            )
        assert upgrade(engine, "0004") == ("0003", "0004")
        with engine.begin() as conn:
            row = conn.execute(
                text(
                    "SELECT name, state, progress, step, attempts, lease_owner, sent_at "
                    "FROM training_runs"
                )
            ).one()
            assert tuple(row) == ("old", "done", 0.5, 0, 0, None, None)
            _insert_run(conn, "stopped", "cancelled")
            conn.execute(
                text(
                    "INSERT INTO training_steps (run_id, step, attempt, loss, at) "
                    "VALUES (1, 1, 1, 2.0, :at)"
                ),
                {"at": LONG_AGO.replace(tzinfo=None)},
            )
        with pytest.raises(IntegrityError), engine.begin() as conn:
            _insert_run(conn, "bogus", "paused")

        _downgrade(engine, "0003")
        with engine.connect() as conn:
            assert current_revision(conn) == "0003"
            assert "training_steps" not in inspect(conn).get_table_names()
            columns = {c["name"] for c in inspect(conn).get_columns("training_runs")}
            assert "lease_owner" not in columns and "step" not in columns
            rows = conn.execute(
                text("SELECT name, state, reason, progress FROM training_runs ORDER BY id")
            ).all()
            assert [tuple(r) for r in rows] == [
                ("old", "done", None, 0.5),
                ("stopped", "failed", "cancelled", 0.5),
            ]
            link = conn.execute(text("SELECT training_run_id FROM adapters")).scalar_one()
            assert link == 1
        with pytest.raises(IntegrityError), engine.begin() as conn:
            _insert_run(conn, "again", "cancelled")  # 0003's CHECK is back

        assert upgrade(engine, "0004") == ("0003", "0004")
        with engine.begin() as conn:
            _insert_run(conn, "again", "cancelled")
            assert conn.execute(text("SELECT count(*) FROM training_steps")).scalar_one() == 0
            assert conn.execute(text("SELECT training_run_id FROM adapters")).scalar_one() == 1
            names = {i["name"] for i in inspect(conn).get_indexes("training_runs")}
            assert "ix_training_runs_lease_until" in names
    finally:
        engine.dispose()
