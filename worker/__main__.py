"""python -m worker [--gpus 0,1] [-c N]
python -m worker describe VIDEO... [--json] [--frames K] [--sampling uniform|events]
python -m worker flower [--port N]"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys

import click

from config.cli import run
from config.errors import ExpectedError
from config.settings import SAMPLING_MODES, load_settings


class NoSuchGpu(ExpectedError):
    """--gpus names a GPU that torch does not see on this machine."""


def prepare_store(settings) -> None:
    """Explicit start-up: wait for the database and check that its schema is the one this
    code needs (`python -m db upgrade` changes it; the embedded default upgrades itself)."""
    from db.session import open_store

    open_store(settings, wait_s=60).dispose()


def _gpu_ids(_ctx, _param, value: str | None) -> list[str]:
    if value is None:
        return []
    ids = [part.strip() for part in value.split(",")]
    if not all(re.fullmatch(r"\d+", g) for g in ids):
        raise click.BadParameter(f"{value!r}: GPU ids are whole numbers, comma-separated (0,1)")
    ids = [str(int(g)) for g in ids]
    if len(set(ids)) < len(ids):
        raise click.BadParameter(f"{value!r}: a GPU is named twice")
    return ids


def _check_gpus(gpu_ids: list[str]) -> None:
    """Refuse GPU ids that torch does not see. The ids number the machine's GPUs: each
    worker process runs with CUDA_VISIBLE_DEVICES=<its id>. NVML answers the count without
    starting CUDA, so a process's CUDA_VISIBLE_DEVICES still takes effect afterwards."""
    import torch

    if len(gpu_ids) == 1:
        # This process runs on it: hide the others first, as the worker does, so that CUDA
        # (should it start here) sees only that one; torch then sees 1 GPU, or 0.
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu_ids[0]
        if torch.cuda.device_count() == 1:
            return
    hidden = os.environ.pop("CUDA_VISIBLE_DEVICES", None)
    try:
        seen = torch.cuda.device_count()
    finally:
        if hidden is not None:
            os.environ["CUDA_VISIBLE_DEVICES"] = hidden
    missing = [g for g in gpu_ids if int(g) >= seen]
    if not missing:
        return
    which = ("GPU " if len(missing) == 1 else "GPUs ") + ", ".join(missing)
    ids = f" (ids 0-{seen - 1})" if seen > 1 else " (id 0)" if seen == 1 else ""
    gpus = f"{seen} GPU{'' if seen == 1 else 's'}"
    raise NoSuchGpu(f"--gpus {','.join(gpu_ids)}: {which} not found: torch sees {gpus}{ids}")


@click.group(
    invoke_without_command=True,
    help="Start a describe worker (Celery underneath), or describe files in this process.",
)
@click.option(
    "--gpus",
    default=None,
    callback=_gpu_ids,
    help="Comma-separated GPU ids: one worker process per GPU.",
)
@click.option(
    "--concurrency",
    "-c",
    type=click.IntRange(1),
    default=None,
    help="Task slots (threads) per worker; default 2x FLEETSCRIBE_BATCH_SIZE.",
)
@click.option("--queues", "-Q", default="describe", show_default=True)
@click.option("--loglevel", "-l", default="INFO", show_default=True)
@click.option("--name", "-n", default=None, help="Celery node name (default describe@host).")
@click.pass_context
def cli(ctx, gpus, concurrency, queues, loglevel, name) -> None:
    if ctx.invoked_subcommand is not None:
        return
    settings = load_settings()
    from models.loader import check_source

    gpu_ids = gpus  # parsed by _gpu_ids
    if gpu_ids:
        _check_gpus(gpu_ids)
    check_source(settings.model)
    prepare_store(settings)
    if len(gpu_ids) > 1:
        sys.exit(_supervise(gpu_ids, concurrency, queues, loglevel, settings.metrics_port))
    if gpu_ids:
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu_ids[0]
    slots = concurrency or 2 * settings.batch_size
    code = _celery_worker(settings, slots, queues, loglevel, name or _node_name(gpu_ids))
    sys.exit(code)


def _node_name(gpu_ids: list[str]) -> str:
    return f"describe-gpu{gpu_ids[0]}@%h" if gpu_ids else "describe@%h"


def _celery_worker(settings, concurrency: int, queues: str, loglevel: str, name: str) -> int:
    """Run the describe worker until it stops (threads pool with a cold shutdown,
    worker/pool.py); its exit code, or its start-up failure raised as one line."""
    from broker.celery_app import run_worker
    from worker.app import make_app

    return run_worker(
        make_app(settings), queues=queues, concurrency=concurrency, loglevel=loglevel,
        hostname=name,
    )  # fmt: skip


def _supervise(
    gpu_ids: list[str], concurrency: int | None, queues: str, loglevel: str, metrics_port: int
) -> int:
    """One worker process per GPU; a signal to this process reaches all of them. The i-th
    serves its metrics on FLEETSCRIBE_METRICS_PORT + i."""
    children = []
    for i, gpu in enumerate(gpu_ids):
        env = dict(os.environ, CUDA_VISIBLE_DEVICES=gpu)
        if metrics_port:
            env["FLEETSCRIBE_METRICS_PORT"] = str(metrics_port + i)
        cmd = [sys.executable, "-m", "worker", f"--gpus={gpu}"]
        cmd += [f"--concurrency={concurrency}"] if concurrency else []
        cmd += [f"--queues={queues}", f"--loglevel={loglevel}"]
        children.append(subprocess.Popen(cmd, env=env))

    def forward(signum, _frame):
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    codes = [child.wait() for child in children]
    return max(codes, key=abs)


class NoFlowerAuth(ExpectedError):
    """`worker flower` without credentials, not told --unauthenticated."""


@cli.command(help="Flower, the Celery monitor, on the configured broker (basic auth).")
@click.option("--port", type=click.IntRange(1, 65535), default=5555, show_default=True)
@click.option("--address", default="127.0.0.1", show_default=True, help="Interface to listen on.")
@click.option(
    "--unauthenticated",
    is_flag=True,
    help="Run without FLEETSCRIBE_FLOWER_BASIC_AUTH, open to whoever reaches the port.",
)
@click.option(
    "--db",
    "db_path",
    type=click.Path(dir_okay=False),
    default=None,
    help="Flower's state file (default FLEETSCRIBE_HOME/flower/flower.db).",
)
@click.option(
    "--save-every",
    type=click.IntRange(1, 86_400),
    default=60,
    show_default=True,
    help="Seconds between saves of Flower's state (it also saves at a clean stop).",
)
def flower(port: int, address: str, unauthenticated: bool, db_path: str | None, save_every: int):
    # The shared configuration is enough (queues, Redis transport options): Flower needs
    # no task code and no model. Flower reads its options from FLOWER_* variables too: the
    # credentials go that way, so no password shows on a command line (ps, /proc).
    from pathlib import Path

    from broker.celery_app import make_celery

    settings = load_settings()
    auth = settings.flower_basic_auth
    if auth is None and not unauthenticated:
        raise NoFlowerAuth(
            "Flower needs FLEETSCRIBE_FLOWER_BASIC_AUTH (user:password; or the file "
            "fleetscribe_flower_basic_auth in FLEETSCRIBE_SECRETS_DIR); --unauthenticated "
            "runs it without, on purpose"
        )
    if auth is not None:
        os.environ["FLOWER_BASIC_AUTH"] = auth.get_secret_value()
    else:
        os.environ.pop("FLOWER_BASIC_AUTH", None)
    db = Path(db_path) if db_path else settings.home / "flower" / "flower.db"
    db.parent.mkdir(parents=True, exist_ok=True)
    app = make_celery(settings)
    args = [
        "flower",
        f"--port={port}",
        f"--address={address}",
        "--persistent=True",
        f"--db={db}",
        # Flower saves its state at a clean stop only, unless told an interval (in ms):
        # a killed Flower loses at most this much.
        f"--state_save_interval={save_every * 1000}",
    ]
    sys.exit(app.start(args) or 0)


@cli.command(help="Describe video files through the worker's pipeline (no queue, no store).")
@click.argument("videos", nargs=-1, required=True, type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object per video.")
@click.option("--frames", "-k", type=click.IntRange(1, 64), default=None, help="Frames per video.")
@click.option(
    "--sampling",
    type=click.Choice(SAMPLING_MODES),
    default=None,
    help="How frames are chosen (default FLEETSCRIBE_SAMPLING).",
)
def describe(
    videos: tuple[str, ...], as_json: bool, frames: int | None, sampling: str | None
) -> None:
    from worker.lifecycle import WorkerRuntime
    from worker.pipeline import describe_files

    settings = load_settings()
    with WorkerRuntime.open(settings, with_store=False) as rt:
        results = describe_files(rt, list(videos), frames=frames, sampling=sampling)
    if as_json:
        for result in results:
            click.echo(json.dumps(result, ensure_ascii=False))
    else:
        _render(results)
    if any(r["status"] != "done" for r in results):
        sys.exit(1)


def _render(results: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(header_style="bold")
    for col in ("path", "status", "valid", "risk", "detail"):
        table.add_column(col, overflow="fold")
    for r in results:
        if r["status"] != "done":
            table.add_row(r["path"], r["status"], "", "", r["reason"])
            continue
        report = r["report"] or {}
        risk = report.get("driving_parameters", {}).get("risk_factor", "")
        detail = report.get("scene_description") or r["error"] or ""
        table.add_row(r["path"], "done", str(r["valid"]).lower(), risk, detail[:200])
    Console().print(table)


if __name__ == "__main__":
    run(cli, "python -m worker")
