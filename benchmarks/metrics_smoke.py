"""A real describe worker's /metrics on a GPU machine: the embedded default (SQLite and
the filesystem broker, no server), the tiny model, clips the producer makes; the scrape
is compared with the store, and GPU memory with what torch says in that process.

    python benchmarks/metrics_smoke.py [--quant fp16] [--videos 12] [--out DIR]

Prints one JSON object (and writes it to DIR/metrics_smoke.json with the worker's log).
On a machine without CUDA it runs with --quant fp32 and shows no GPU memory.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _scrape(port: int) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as page:
        text = page.read().decode()
    found = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            found[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return found


def _run(args: list[str], env: dict, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=timeout,
    )  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quant", default=None, help="default: fp16 on CUDA, else fp32")
    parser.add_argument("--videos", type=int, default=12)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    import torch

    cuda = torch.cuda.is_available()
    quant = args.quant or ("fp16" if cuda else "fp32")
    out = args.out or Path(tempfile.mkdtemp())
    out.mkdir(parents=True, exist_ok=True)
    home = Path(tempfile.mkdtemp()) / "home"
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEETSCRIBE_")}
    env.update(
        FLEETSCRIBE_HOME=str(home),
        FLEETSCRIBE_MODEL=str(home / "tiny-model"),
        FLEETSCRIBE_QUANT=quant,
        FLEETSCRIBE_FRAMES="8",
        FLEETSCRIBE_BATCH_SIZE="8",
        FLEETSCRIBE_METRICS_PORT=str(port),
        HF_HUB_OFFLINE="1",
        PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p),
    )
    steps = (
        ["models", "build-tiny", str(home / "tiny-model")],
        ["producer", "clips", str(home / "videos"), "--count", str(args.videos)],
    )
    for step in steps:
        done = _run(step, env)
        assert done.returncode == 0, done.stderr
    log = out / "metrics_smoke_worker.log"
    with open(log, "wb") as handle:
        worker = subprocess.Popen(
            [sys.executable, "-m", "worker", "--loglevel", "INFO"],
            cwd=ROOT, env=env, stdout=handle, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        began = time.monotonic()
        enqueued = _run(["producer", "enqueue", str(home / "videos"), "--wait"], env)
        wall = time.monotonic() - began
        assert enqueued.returncode == 0, enqueued.stdout + enqueued.stderr
        scraped = _scrape(port)
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.wait(timeout=120)
    counts = _run(
        ["db", "query", "SELECT count(*) AS n, sum(tokens_out) AS tokens FROM reports",
         "--format", "json"], env,
    )  # fmt: skip
    rows = json.loads(counts.stdout)
    row = rows[0] if isinstance(rows, list) else rows["rows"][0]
    gpu = {k: v for k, v in scraped.items() if k.startswith("fleetscribe_gpu_memory_bytes")}
    result = {
        "gpu": torch.cuda.get_device_name(0) if cuda else None,
        "quant": quant,
        "videos": args.videos,
        "wall_s": round(wall, 2),
        "store_reports": row["n"],
        "store_tokens_out": row["tokens"],
        "described_total": sum(
            v for k, v in scraped.items() if k.startswith("fleetscribe_videos_described_total")
        ),
        "answer_tokens_total": scraped.get("fleetscribe_answer_tokens_total"),
        "batches": scraped.get("fleetscribe_batch_size_count"),
        "batch_rows": scraped.get("fleetscribe_batch_size_sum"),
        "tokens_per_second_last_batch": scraped.get("fleetscribe_answer_tokens_per_second"),
        "generate_seconds_sum": scraped.get("fleetscribe_stage_seconds_sum{stage=generate}"),
        "decode_seconds_sum": scraped.get("fleetscribe_stage_seconds_sum{stage=decode}"),
        "gpu_memory_gib": {k: round(v / 2**30, 4) for k, v in gpu.items()},
        "queue_depth_describe": scraped.get("fleetscribe_queue_depth{queue=describe}"),
        "store_done": scraped.get("fleetscribe_videos{state=done}"),
    }
    result["counts_match_store"] = (
        result["described_total"] == result["store_reports"] == result["store_done"]
        and result["answer_tokens_total"] == result["store_tokens_out"]
    )
    if cuda:
        kinds = {k.split("kind=")[1].rstrip("}"): v for k, v in gpu.items()}
        result["gpu_memory_sane"] = (
            set(kinds) == {"in_use", "reserved", "peak"}
            and 0 < kinds["in_use"] <= kinds["peak"]
            and kinds["in_use"] <= kinds["reserved"]
        )
    text = json.dumps(result, indent=2)
    print(text)
    (out / "metrics_smoke.json").write_text(text + "\n")
    return 0 if result["counts_match_store"] and result.get("gpu_memory_sane", True) else 1


if __name__ == "__main__":
    sys.exit(main())
