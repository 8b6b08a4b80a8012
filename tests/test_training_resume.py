"""Durable runs: a training worker killed with SIGKILL mid-run leaves its run's lease to
lapse; the next training worker picks the run up and resumes it from its last checkpoint,
and the run finishes with its step count and a loss curve continuous with the first
attempt's. Real parts: Redis (the broker), PostgreSQL (the store), Celery workers."""

from __future__ import annotations

import signal

import pytest
from helpers import upgrade_url
from test_training_job import cli, start_worker, stop, store_of, training_env, wait_for

from db import training as runs
from db.session import session_scope
from training.data import generate_seed_dataset


@pytest.mark.timeout(900)
def test_a_killed_worker_s_run_resumes_on_the_next_from_its_checkpoint(
    tiny_model, tmp_path, pg_url, redis_url
):
    upgrade_url(pg_url)
    data = generate_seed_dataset(tmp_path / "seed", rows=40, frames=4, seed=2)
    env = training_env(
        tmp_path / "home",
        tiny_model,
        FLEETSCRIBE_DATABASE_URL=pg_url,
        FLEETSCRIBE_BROKER_URL=redis_url,
    )
    submitted = cli(
        env,
        "-m",
        "training",
        "submit",
        "--dataset",
        str(data),
        "--name",
        "durable",
        "--max-steps",
        "24",
        "--micro-batch",
        "2",
        "--grad-accum",
        "2",
        "--save-steps",
        "5",
        "--lr",
        "0.005",
        "--no-eval-generate",
    )
    assert submitted.returncode == 0, submitted.stderr
    engine, sessions = store_of(env)
    first_log, second_log = tmp_path / "first.log", tmp_path / "second.log"
    first = start_worker(env, first_log)
    try:
        # past its first checkpoint (step 5), before its second (step 10)
        wait_for(sessions, "durable", lambda r: r.step >= 7, timeout=600, log=first_log)
    finally:
        assert stop(first, signal.SIGKILL) == -signal.SIGKILL
    with session_scope(sessions) as session:
        killed = runs.find_run(session=session, name="durable")
        killed_at, checkpoint = killed.step, killed.checkpoint_path
        assert killed.state.value == "running" and killed.lease_owner  # nobody released it
    assert checkpoint.endswith(f"checkpoint-{5 * (killed_at // 5)}")

    second = start_worker(env, second_log)
    try:
        run = wait_for(
            sessions,
            "durable",
            lambda r: r.state.value in ("done", "failed"),
            timeout=600,
            log=second_log,
        )
    finally:
        stop(second)
    assert run.state.value == "done", run.reason
    assert run.step == run.total_steps == 24
    assert run.attempts == 2
    with session_scope(sessions) as session:
        rows = runs.steps(session=session, run_id=run.id)
        curve = runs.loss_curve(session=session, run_id=run.id)
    resumed_from = int(checkpoint.rsplit("-", 1)[1])
    first_attempt = {r.step: r.loss for r in rows if r.attempt == 1}
    second_attempt = {r.step: r.loss for r in rows if r.attempt == 2}
    # the step count goes on from the checkpoint, not from zero
    assert min(second_attempt) == resumed_from + 1 and max(second_attempt) == 24
    assert set(first_attempt) >= set(range(1, killed_at + 1))
    # one loss per step, 1..24, with no gap at the restart
    assert [s for s, _ in curve] == list(range(1, 25))
    # continuous: the steps trained twice (after the checkpoint, before the kill) give the
    # same loss again, because the checkpoint holds the adapter, optimizer, scheduler, RNG
    # and the position in the data
    for step in range(resumed_from + 1, killed_at + 1):
        assert second_attempt[step] == pytest.approx(first_attempt[step], rel=1e-3, abs=1e-4)
    assert "resuming from" in second_log.read_text()
    engine.dispose()
