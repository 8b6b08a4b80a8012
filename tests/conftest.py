"""Shared fixtures: the tiny offline model, real PostgreSQL databases and a real Redis."""

from __future__ import annotations

import os
import uuid
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One intra-op thread for torch here and in every process the tests start (they inherit
# the environment): the tiny model's small matrices decode several times faster on one
# thread than on two fighting over a busy 2-core CI machine (helpers.torch_threads).
os.environ.setdefault("OMP_NUM_THREADS", "1")

ROOT = Path(__file__).resolve().parents[1]
PG_ADMIN_URL = os.environ.get(
    "FLEETSCRIBE_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres"
)
REDIS_URL = os.environ.get("FLEETSCRIBE_TEST_REDIS", "redis://127.0.0.1:6379/15")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """The tiny random Qwen3-VL, built once per test session through `build_tiny`."""
    from models.tiny import build_tiny

    return build_tiny(tmp_path_factory.mktemp("tiny-model"))


def _pg_admin():
    import psycopg

    return psycopg.connect(
        PG_ADMIN_URL.replace("postgresql+psycopg", "postgresql"), autocommit=True
    )


def _fresh_pg_database():
    """A fresh, empty PostgreSQL database on the local server (its URL, yielded), dropped
    afterwards."""
    name = f"fleetscribe_test_{uuid.uuid4().hex[:10]}"
    with _pg_admin() as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base = PG_ADMIN_URL.rsplit("/", 1)[0]
    yield f"{base}/{name}"
    with _pg_admin() as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def pg_url() -> str:
    """A fresh, empty PostgreSQL database on the local server, dropped afterwards."""
    yield from _fresh_pg_database()


@pytest.fixture(scope="module")
def module_pg_url() -> str:
    """As pg_url, for a module's fixture that builds an expensive store once and whose
    tests only read it."""
    yield from _fresh_pg_database()


@pytest.fixture
def sqlite_url(tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'fleetscribe.db'}"


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request) -> str:
    """Each test using this runs on SQLite and on PostgreSQL."""
    return request.getfixturevalue("sqlite_url" if request.param == "sqlite" else "pg_url")


@pytest.fixture(scope="session")
def _upgraded_sqlite(tmp_path_factory) -> Path:
    """A SQLite file upgraded to head once per session (db.migrate.upgrade, as
    `python -m db upgrade` runs it), which fixture `migrated` copies."""
    from db.migrate import upgrade
    from db.session import make_engine

    path = tmp_path_factory.mktemp("upgraded") / "fleetscribe.db"
    engine = make_engine(f"sqlite:///{path}")
    try:
        upgrade(engine)
    finally:
        engine.dispose()
    return path


@pytest.fixture
def migrated(db_url, request):
    """(engine, sessionmaker) on a database upgraded to head. On SQLite the test's file is
    a copy (SQLite's backup API) of the session's upgraded one: the same database its own
    upgrade gives, without running every migration again per test (about a tenth of a
    second each). Migrations themselves are tested in test_migrations.py."""
    from sqlalchemy.engine import make_url

    from db.migrate import upgrade
    from db.session import make_engine, make_sessionmaker

    if db_url.startswith("sqlite"):
        import sqlite3

        target = Path(make_url(db_url).database)
        target.parent.mkdir(parents=True, exist_ok=True)
        source = request.getfixturevalue("_upgraded_sqlite")
        with closing(sqlite3.connect(source)) as src, closing(sqlite3.connect(target)) as copy:
            src.backup(copy)
        engine = make_engine(db_url)
    else:
        # PostgreSQL: a copy (CREATE DATABASE ... TEMPLATE) is no faster than the upgrade
        engine = make_engine(db_url)
        upgrade(engine)
    yield engine, make_sessionmaker(engine)
    engine.dispose()


def _emptied_redis():
    """The tests' Redis database (its URL, yielded), emptied before and after."""
    import redis

    client = redis.Redis.from_url(REDIS_URL)
    client.flushdb()
    yield REDIS_URL
    client.flushdb()
    client.close()


@pytest.fixture
def redis_url() -> str:
    """A real Redis database, emptied before and after the test."""
    yield from _emptied_redis()


@pytest.fixture(scope="module")
def module_redis_url() -> str:
    """As redis_url, emptied before and after a module's tests (for a module fixture that
    keeps a worker running across them). No test that uses redis_url may run inside such a
    module: it would empty the database under the worker."""
    yield from _emptied_redis()


@dataclass
class Frames:
    """The part of worker.video.SampledVideo the engine reads."""

    frames: list
    timestamps: list


@pytest.fixture(scope="session")
def tiny_loaded(tiny_model):
    """The tiny model loaded in float32 on the CPU, once per test session."""
    from models.loader import load_model

    return load_model(str(tiny_model), quant="fp32")


@pytest.fixture(scope="session")
def random_videos():
    """Factory of videos that differ in frame count, frame size and times, so prompts differ."""

    def make(count: int, *, seed: int, max_frames: int = 5) -> list[Frames]:
        rng = np.random.default_rng(seed)
        videos = []
        for _ in range(count):
            n = int(rng.integers(1, max_frames + 1))
            h, w = int(rng.integers(32, 160)), int(rng.integers(32, 200))
            base = rng.integers(0, 256, 3)
            frames = [
                np.clip(base + rng.normal(0, 40, (h, w, 3)), 0, 255).astype(np.uint8)
                for _ in range(n)
            ]
            start = float(rng.uniform(0, 600))
            videos.append(Frames(frames, [round(start + 0.9 * i, 2) for i in range(n)]))
        return videos

    return make


def pytest_sessionfinish(session, exitstatus):
    session.config._fleetscribe_exitstatus = int(exitstatus)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    """End the test process with pytest's own exit status once pytest is done, without
    the interpreter's teardown. After a whole suite had passed and pytest had printed its
    summary, CI's test process once died at that teardown with "terminate called without
    an active exception" (SIGABRT, so `make test` failed): a native library's thread (the
    suite loads torch, xgrammar, tokenizers, pyarrow and PyAV in this one process) met
    its objects' destructors. Only this runner process is spared that teardown; the
    workers, producers and trainers the tests start exit on their own and the tests check
    their exit codes."""
    status = getattr(config, "_fleetscribe_exitstatus", None)
    if status is None or os.environ.get("FLEETSCRIBE_TEST_FULL_TEARDOWN"):
        return
    import sys

    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
