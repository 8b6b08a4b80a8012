"""A worker process's lifecycle: nothing at import time, one runtime opened at start-up and
closed at shutdown, and `worker describe` printing exactly what a worker stores."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import upgrade_url
from sqlalchemy import select

from config.settings import Settings
from db.models import Report
from db.session import session_scope
from producer.clips import make_video
from producer.enqueue import inspect_file, record
from worker.lifecycle import WorkerRuntime
from worker.pipeline import describe_files, describe_video

ROOT = Path(__file__).resolve().parents[1]

IMPORTS = """
import sys
import broker.celery_app, config.settings, config.cli
import db.__main__, db.session, db.store
import delivery.outbox, delivery.heartbeat
import metrics.catalog, metrics.collectors, metrics.server, metrics.names
import models.runner, models.loader, models.decoding, models.memory
import producer.__main__, producer.enqueue
import video.media, video.processes
import worker.__main__, worker.app, worker.tasks, worker.pipeline, worker.lifecycle
import training.__main__, training.app, training.tasks, training.job, training.lifecycle
import training.collate, training.evaluate, training.recipe, training.export, training.messages
heavy = ("torch", "transformers", "trl", "peft", "datasets", "celery.worker")
print(",".join(sorted(m for m in heavy if m in sys.modules)))
"""


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEETSCRIBE_")}
    env.update(FLEETSCRIBE_HOME=str(tmp_path / "home"), HF_HUB_OFFLINE="1", **extra)
    return env


def test_importing_every_module_reads_no_setting_and_makes_nothing(tmp_path):
    """A bad setting cannot break an import (it is read by the entry point, at start-up),
    and no folder, app or model appears: torch is not even imported."""
    env = _env(tmp_path, FLEETSCRIBE_FRAMES="0", FLEETSCRIBE_BROKER_URL="filesystem://")
    out = subprocess.run(
        [sys.executable, "-c", IMPORTS],
        cwd=tmp_path,
        env={**env, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "", out.stdout  # none of the heavy libraries
    assert not (tmp_path / "home").exists()
    assert list(tmp_path.iterdir()) == []


def test_a_model_that_does_not_load_stops_the_worker_with_one_line(tmp_path):
    """The model is loaded in the worker's start-up step, before the consumer: a model
    directory that does not load ends the worker with `error: ...`, exit 2."""
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "nonsense"}')
    out = subprocess.run(
        [sys.executable, "-m", "worker", "--loglevel", "WARNING"],
        cwd=ROOT,
        env=_env(tmp_path, FLEETSCRIBE_MODEL=str(broken), FLEETSCRIBE_QUANT="fp32"),
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert out.returncode == 2, out.stdout + out.stderr
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert errors == [errors[0]] and f"cannot load model {broken}" in errors[0]
    assert "Traceback" not in out.stderr + out.stdout


def test_the_runtime_opens_before_consuming_and_closes_at_warm_shutdown(tmp_path, tiny_model):
    env = _env(
        tmp_path,
        FLEETSCRIBE_MODEL=str(tiny_model),
        FLEETSCRIBE_QUANT="fp32",
        FLEETSCRIBE_MAX_NEW_TOKENS="4",
    )
    log = tmp_path / "worker.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "worker", "--loglevel", "INFO"],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 180
        while "ready." not in log.read_text(errors="replace"):
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, log.read_text()
    text = log.read_text()
    opened, ready, closed = (
        text.index("worker runtime open"),
        text.index("ready."),
        text.index("worker runtime closed"),
    )
    assert opened < ready < closed  # the model before any message, closed at the end
    assert text.count("worker runtime open") == 1


@pytest.fixture
def runtime(tiny_model, sqlite_url, tmp_path):
    settings = Settings(
        home=tmp_path / "home",
        database_url=sqlite_url,
        model=str(tiny_model),
        quant="fp32",
        frames=4,
        max_new_tokens=8,
        # One pass with room for the grammar's bound: the tiny model's answers run past
        # the default first pass (768 tokens), and a second pass would decode them all
        # again. Two passes give the same answers (test_grammar.py).
        first_pass_tokens=0,
    )
    upgrade_url(sqlite_url)
    before = sys.getswitchinterval()
    rt = WorkerRuntime.open(settings)
    # Open, the interpreter hands the GIL over at the setting's interval; closed, as before.
    assert sys.getswitchinterval() == pytest.approx(settings.switch_interval_ms / 1000)
    assert settings.switch_interval_ms / 1000 != before
    yield rt
    rt.close()
    assert sys.getswitchinterval() == before


def test_worker_describe_prints_the_report_a_worker_stores(runtime, tmp_path):
    """`python -m worker describe` runs the worker's own pipeline: for the same video and
    settings its JSON is, field for field, the row the describe task stored."""
    path = make_video(tmp_path / "a.mp4", seconds=2, fps=8, width=96, height=64, seed=3)
    item = inspect_file(str(path), runtime.settings)
    _, to_send = record([item], sessions=runtime.sessions, frames=4, priority=0, note="")
    video_id = to_send[0].id
    assert describe_video(runtime, video_id=video_id, path=str(path), frames=None) == "done"
    (printed,) = describe_files(runtime, [str(path)], frames=4)
    with session_scope(runtime.sessions) as session:
        stored = session.scalar(select(Report).where(Report.video_id == video_id))
        fields = (
            "model",
            "adapter",
            "prompt_version",
            "schema_version",
            "valid",
            "error",
            "raw_text",
            "report",
            "frame_timestamps",
            "tokens_in",
            "tokens_out",
        )
        assert {f: printed[f] for f in fields} == {f: getattr(stored, f) for f in fields}
    assert printed["status"] == "done" and printed["valid"] is True
    assert printed["worker_host"] == runtime.host


def test_worker_describe_fails_a_bad_file_alone_with_its_reason(runtime, tmp_path):
    good = make_video(tmp_path / "good.mp4", seconds=1, fps=8, width=96, height=64, seed=4)
    bad = tmp_path / "bad.mp4"
    bad.write_text("not a video")
    results = describe_files(runtime, [str(bad), str(good), str(tmp_path / "gone.mp4")], frames=2)
    assert [r["status"] for r in results] == ["failed", "done", "failed"]
    assert results[0]["reason"] == "not a video: ffmpeg found no known container format"
    assert results[2]["reason"] == "no such file"
