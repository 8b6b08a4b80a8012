"""Credentials come from the environment or from files (FLEETSCRIBE_SECRETS_DIR) and never
reach a log or the command line's output, even at DEBUG level and when they are refused."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from sqlalchemy import select
from test_pipeline import _env, _free_port, _run, running_worker, upgrade_store

from config.settings import Settings
from db.models import Video, VideoState
from db.session import make_engine, make_sessionmaker
from producer.clips import make_video

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def redis_password(tmp_path):
    """(URL with the password, password): a redis-server of the test's own that requires it."""
    import redis

    password, port = f"redis-pw-{uuid.uuid4().hex}", _free_port()
    server = subprocess.Popen(
        [
            shutil.which("redis-server") or "redis-server",
            *("--port", str(port), "--requirepass", password),
            *("--save", "", "--appendonly", "no", "--dir", str(tmp_path)),
        ],
        stdout=subprocess.DEVNULL,
    )
    client = redis.Redis(port=port, password=password)
    deadline = time.monotonic() + 20
    while True:
        try:
            client.ping()
            break
        except redis.ConnectionError:
            assert time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.1)
    yield f"redis://:{password}@127.0.0.1:{port}/0", password
    server.terminate()
    server.wait(timeout=20)


@pytest.fixture
def pg_password(pg_url):
    """(URL with a password, password) of a fresh database. This server trusts local
    connections, so the password is not checked, but every client is handed it."""
    password = f"pg-pw-{uuid.uuid4().hex}"
    user, rest = pg_url.split("://", 1)[1].split("@", 1)
    return f"postgresql://{user}:{password}@{rest}", password


def _secrets_env(tmp_path: Path, model: Path, broker: str, database: str) -> dict[str, str]:
    """The environment of a deployment whose URLs lie in a docker-secrets style folder."""
    folder = tmp_path / "secrets"
    folder.mkdir(mode=0o700)
    (folder / "fleetscribe_broker_url").write_text(broker + "\n")
    (folder / "fleetscribe_database_url").write_text(database + "\n")
    env = _env(tmp_path / "home", "unused", "unused", model)
    del env["FLEETSCRIBE_BROKER_URL"], env["FLEETSCRIBE_DATABASE_URL"]
    env.update(
        FLEETSCRIBE_SECRETS_DIR=str(folder),
        FLEETSCRIBE_CONSTRAINED="false",
        FLEETSCRIBE_MAX_NEW_TOKENS="4",
    )
    return env


def test_urls_from_a_secrets_folder_are_used_and_never_shown(
    tmp_path, tiny_model, redis_password, pg_password, pg_url
):
    (broker, redis_pw), (database, pg_pw) = redis_password, pg_password
    env = _secrets_env(tmp_path, tiny_model, broker, database)
    clip = make_video(tmp_path / "videos" / "a.mp4", seconds=1, fps=8, width=96, height=64)
    log = tmp_path / "worker.log"
    with running_worker(env, log, loglevel="DEBUG"):
        outputs = [
            _run(["producer", "enqueue", str(clip), "--wait"], env),
            _run(["producer", "status"], env),
            _run(["db", "query", "SELECT path, state FROM videos"], env),
            _run(["db", "upgrade"], env),
        ]
    for out in outputs:
        assert out.returncode == 0, out.stdout + out.stderr + log.read_text()[-3000:]
    # the files were read: Redis refuses clients without its password, and the video is in
    # the PostgreSQL database the file names (not the SQLite default)
    engine = make_engine(pg_url)
    with make_sessionmaker(engine)() as session:
        assert session.scalar(select(Video.state)) == VideoState.DONE
    engine.dispose()
    assert "done" in outputs[2].stdout
    assert "redis://:**@" in log.read_text()  # Celery names the broker, masked

    shown = log.read_text() + "".join(o.stdout + o.stderr for o in outputs)
    assert redis_pw not in shown and pg_pw not in shown


def test_a_refused_password_is_not_shown_either(tmp_path, tiny_model, redis_password, pg_password):
    (broker, redis_pw), (database, pg_pw) = redis_password, pg_password
    env = _secrets_env(tmp_path, tiny_model, broker, database)
    wrong = f"wrong-pw-{uuid.uuid4().hex}"
    # a variable that is set wins over its file
    env["FLEETSCRIBE_BROKER_URL"] = broker.replace(redis_pw, wrong)
    clip = make_video(tmp_path / "videos" / "a.mp4", seconds=1, fps=8, width=96, height=64)

    upgrade_store(env)
    # The producer, refused by the broker, retries its sends for a while before it gives
    # up; the worker, refused too, needs nothing of it: the two run side by side.
    producer = subprocess.Popen(
        [sys.executable, "-m", "producer", "enqueue", str(clip)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        log = tmp_path / "worker.log"
        with running_worker(env, log, loglevel="DEBUG") as worker:
            deadline = time.monotonic() + 45
            while "Cannot connect" not in (text := log.read_text()):
                assert worker.poll() is None and time.monotonic() < deadline, text[-3000:]
                time.sleep(0.2)
        stdout, stderr = producer.communicate(timeout=240)
    finally:
        if producer.poll() is None:  # the test failed before it was waited for
            producer.kill()
            producer.communicate()
    assert producer.returncode == 2, stdout + stderr
    assert "did not accept messages" in stderr and "Traceback" not in stderr

    shown = log.read_text() + stdout + stderr
    for password in (wrong, redis_pw, pg_pw):
        assert password not in shown


def test_settings_print_no_password():
    settings = Settings(
        broker_url="redis://:s3cret@redis-host:6379/0",
        database_url="postgresql://fleetscribe:s3cret@pg-host/fleetscribe",
    )
    assert "s3cret" not in repr(settings) and "s3cret" not in str(settings)
    assert "redis://:***@redis-host:6379/0" in repr(settings)
    assert settings.broker_url == "redis://:s3cret@redis-host:6379/0"  # only its print hides it


def test_a_missing_secrets_folder_is_a_bad_setting(monkeypatch, tmp_path):
    from config.settings import SettingsError

    monkeypatch.setenv("FLEETSCRIBE_SECRETS_DIR", str(tmp_path / "nope"))
    with pytest.raises(SettingsError, match=r"^FLEETSCRIBE_SECRETS_DIR: .*nope is not a directory"):
        Settings()
