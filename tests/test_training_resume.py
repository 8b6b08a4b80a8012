"""Durable runs: a training worker killed with SIGKILL mid-run leaves its run's lease to
lapse; the next training worker picks the run up and resumes it from its last checkpoint,
and the run finishes with its step count and a loss curve continuous with the first
attempt's. Real parts: Redis (the broker), PostgreSQL (the store), Celery workers."""

from __future__ import annotations

import os
import signal
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from celery.result import AsyncResult
from helpers import upgrade_url
from test_training_job import (
    cli,
    reap,
    start_worker,
    stop,
    store_of,
    submit,
    training_env,
    wait_for,
)

from broker.celery_app import make_celery
from config.settings import Settings
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
    submitted = submit(
        env, data, "durable", "--max-steps 24 --micro-batch 2 --grad-accum 2 --save-steps 5 "
        "--lr 0.005 --no-eval-generate",
    )  # fmt: skip
    assert submitted.returncode == 0, submitted.stderr
    engine, sessions = store_of(env)
    first_log, second_log = tmp_path / "first.log", tmp_path / "second.log"
    first = start_worker(env, first_log)
    try:
        # past its first checkpoint (step 5), before its second (step 10)
        seen = wait_for(sessions, "durable", lambda r: r.step >= 7, timeout=600, log=first_log)
        # progress is the train task's Celery state too, which Flower reads
        state = AsyncResult(
            seen.task_id, app=make_celery(Settings(_env_file=None, broker_url=redis_url))
        )
        assert state.state == "PROGRESS" and state.info["step"] >= 7, (state.state, state.info)
        assert state.info["total_steps"] == 24 and state.info["loss"] > 0
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


@pytest.mark.timeout(900)
def test_a_warm_shutdown_checkpoints_and_gives_the_run_back_and_cancel_keeps_the_checkpoint(
    tiny_model, tmp_path
):
    """SIGTERM: the run stops at its next step with a checkpoint there, goes back to the
    queue with a message, and the next worker resumes it; `training cancel` then stops it
    at its next step and keeps that checkpoint. Embedded broker and store."""
    data = generate_seed_dataset(tmp_path / "seed", rows=40, frames=4, seed=3)
    env = training_env(tmp_path / "home", tiny_model)
    submitted = submit(
        env, data, "stoppable", "--max-steps 200 --micro-batch 2 --grad-accum 1 "
        "--save-steps 50 --no-eval-generate",
    )  # fmt: skip
    assert submitted.returncode == 0, submitted.stderr
    engine, sessions = store_of(env)
    first_log, second_log = tmp_path / "first.log", tmp_path / "second.log"
    first = start_worker(env, first_log)
    try:
        wait_for(sessions, "stoppable", lambda r: r.step >= 3, timeout=600, log=first_log)
    finally:
        assert stop(first, signal.SIGTERM) == 0, first_log.read_text()[-3000:]
    with session_scope(sessions) as session:
        back = runs.find_run(session=session, name="stoppable")
        stopped_at, checkpoint = back.step, back.checkpoint_path
        assert back.state.value == "queued" and back.lease_owner is None
        assert back.reason == (
            f"interrupted at step {stopped_at} by a worker shutdown; resumes from its last "
            "checkpoint"
        )
    # saved where it stopped, not at the last every-50-steps checkpoint
    assert checkpoint.endswith(f"checkpoint-{stopped_at}") and Path(checkpoint).is_dir()

    second = start_worker(env, second_log)
    try:
        wait_for(
            sessions,
            "stoppable",
            lambda r: r.attempts == 2 and r.step >= stopped_at + 2,
            timeout=600,
            log=second_log,
        )
        cancelled = cli(env, "-m", "training", "cancel", "stoppable")
        assert cancelled.returncode == 0, cancelled.stderr
        assert "cancel requested; it stops at its next step" in cancelled.stdout
        run = wait_for(
            sessions,
            "stoppable",
            lambda r: r.state.value == "cancelled",
            timeout=300,
            log=second_log,
        )
    except BaseException:
        stop(second)
        raise
    # The worker's warm shutdown (seconds) runs beside the commands below, which only read
    # the store (side by side too); it is waited for after them.
    os.killpg(second.pid, signal.SIGTERM)
    try:
        commands = [("cancel", "stoppable"), ("status", "nope"), ("cancel", "nope")]
        with ThreadPoolExecutor(len(commands)) as threads:
            again, unknown, missing = threads.map(
                lambda args: cli(env, "-m", "training", *args), commands
            )
    finally:
        reap(second)
    assert run.reason == f"cancelled at step {run.step}; its last checkpoint is kept"
    assert stopped_at + 2 <= run.step < 200
    assert run.checkpoint_path.endswith(f"checkpoint-{run.step}")
    assert Path(run.checkpoint_path, "adapter_model.safetensors").exists()
    assert "resuming from" in second_log.read_text()
    assert again.returncode == 0 and "is already cancelled" in again.stdout
    assert unknown.returncode == 2
    assert unknown.stderr.splitlines()[-1] == "error: no training run named 'nope'"
    assert (
        missing.returncode == 2
        and missing.stderr.splitlines()[-1] == "error: no training run named 'nope'"
    )
    engine.dispose()
