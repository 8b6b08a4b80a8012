"""python -m worker [--gpus 0,1] [-c N] | python -m worker describe VIDEO... [--json]"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import click

from worker.cli import run
from worker.settings import load_settings


def prepare_store(settings) -> None:
    """Explicit start-up: wait for the database, then bring its schema to head."""
    from db.migrate import upgrade
    from db.session import make_engine, wait_for_database

    engine = make_engine(settings.db_url)
    try:
        wait_for_database(engine)
        upgrade(engine)
    finally:
        engine.dispose()


@click.group(
    invoke_without_command=True,
    help="Start a describe worker (Celery underneath), or describe files in this process.",
)
@click.option("--gpus", default=None, help="Comma-separated GPU ids: one worker process per GPU.")
@click.option(
    "--concurrency",
    "-c",
    type=int,
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

    check_source(settings.model)
    prepare_store(settings)
    gpu_ids = [g.strip() for g in gpus.split(",") if g.strip()] if gpus else []
    if len(gpu_ids) > 1:
        sys.exit(_supervise(gpu_ids, concurrency, queues, loglevel))
    if gpu_ids:
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu_ids[0]
    from worker.tasks import warm_up

    warm_up()
    slots = concurrency or 2 * settings.batch_size
    _celery_worker(slots, queues, loglevel, name or _node_name(gpu_ids))


def _node_name(gpu_ids: list[str]) -> str:
    return f"describe-gpu{gpu_ids[0]}@%h" if gpu_ids else "describe@%h"


def _celery_worker(concurrency: int, queues: str, loglevel: str, name: str) -> None:
    from worker.app import app

    argv = [
        "worker",
        f"--queues={queues}",
        f"--concurrency={concurrency}",
        # threads: the slots share this process's one model and GPU thread (worker/batcher.py),
        # and nothing forks after CUDA is up.
        "--pool=threads",
        f"--loglevel={loglevel}",
        f"--hostname={name}",
        "--without-mingle",
        "--without-gossip",
    ]
    app.worker_main(argv)


def _supervise(gpu_ids: list[str], concurrency: int | None, queues: str, loglevel: str) -> int:
    """One worker process per GPU; a signal to this process reaches all of them."""
    children = []
    for gpu in gpu_ids:
        env = dict(os.environ, CUDA_VISIBLE_DEVICES=gpu)
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


@cli.command(help="Describe video files in this process (no queue, nothing stored).")
@click.argument("videos", nargs=-1, required=True, type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object per video.")
@click.option("--frames", "-k", type=int, default=None, help="Frames per video.")
def describe(videos: tuple[str, ...], as_json: bool, frames: int | None) -> None:
    from worker.oneshot import describe_files

    settings = load_settings()
    results = describe_files(list(videos), settings, frames=frames)
    if as_json:
        for result in results:
            click.echo(json.dumps(result, ensure_ascii=False))
    else:
        from worker.oneshot import render

        render(results)
    if any(r["status"] != "done" for r in results):
        sys.exit(1)


if __name__ == "__main__":
    run(cli, "python -m worker")
