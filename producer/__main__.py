"""python -m producer enqueue PATH... [--manifest F] [--frames K] [--priority N] [--wait]
python -m producer requeue --where "prompt_version < 2" [--dry-run] [--wait]
python -m producer reap [--after SECONDS] [--dry-run]
python -m producer status [--batch ID]"""

from __future__ import annotations

import sys
import time

import click
from rich.console import Console
from rich.table import Table

from config.cli import run
from config.settings import load_settings

console = Console(highlight=False)
_REASON_ROWS = 50


def _sessions(settings):
    from db.migrate import upgrade
    from db.session import make_engine, make_sessionmaker, wait_for_database

    engine = make_engine(settings.db_url)
    wait_for_database(engine, timeout=30)
    upgrade(engine)
    return make_sessionmaker(engine)


@click.group(help="Find, probe, dedupe and enqueue driving videos; follow their progress.")
def cli() -> None:
    pass


@cli.command(help="Enqueue video files, directories (recursive), globs or a manifest.")
@click.argument("paths", nargs=-1)
@click.option("--manifest", type=click.Path(dir_okay=False), help="File with one path a line.")
@click.option("--frames", "-k", type=click.IntRange(1, 64), default=None, help="Frames per video.")
@click.option("--priority", type=click.IntRange(0, 9), default=0, show_default=True)
@click.option("--wait", is_flag=True, help="Follow the batch until every video is finished.")
@click.option("--note", default="", help="Free text stored with the batch.")
def enqueue(paths, manifest, frames, priority, wait, note) -> None:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    from producer import enqueue as enq
    from producer.discover import discover

    if not paths and not manifest:
        raise click.UsageError("give at least one PATH or --manifest")
    settings = load_settings()
    frames = frames or settings.frames
    files = discover(list(paths), manifest=manifest)
    sessions = _sessions(settings)

    columns = ("{task.description}", BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=True, disable=len(files) < 20) as bar:
        task = bar.add_task("probing", total=len(files))
        items = enq.inspect_all(files, settings, on_done=lambda _r: bar.advance(task))
    summary, to_send = enq.record(
        items, sessions=sessions, frames=frames, priority=priority, note=note
    )
    summary.sent = enq.send(to_send, sessions=sessions, priority=priority, settings=settings)
    _print_summary(summary, len(files))
    if wait:
        _follow(sessions, summary.batch_id)


def _print_summary(summary, n_inputs: int) -> None:
    table = Table(title=f"batch {summary.batch_id}: {n_inputs} inputs", header_style="bold")
    table.add_column("outcome")
    table.add_column("inputs", justify="right")
    for outcome, n in sorted(summary.outcomes.items()):
        table.add_row(outcome, str(n))
    console.print(table)
    # One plain line per rejected file: easy to read, to grep and to paste.
    for path, reason in summary.rejected[:_REASON_ROWS]:
        console.print(f"rejected {path}: {reason}", soft_wrap=True)
    if len(summary.rejected) > _REASON_ROWS:
        console.print(
            f"... and {len(summary.rejected) - _REASON_ROWS} more rejected "
            f"(python -m producer status --batch {summary.batch_id} lists counts; "
            "SELECT path, reason FROM videos WHERE state = 'rejected' lists them all)"
        )
    console.print(f"{summary.sent} videos sent to the describe queue")


def _follow(sessions, batch_id: int, poll_s: float = 1.0) -> None:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from db import store
    from db.session import session_scope
    from producer.status import format_eta, progress

    with session_scope(sessions) as session:
        p = progress(session=session, batch_id=batch_id)
    total = p.pending + p.finished
    columns = (
        "{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
    )
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task("describing", total=total, rate="")
        while True:
            with session_scope(sessions) as session:
                p = progress(session=session, batch_id=batch_id)
            rate = f"{p.per_minute:.1f}/min ETA {format_eta(p.eta_s)}" if p.per_minute else ""
            bar.update(task, completed=p.finished, rate=rate)
            if p.pending == 0:
                break
            time.sleep(poll_s)
    with session_scope(sessions) as session:
        failed = store.failed_in_batch(session=session, batch_id=batch_id)
    console.print(
        f"batch {batch_id} finished: {p.counts['done']} done, {p.counts['failed']} failed, "
        f"{p.counts['rejected']} rejected"
    )
    for path, reason in failed[:_REASON_ROWS]:
        console.print(f"failed {path}: {reason}", soft_wrap=True)
    if failed:
        sys.exit(1)


def _send_again(sessions, pick, *, settings, note: str, priority: int, dry_run: bool):
    """List the videos `pick(session)` chooses and, unless a dry run, put them back to
    `queued` in a new batch and send them. `pick` returns (videos, header, one line each).
    Returns (batch id, videos sent), or None when nothing was sent."""
    from db.session import session_scope
    from producer import enqueue as enq
    from producer.requeue import requeue_videos

    with session_scope(sessions) as session:
        videos, header, lines = pick(session)
        console.print(header)
        for line in lines[:_REASON_ROWS]:  # plain lines: easy to grep and to paste
            console.print(line, soft_wrap=True)
        if len(lines) > _REASON_ROWS:
            console.print(f"... and {len(lines) - _REASON_ROWS} more")
        if dry_run or not videos:
            console.print("0 videos sent (dry run)" if dry_run else "0 videos sent")
            return None
        batch_id = requeue_videos(
            session=session, videos=videos, note=note, priority=priority, frames=settings.frames
        )
    return batch_id, enq.send(videos, sessions=sessions, priority=priority, settings=settings)


@cli.command(help="Describe again the videos whose reports match --where (e.g. older prompt).")
@click.option(
    "--where",
    "where_text",
    required=True,
    help='FIELD OP VALUE [and ...] over report fields, e.g. "prompt_version < 2".',
)
@click.option("--dry-run", is_flag=True, help="List what matches; send nothing.")
@click.option("--priority", type=click.IntRange(0, 9), default=0, show_default=True)
@click.option("--wait", is_flag=True, help="Follow the batch until every video is finished.")
def requeue(where_text, dry_run, priority, wait) -> None:
    from db.models import Video
    from models.prompt import PROMPT_VERSION
    from producer.requeue import matching, parse_where

    settings = load_settings()
    where = parse_where(where_text)
    sessions = _sessions(settings)

    def pick(session):
        found = matching(
            session=session,
            where=where,
            model=settings.model,
            adapter=settings.adapter_name,
            prompt_version=PROMPT_VERSION,
        )
        lines = [f"match {m.path} (video {m.video_id}, prompt v{m.prompt_version})" for m in found]
        videos = [session.get(Video, m.video_id) for m in found]
        return videos, f"{len(found)} videos match: {where_text}", lines

    done = _send_again(
        sessions,
        pick,
        settings=settings,
        note=f"requeue where {where_text}",
        priority=priority,
        dry_run=dry_run,
    )
    if done is None:
        return
    batch_id, sent = done
    console.print(
        f"batch {batch_id}: {sent} videos sent to the describe queue (prompt v{PROMPT_VERSION})"
    )
    if wait:
        _follow(sessions, batch_id)


@cli.command(help="Send again the videos left 'running' too long (their worker died or hung).")
@click.option(
    "--after",
    type=click.IntRange(1),
    default=None,
    help="Seconds running before a video counts as stale [default: 2x TASK_TIME_LIMIT].",
)
@click.option("--dry-run", is_flag=True, help="List the stale videos; send nothing.")
def reap(after, dry_run) -> None:
    from datetime import timedelta

    from db import store
    from db.models import utcnow

    settings = load_settings()
    after = after or 2 * settings.task_time_limit
    sessions = _sessions(settings)

    def pick(session):
        older_than = utcnow() - timedelta(seconds=after)
        stale = store.stale_running(session=session, older_than=older_than)
        lines = [f"stale {v.path} (video {v.id}, worker {v.worker})" for v in stale]
        return stale, f"{len(stale)} videos running for more than {after} s", lines

    # The video's own message may still come back too: the worker then finds its report,
    # or the unique key keeps the second write out, so a video never gets two reports.
    done = _send_again(
        sessions,
        pick,
        settings=settings,
        note=f"reap: running more than {after} s",
        priority=0,
        dry_run=dry_run,
    )
    if done is not None:
        console.print(f"batch {done[0]}: {done[1]} videos sent to the describe queue")


@cli.command(help="Counts by state, videos/minute and ETA (all videos, or one batch).")
@click.option("--batch", "batch_id", type=int, default=None, help="Batch id (default: all).")
def status(batch_id: int | None) -> None:
    from db.session import session_scope
    from producer.status import format_eta, progress

    settings = load_settings()
    sessions = _sessions(settings)
    with session_scope(sessions) as session:
        p = progress(session=session, batch_id=batch_id)
    table = Table(title=f"batch {batch_id}" if batch_id else "all videos", header_style="bold")
    table.add_column("state")
    table.add_column("videos", justify="right")
    for state, n in p.counts.items():
        table.add_row(state.value, str(n))
    console.print(table)
    rate = f"{p.per_minute:.1f} videos/minute" if p.per_minute else "no videos finished lately"
    console.print(f"throughput: {rate}; pending: {p.pending}; ETA: {format_eta(p.eta_s)}")


@cli.command(help="Write a few short synthetic driving clips to DIR (to try fleetscribe).")
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--count", default=6, show_default=True, type=click.IntRange(1, 1000))
def clips(directory: str, count: int) -> None:
    from producer.clips import make_clips

    paths = make_clips(directory, count=count)
    console.print(f"{len(paths)} synthetic clips written to {directory}")


if __name__ == "__main__":
    run(cli, "python -m producer")
