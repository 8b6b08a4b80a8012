"""Proof on the CPU: the tiny Qwen3-VL trains through a real training worker (Celery on
the embedded broker, the SQLite store), its loss falls, its adapter is registered with
before/after metrics, and a real describe worker loads it by name and writes reports
that record it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sqlalchemy import select

from config.settings import Settings
from db import training as runs
from db.models import Adapter, Report, TrainingRun
from db.session import make_engine, make_sessionmaker, session_scope
from producer.clips import make_video
from training.data import generate_seed_dataset

ROOT = Path(__file__).resolve().parents[1]


def training_env(home: Path, model: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEETSCRIBE_")}
    env.update(
        FLEETSCRIBE_HOME=str(home),
        FLEETSCRIBE_MODEL=str(model),
        FLEETSCRIBE_QUANT="fp32",
        FLEETSCRIBE_MAX_NEW_TOKENS="48",
        FLEETSCRIBE_HEARTBEAT_S="0.5",
        FLEETSCRIBE_SWEEP_S="1",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        PYTHONPATH=str(ROOT),
    )
    env.update(extra)
    return env


def cli(env: dict, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    out = subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )
    return out


def submit(env: dict, data: Path, name: str, options: str) -> subprocess.CompletedProcess:
    """`python -m training submit --dataset DATA --name NAME OPTIONS...`."""
    args = ["-m", "training", "submit", "--dataset", str(data), "--name", name]
    return cli(env, *args, *options.split())


def start_worker(env: dict, log: Path) -> subprocess.Popen:
    handle = open(log, "ab")  # noqa: SIM115 - closed with the process
    return subprocess.Popen(
        [sys.executable, "-m", "training", "worker", "--loglevel", "INFO"],
        cwd=ROOT,
        env=env,
        stdout=handle,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def stop(proc: subprocess.Popen, sig=signal.SIGTERM, timeout: float = 60) -> int:
    if proc.poll() is None:
        os.killpg(proc.pid, sig)
    return proc.wait(timeout=timeout)


def reap(proc: subprocess.Popen, timeout: float = 60) -> int:
    """Wait for a process already told to stop (or done); SIGKILL it past `timeout`."""
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _scrape(port: int) -> dict[tuple[str, tuple], float]:
    """{(sample, sorted labels): value} of a worker's /metrics; {} while it does not answer."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as page:
            text = page.read().decode()
    except OSError:
        return {}
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def wait_for(sessions, name: str, check, *, timeout: float, log: Path | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with session_scope(sessions) as session:
            run = runs.find_run(session=session, name=name)
            if run is not None and check(run):
                session.expunge(run)
                return run
        time.sleep(0.05)
    tail = log.read_text()[-4000:] if log is not None and log.exists() else ""
    raise AssertionError(f"run {name} did not get there in {timeout} s\n{tail}")


def store_of(env: dict):
    settings = Settings(_env_file=None, home=Path(env["FLEETSCRIBE_HOME"]))
    url = env.get("FLEETSCRIBE_DATABASE_URL") or settings.db_url
    engine = make_engine(url)
    return engine, make_sessionmaker(engine)


@pytest.mark.timeout(900)
def test_a_run_trains_registers_its_adapter_and_a_describe_worker_loads_it(
    tiny_model, tmp_path, request
):
    home = tmp_path / "home"
    data = generate_seed_dataset(tmp_path / "seed", rows=26, frames=4, seed=1, bad_rows=2)
    # Every answer here (the evaluation's, the describe worker's, the describe command's)
    # is in one pass with room for the grammar's bound: the tiny model's run past the
    # default first pass (768 tokens), and a second pass would describe them all again.
    # Two passes give the same answers (test_grammar.py); this test is about the adapter.
    env = training_env(home, tiny_model, FLEETSCRIBE_FIRST_PASS_TOKENS="0")
    submitted = submit(
        env, data, "tiny-sft", "--max-steps 12 --lr 0.05 --micro-batch 2 --grad-accum 2 "
        "--save-steps 6 --heldout 0.15",
    )  # fmt: skip
    assert submitted.returncode == 0, submitted.stderr
    # the import lists the rows it could not use, each with its reason
    skipped = [line for line in submitted.stdout.splitlines() if line.startswith("skipped row")]
    assert len(skipped) == 2, submitted.stdout
    assert "queued" in submitted.stdout and "effective batch 4" in submitted.stdout

    log = tmp_path / "train.log"
    port = _free_port()
    worker = start_worker({**env, "FLEETSCRIBE_METRICS_PORT": str(port)}, log)
    engine, sessions = store_of(env)
    steps_seen: list[float] = []  # the worker's fleetscribe_training_step while it trains

    def ended(r) -> bool:
        step = _scrape(port).get(("fleetscribe_training_step", (("run", "tiny-sft"),)))
        if step is not None:
            steps_seen.append(step)
        return r.state.value not in ("queued", "running")

    try:
        run = wait_for(sessions, "tiny-sft", ended, timeout=600, log=log)
        after = _scrape(port)
    except BaseException:
        stop(worker)
        raise
    # Its warm shutdown (seconds of Celery's) runs while the rest of the test does; the
    # process is waited for once the test is over.
    os.killpg(worker.pid, signal.SIGTERM)
    request.addfinalizer(lambda: reap(worker))
    # The training worker's /metrics showed the run's steps as it trained, counts it done
    # once it ended and drops its gauges (no stale run on a dashboard).
    assert steps_seen and 1 <= min(steps_seen) <= max(steps_seen) <= 12, steps_seen
    assert after[("fleetscribe_training_runs_total", (("outcome", "done"),))] == 1
    assert not any(name.startswith("fleetscribe_training_step") for name, _ in after)
    assert run.state.value == "done", (run.reason, log.read_text()[-3000:])
    assert run.step == run.total_steps == 12
    assert run.attempts == 1
    with session_scope(sessions) as session:
        curve = runs.loss_curve(session=session, run_id=run.id)
        adapter = session.scalar(select(Adapter).where(Adapter.name == "tiny-sft"))
        stored = session.get(TrainingRun, run.id)
        split = stored.split
        metrics = adapter.metrics
        adapter_path = adapter.path
    assert [s for s, _ in curve] == list(range(1, 13))
    # The tiny random model's logits are near uniform (loss about ln(vocab)) and LoRA on
    # its attention moves them a little: 0.1 is well above the step-to-step noise.
    first, last = curve[0][1], sum(loss for _, loss in curve[-3:]) / 3
    assert last < first - 0.1, curve
    # the held-out split is kept and recorded; the skipped rows are not in it
    assert split["heldout"] >= 1 and split["train"] + split["heldout"] == 24
    assert split["skipped"] == 2
    # measured by the describe engine before and after, on the held-out split
    before, after = metrics["before"], metrics["after"]
    assert after["heldout_loss"] < before["heldout_loss"]
    for stage in (before, after):
        assert stage["rows"] == split["heldout"]
        assert 0 <= stage["risk_factor_agreement"] <= 1 and stage["validity"] == 1.0
    assert (Path(adapter_path) / "adapter_config.json").exists()
    assert Path(run.checkpoint_path).name == "checkpoint-12"

    # `python -m training status NAME` shows the run and its loss curve
    shown = cli(env, "-m", "training", "status", "tiny-sft")
    assert shown.returncode == 0, shown.stderr
    assert "done" in shown.stdout and "12/12" in shown.stdout and "loss: 1:" in shown.stdout

    # a describe worker started with FLEETSCRIBE_ADAPTER=NAME resolves it through the store
    videos = tmp_path / "videos"
    videos.mkdir()
    make_video(videos / "a.mp4", seconds=1.0, fps=8, width=64, height=48, seed=3)
    describe_env = {**env, "FLEETSCRIBE_ADAPTER": "tiny-sft", "FLEETSCRIBE_BATCH_SIZE": "2"}
    describe = subprocess.Popen(
        [sys.executable, "-m", "worker", "--loglevel", "WARNING"],
        cwd=ROOT,
        env=describe_env,
        start_new_session=True,
    )
    # the one-process describe command resolves the name the same way; it needs nothing
    # of the worker's, so it runs beside it (each process on one core of its own)
    command = [sys.executable, "-m", "worker", "describe", str(videos / "a.mp4"), "--json"]
    printing = subprocess.Popen(
        command,
        cwd=ROOT,
        env=describe_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        try:
            enq = cli(describe_env, "-m", "producer", "enqueue", str(videos), "--wait")
            assert enq.returncode == 0, enq.stdout + enq.stderr
        finally:
            stop(describe)
        with session_scope(sessions) as session:
            reports = session.scalars(select(Report)).all()
            assert [(r.adapter, r.valid) for r in reports] == [("tiny-sft", True)]
        out, err = printing.communicate(timeout=300)
    finally:
        if printing.poll() is None:  # the test failed before it was waited for
            printing.kill()
            printing.communicate()
    assert printing.returncode == 0, err
    assert json.loads(out.splitlines()[-1])["adapter"] == "tiny-sft"
    engine.dispose()
