"""`python -m worker flower`: a real Flower on the test Redis beside a real describe worker,
read through Flower's HTTP API with basic auth; refused without credentials; its state
saved on an interval, so a killed Flower comes back knowing the finished tasks."""

from __future__ import annotations

import base64
import json
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest
from test_metrics import _free_port
from test_pipeline import _env, _run, running_worker

from producer.clips import make_video

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]
AUTH = "ops:s3cret-for-the-test"


def _api(port: int, path: str, auth: str | None = AUTH, timeout: float = 10.0):
    """(status, parsed JSON or text) of GET http://127.0.0.1:port/path."""
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}")
    if auth:
        token = base64.b64encode(auth.encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            body = response.read().decode()
            status = response.status
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()
    try:
        return status, json.loads(body)
    except ValueError:
        return status, body


@contextmanager
def running_flower(env: dict[str, str], port: int, db: Path, log: Path, *extra: str):
    cmd = [sys.executable, "-m", "worker", "flower", f"--port={port}", f"--db={db}", *extra]
    with open(log, "ab") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        _until(lambda: _up(port), 60, "Flower to answer", log)
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _up(port: int) -> bool:
    try:
        return _api(port, "/healthcheck", auth=None, timeout=2)[0] == 200
    except OSError:
        return False


def _until(check, timeout: float, what: str, log: Path):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.3)
    pytest.fail(f"timed out waiting for {what}\n{log.read_text()[-3000:]}")


def _succeeded(port: int) -> list[dict]:
    status, tasks = _api(port, "/api/tasks?state=SUCCESS")
    assert status == 200, tasks
    return list(tasks.values())


def test_flower_shows_the_worker_the_queues_and_the_finished_task(
    tmp_path, tiny_model, redis_url, pg_url
):
    env = _env(tmp_path / "home", redis_url, pg_url, tiny_model)
    env.update(
        FLEETSCRIBE_FLOWER_BASIC_AUTH=AUTH,
        FLEETSCRIBE_CONSTRAINED="false",
        FLEETSCRIBE_MAX_NEW_TOKENS="4",
        FLEETSCRIBE_FRAMES="2",
    )
    video = make_video(tmp_path / "videos" / "clip.mp4", seconds=1, fps=4, width=64, height=48)
    port, db, log = _free_port(), tmp_path / "flower" / "flower.db", tmp_path / "flower.log"
    with (
        running_worker(env, tmp_path / "worker.log", name="flowertest@%h"),
        running_flower(env, port, db, log, "--save-every=1") as flower,
    ):
        out = _run(["producer", "enqueue", str(video), "--wait"], env, timeout=180)
        assert out.returncode == 0, out.stdout + out.stderr
        tasks = _until(lambda: _succeeded(port), 30, "Flower to see the task succeed", log)
        (task,) = tasks
        assert task["name"] == "fleetscribe.describe"
        # The task names its video: id, path and sha256 (the message's kwargsrepr).
        import hashlib

        sha = hashlib.sha256(video.read_bytes()).hexdigest()
        assert str(video) in task["kwargs"] and sha in task["kwargs"], task["kwargs"]
        assert task["worker"].startswith("flowertest@")

        status, workers = _api(port, "/api/workers?refresh=1")
        assert status == 200 and any(w.startswith("flowertest@") for w in workers), workers
        status, queues = _api(port, "/api/queues/length")
        assert status == 200, queues
        assert {q["name"]: q["messages"] for q in queues["active_queues"]}["describe"] == 0

        # No credentials, or wrong ones: 401, on the API and on the pages.
        assert _api(port, "/api/workers", auth=None)[0] == 401
        assert _api(port, "/api/tasks", auth="ops:wrong")[0] == 401
        assert _api(port, "/", auth=None)[0] == 401
        # Flower's own gap (README): its /metrics and /healthcheck answer anyone.
        assert _api(port, "/metrics", auth=None)[0] == 200
        assert _api(port, "/healthcheck", auth=None)[0] == 200

        # Saved on the interval: a Flower killed outright (no clean stop, no save then)
        # comes back knowing the finished task.
        time.sleep(2.5)
        flower.send_signal(signal.SIGKILL)
        flower.wait(timeout=30)
    with running_flower(env, port, db, log):
        restored = _until(lambda: _succeeded(port), 20, "the restored state", log)
        assert [t["uuid"] for t in restored] == [task["uuid"]]


def _flower_cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "worker", "flower", f"--port={_free_port()}", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_flower_refuses_to_start_without_credentials(tmp_path):
    env = _env(tmp_path / "home", "filesystem://", "", tmp_path / "no-model")
    env.pop("FLEETSCRIBE_DATABASE_URL")
    out = _flower_cli(env)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1] == (
        "error: Flower needs FLEETSCRIBE_FLOWER_BASIC_AUTH (user:password; or the file "
        "fleetscribe_flower_basic_auth in FLEETSCRIBE_SECRETS_DIR); --unauthenticated runs "
        "it without, on purpose"
    )
    env["FLEETSCRIBE_FLOWER_BASIC_AUTH"] = "nopassworduser"  # a user without a password
    out = _flower_cli(env)
    assert out.returncode == 2
    assert "FLEETSCRIBE_FLOWER_BASIC_AUTH: user:password expected" in out.stderr
    assert "nopassworduser" not in out.stderr  # the value is never shown


def test_flower_reads_its_credentials_from_the_secrets_folder(tmp_path):
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    (secrets / "fleetscribe_flower_basic_auth").write_text("ops:from-a-file\n")
    env = _env(tmp_path / "home", "filesystem://", "", tmp_path / "no-model")
    env.pop("FLEETSCRIBE_DATABASE_URL")
    env["FLEETSCRIBE_SECRETS_DIR"] = str(secrets)
    port, log = _free_port(), tmp_path / "flower.log"
    with running_flower(env, port, tmp_path / "f.db", log):
        assert _api(port, "/api/workers", auth="ops:from-a-file")[0] == 200
        assert _api(port, "/api/workers", auth=None)[0] == 401
    assert "from-a-file" not in log.read_text()  # Flower's own log does not show it


def _sent_headers(folder: Path, queue: str) -> list[dict]:
    """The headers of the messages the filesystem broker holds for `queue`."""
    found = []
    for path in sorted(folder.glob(f"*.{queue}.msg")):
        found.append(json.loads(path.read_text())["headers"])
    return found


def test_messages_name_their_video_and_their_run_for_flower(tmp_path, migrated):
    """What Flower shows of a task is its message's kwargsrepr: the video's id, path and
    sha256; the run's id and name. The body stays what the task takes."""
    from broker.celery_app import make_celery
    from config.settings import Settings
    from db import store
    from db import training as runs
    from db.models import VideoState
    from db.session import session_scope
    from delivery.outbox import send
    from training.messages import send_run

    _engine, sessions = migrated
    settings = Settings(home=tmp_path / "home", broker_url="filesystem://")
    with session_scope(sessions) as session:
        video = store.add_video(
            session=session,
            path="/videos/a.mp4",
            sha256="ab" * 32,
            bytes=10,
            frames=4,
            state=VideoState.QUEUED,
        )
        run = runs.create_run(
            session=session, name="night-rain", base_model="m", dataset="d", config={}
        )
        session.flush()
        session.expunge(video)
        run_id = run.id
    assert send([video], sessions=sessions, settings=settings) == 1
    app = make_celery(settings)
    try:
        send_run(app, sessions, run_id)
    finally:
        app.close()
    folder = settings.broker_folder
    (describe,) = _sent_headers(folder, "describe")
    assert describe["kwargsrepr"] == repr(
        {"video_id": video.id, "path": "/videos/a.mp4", "sha256": "ab" * 32}
    )
    (train,) = _sent_headers(folder, "train")
    assert train["kwargsrepr"] == repr({"run_id": run_id, "run": "night-rain"})
