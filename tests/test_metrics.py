"""A describe worker's /metrics, scraped for real: the counts match the store, and a real
Prometheus with the shipped scrape configuration reads them back through its HTTP API."""

from __future__ import annotations

import json
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml
from helpers import system_tool
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import func, select
from test_pipeline import _env, _run, _states, _wait_for, running_worker, upgrade_store

from db.models import Report, Video, VideoState
from db.session import make_engine, make_sessionmaker
from metrics.names import names
from producer.clips import make_video

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]
SCRAPE_CONFIG = ROOT / "compose" / "prometheus" / "prometheus.yml"


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _get(url: str, timeout: float = 5.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.read().decode()


def _samples(text: str) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value} of a /metrics page."""
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def _value(samples: dict, name: str, **labels) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


def _store_view(database: str) -> tuple[list[str], int, list[str]]:
    """(worker_host of each report, answer tokens in all, reasons of the failed videos)."""
    engine = make_engine(database)
    with make_sessionmaker(engine)() as session:
        hosts = list(session.scalars(select(Report.worker_host)))
        tokens = session.scalar(select(func.sum(Report.tokens_out))) or 0
        reasons = list(
            session.scalars(select(Video.reason).where(Video.state == VideoState.FAILED))
        )
    engine.dispose()
    return hosts, tokens, reasons


@pytest.fixture(scope="module")
def described(tmp_path_factory, tiny_model, module_redis_url, module_pg_url):
    """A real worker with metrics on, after it described two videos and turned one away
    (its file changed after it was enqueued); yields (port, env, log). Started once for
    the module: its tests only read its /metrics and the store."""
    tmp_path = tmp_path_factory.mktemp("described")
    redis_url, pg_url = module_redis_url, module_pg_url
    port = _free_port()
    env = _env(tmp_path / "home", redis_url, pg_url, tiny_model)
    env.update(
        FLEETSCRIBE_METRICS_PORT=str(port),
        FLEETSCRIBE_FRAMES="2",
        FLEETSCRIBE_CONSTRAINED="false",  # short answers: this test is about the counting
        FLEETSCRIBE_MAX_NEW_TOKENS="4",
    )
    folder = tmp_path / "videos"
    for i in range(3):
        make_video(folder / f"v{i}.mp4", seconds=1, fps=4, width=64, height=48, seed=40 + i)
    log = tmp_path / "worker.log"
    upgrade_store(env)
    out = _run(["producer", "enqueue", str(folder)], env)
    assert out.returncode == 0, out.stdout + out.stderr
    with open(folder / "v2.mp4", "ab") as f:
        f.write(b"\0" * 4096)  # changed after it was enqueued: the worker refuses it
    with running_worker(env, log):
        _wait_for(
            lambda: sum(n for s, n in _states(pg_url).items() if s in ("done", "failed")) == 3,
            120,
            "three videos to finish",
            log,
        )
        yield port, env, log


def test_the_worker_s_metrics_match_the_store(described, module_pg_url):
    port, _, _ = described
    pg_url = module_pg_url
    hosts, tokens, reasons = _store_view(pg_url)
    page = _get(f"http://127.0.0.1:{port}/metrics")
    samples = _samples(page)
    done, failed = len(hosts), len(reasons)
    assert (done, failed) == (2, 1), (hosts, reasons)

    described_total = sum(
        _value(samples, "fleetscribe_videos_described_total", valid=v) or 0
        for v in ("true", "false")
    )
    assert described_total == done
    rejected = _value(samples, "fleetscribe_videos_rejected_total")
    assert rejected == failed == sum("changed" in r for r in reasons)
    for reason in ("model", "timeout", "internal"):
        assert _value(samples, "fleetscribe_videos_failed_total", reason=reason) == 0
    # Every video was decoded (or refused while decoding); the described ones went on.
    assert _value(samples, "fleetscribe_stage_seconds_count", stage="decode") == 3
    for stage in ("preprocess", "generate", "store"):
        assert _value(samples, "fleetscribe_stage_seconds_count", stage=stage) == done
    assert _value(samples, "fleetscribe_queue_wait_seconds_count") == 3
    assert _value(samples, "fleetscribe_batch_size_sum") == done
    assert _value(samples, "fleetscribe_answer_tokens_total") == tokens
    # Read from the broker and the store at the scrape: nothing waits, 2 done, 1 failed.
    assert _value(samples, "fleetscribe_queue_depth", queue="describe") == 0
    assert _value(samples, "fleetscribe_queue_depth", queue="train") == 0
    assert _value(samples, "fleetscribe_videos", state="done") == done
    assert _value(samples, "fleetscribe_videos", state="failed") == failed
    assert _value(samples, "fleetscribe_source_up", source="broker") == 1
    assert _value(samples, "fleetscribe_source_up", source="store") == 1
    info = [labels for (name, labels) in samples if name == "fleetscribe_worker_info"]
    assert len(info) == 1 and dict(info[0])["host"] == hosts[0]
    # On the CPU there is no GPU memory to show, and no made-up zero either.
    assert not any(name == "fleetscribe_gpu_memory_bytes" for name, _ in samples)
    # Whatever this page holds is what names() promises the dashboard.
    assert {name for name, _ in samples} <= names()


def _prometheus_config(shipped: Path, target: str, folder: Path) -> Path:
    """The shipped scrape configuration's describe-worker job (its path, its global
    settings) pointed at `target` (compose's service names do not resolve here), scraping
    every second."""
    config = yaml.safe_load(shipped.read_text())
    jobs = config["scrape_configs"]
    job = next(j for j in jobs if "describe" in j["job_name"])
    for key in [k for k in job if k.endswith("_sd_configs")]:
        del job[key]  # found by compose's DNS there; named here
    job["static_configs"] = [{"targets": [target]}]
    job["scrape_interval"] = "1s"
    config["scrape_configs"] = [job]
    path = folder / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_a_real_prometheus_scrapes_the_worker_with_the_shipped_configuration(
    described, module_pg_url, tmp_path
):
    binary = system_tool("prometheus", "prometheus")
    port, _, _ = described
    pg_url = module_pg_url
    hosts, _tokens, _reasons = _store_view(pg_url)
    config = _prometheus_config(SCRAPE_CONFIG, f"127.0.0.1:{port}", tmp_path)
    web = _free_port()
    log = tmp_path / "prometheus.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [
                binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{web}",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        query = urllib.parse.quote("sum(fleetscribe_videos_described_total)")
        url = f"http://127.0.0.1:{web}/api/v1/query?query={query}"
        deadline, value = time.monotonic() + 60, None
        while time.monotonic() < deadline:
            try:
                answer = json.loads(_get(url))
                result = answer["data"]["result"]
                if result:
                    value = float(result[0]["value"][1])
                    break
            except (OSError, ValueError, KeyError):
                pass
            time.sleep(0.5)
        assert value == len(hosts), log.read_text()[-2000:]
        targets = json.loads(_get(f"http://127.0.0.1:{web}/api/v1/targets"))["data"]
        assert [t["health"] for t in targets["activeTargets"]] == ["up"]
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_a_taken_metrics_port_stops_the_worker_with_one_line(tmp_path, tiny_model):
    import socket

    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = _env(tmp_path / "home", "filesystem://", "", tiny_model)
        env.update(FLEETSCRIBE_METRICS_PORT=str(port))
        env.pop("FLEETSCRIBE_DATABASE_URL")
        out = subprocess.run(
            [__import__("sys").executable, "-m", "worker"],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-2000:]
    lines = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert lines == [
        f"error: cannot serve metrics on 0.0.0.0:{port} (FLEETSCRIBE_METRICS_PORT): "
        "Address already in use"
    ], out.stderr[-2000:]
