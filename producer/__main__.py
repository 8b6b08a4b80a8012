"""python -m producer enqueue PATH... [--manifest F] [--frames K] [--sampling uniform|events]
    [--priority N] [--wait]
python -m producer requeue --where "prompt_version < 2" [--sampling uniform|events] [--dry-run]
    [--wait]
python -m producer reap [--after SECONDS] [--dry-run]
python -m producer status [--batch ID]
python -m producer failures [--batch ID] [--reason TEXT] [--format table|csv|json]"""

from __future__ import annotations

import sys
import time

import click
from rich.console import Console
from rich.table import Table

from config.cli import run
from config.settings import SAMPLING_MODES, load_settings

# Plain lines are never folded at the terminal's width: easy to grep and to paste.
console = Console(highlight=False, soft_wrap=True)
_REASON_ROWS = 50


_STALL_S = 30.0
_FEED_EVERY_S = 2.0  # --wait tops the broker's window up this often
_FAILURES_LIMIT = 1000  # videos `producer failures` lists unless told --limit
_stall_option = click.option(
    "--stall-after",
    "stall_s",
    type=click.FloatRange(0, min_open=True),
    default=_STALL_S,
    show_default=True,
    help="With --wait: say so when no video has started or finished for this many seconds.",
)


def _sessions(settings):
    """The store's sessions; a configured database must be at head (python -m db upgrade)."""
    from db.session import make_sessionmaker, open_store

    return make_sessionmaker(open_store(settings, wait_s=30))


@click.group(help="Find, probe, dedupe and enqueue driving videos; follow their progress.")
def cli() -> None:
    pass


@cli.command(help="Enqueue video files, directories (recursive), globs or a manifest.")
@click.argument("paths", nargs=-1)
@click.option("--manifest", type=click.Path(dir_okay=False), help="File with one path a line.")
@click.option("--frames", "-k", type=click.IntRange(1, 64), default=None, help="Frames per video.")
@click.option(
    "--sampling",
    type=click.Choice(SAMPLING_MODES),
    default=None,
    help="How frames are chosen: uniform, or events (uniform plus the moments that change "
    "most). Default FLEETSCRIBE_SAMPLING.",
)
@click.option("--priority", type=click.IntRange(0, 9), default=0, show_default=True)
@click.option("--wait", is_flag=True, help="Follow the batch until every video is finished.")
@click.option("--note", default="", help="Free text stored with the batch.")
@_stall_option
def enqueue(paths, manifest, frames, sampling, priority, wait, note, stall_s) -> None:
    from delivery import outbox
    from producer import enqueue as enq
    from producer.discover import any_input_exists, iter_inputs
    from producer.errors import MissingInputs, NoInputs

    if not paths and not manifest:
        raise click.UsageError("give at least one PATH or --manifest")
    settings = load_settings()
    frames = frames or settings.frames
    sampling = sampling or settings.sampling
    if not any_input_exists(list(paths), manifest=manifest):  # a slip, not a batch
        missing = list(iter_inputs(list(paths), manifest=manifest))
        if len(missing) == 1:
            raise MissingInputs(f"no such file: {missing[0]}")
        _print_missing(missing)
        raise MissingInputs(f"none of the {len(missing)} inputs exist; nothing enqueued")
    sessions = _sessions(settings)
    job = enq.Enqueue(
        sessions=sessions,
        settings=settings,
        frames=frames,
        sampling=sampling,
        priority=priority,
        note=note,
        key=enq.command_key(
            list(paths), manifest, frames=frames, priority=priority, sampling=sampling
        ),
        feed=lambda: outbox.feed(sessions=sessions, settings=settings),
    )
    with _EnqueueBar() as bar:
        job.on_progress = bar.show
        summary = job.run(iter_inputs(list(paths), manifest=manifest))
    if job.counts.found == 0:
        raise NoInputs("no video files found in the given paths")
    backlog = _backlog(sessions, summary.batch_id)
    _print_summary(summary, job.counts, backlog=backlog, missing=set(summary.missing))
    _print_missing(summary.missing)
    if wait:
        _follow(sessions, summary.batch_id, settings=settings, stall_s=stall_s, feed=job.feed)
    if summary.missing:
        sys.exit(1)  # a partial result: the existing inputs are enqueued, the rest listed


def _backlog(sessions, batch_id: int) -> int:
    from db import store
    from db.session import session_scope

    with session_scope(sessions) as session:
        return store.backlog_count(session=session, batch_id=batch_id)


class _EnqueueBar:
    """The enqueue's live line: files found, probed, queued and rejected, with rates, and
    messages sent; shown on a terminal only, refreshed a few times a second."""

    def __enter__(self):
        from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        self.progress = Progress(
            SpinnerColumn(),
            TextColumn("{task.description}"),
            TimeElapsedColumn(),
            console=console,
            transient=True,
            disable=not console.is_terminal,
        )
        self.progress.__enter__()
        self.task = self.progress.add_task("finding files", total=None)
        self._shown = 0.0
        return self

    def show(self, c) -> None:
        now = time.monotonic()
        if now - self._shown < 0.2:
            return
        self._shown = now
        self.progress.update(self.task, description=_counts_line(c))

    def __exit__(self, *exc) -> None:
        self.progress.__exit__(*exc)


def _counts_line(c) -> str:
    line = (
        f"found {c.found:,} ({c.rate(c.found):,.0f}/s), probed {c.probed:,} "
        f"({c.rate(c.probed):,.0f}/s), queued {c.queued:,}, rejected {c.rejected:,}, "
        f"sent {c.sent:,}"
    )
    if c.resumed:
        line += f", {c.resumed:,} recorded by an earlier run"
    return line


def _print_missing(missing: list[str]) -> None:
    # One line each on stderr, all of them: a typo in a manifest must not pass unseen.
    for path in missing:
        click.echo(f"error: no such file: {path}", err=True)


def _print_summary(
    summary, counts, *, backlog: int = 0, missing: frozenset[str] | set[str] = frozenset()
) -> None:
    inputs = sum(summary.outcomes.values())
    title = f"batch {summary.batch_id}: {inputs} inputs"
    if summary.resumed:
        title += f" (resumed: {summary.resumed} recorded before)"
    table = Table(title=title, header_style="bold")
    table.add_column("outcome")
    table.add_column("inputs", justify="right")
    for outcome, n in sorted(summary.outcomes.items()):
        table.add_row(outcome, str(n))
    console.print(table)
    # One plain line per rejected file: easy to read, to grep and to paste. Inputs that do
    # not exist are rejected too, and listed on stderr instead.
    rejected = [(path, why) for path, why in summary.rejected if path not in missing]
    for path, reason in rejected[:_REASON_ROWS]:
        console.print(f"rejected {path}: {reason}", soft_wrap=True)
    more = summary.rejected_count - len(missing) - min(len(rejected), _REASON_ROWS)
    if more > 0:
        console.print(
            f"... and {more} more rejected "
            f"(python -m producer failures --batch {summary.batch_id} lists them all)"
        )
    elapsed = time.monotonic() - counts.started
    first = f", the first after {counts.first_sent_s:.1f} s" if counts.first_sent_s else ""
    console.print(
        f"{counts.probed} files probed in {elapsed:.1f} s "
        f"({counts.rate(counts.probed):.0f} files/s); "
        f"{summary.sent} videos sent to the describe queue{first}"
    )
    if backlog:
        console.print(
            f"{backlog} wait in the backlog (SQL), sent as the broker's window drains "
            "(QUEUE_WINDOW): by this command while it waits, by every worker's sweep"
        )


def _follow(
    sessions,
    batch_id: int,
    *,
    settings,
    stall_s: float = _STALL_S,
    poll_s: float = 1.0,
    feed=None,
) -> None:
    """Show the batch's progress until every video is finished (exit 1 if some failed),
    keeping the broker's window full meanwhile (`feed`, every FEED_EVERY_S). When no video
    starts or finishes for `stall_s`, one line on stderr says so and why it may be (no
    worker consuming the queue); it keeps waiting, Ctrl-C stops it."""
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
    seen, changed = None, time.monotonic()
    notice_at = changed + stall_s
    fed_at, said_at = 0.0, -1e9
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task("describing", total=total, rate="")
        while True:
            if feed is not None and time.monotonic() - fed_at >= _FEED_EVERY_S:
                fed_at = time.monotonic()
                said_at = _feed_quietly(feed, said_at)
            with session_scope(sessions) as session:
                p = progress(session=session, batch_id=batch_id)
            rate = f"{p.per_minute:.1f}/min ETA {format_eta(p.eta_s)}" if p.per_minute else ""
            bar.update(task, completed=p.finished, rate=rate)
            if p.pending == 0:
                break
            now = time.monotonic()
            if tuple(p.counts.values()) != seen:  # a video started or finished
                seen, changed, notice_at = tuple(p.counts.values()), now, now + stall_s
            elif now >= notice_at:
                click.echo(_stalled(settings, batch_id, p, now - changed), err=True)
                notice_at = now + max(stall_s, now - changed)  # then less and less often
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


def _feed_quietly(feed, said_at: float) -> float:
    """Top the window up; a broker that refuses now is tried again at the next poll (the
    videos wait in the backlog meanwhile), said once a minute at most. Returns when it
    was last said."""
    from delivery.errors import BrokerUnavailable

    try:
        feed()
    except BrokerUnavailable as e:
        if time.monotonic() - said_at > 60:
            click.echo(f"note: {e}", err=True)
            return time.monotonic()
    return said_at


def _stalled(settings, batch_id: int, p, quiet_s: float) -> str:
    """The line `--wait` prints when nothing has moved for a while: what stands still, and
    what the describe queue holds (a queue nobody takes from means no worker consumes it)."""
    from broker.celery_app import DESCRIBE_QUEUE, queue_depths
    from db.models import VideoState

    queued, running = p.counts[VideoState.QUEUED], p.counts[VideoState.RUNNING]
    still = "; still waiting (Ctrl-C stops waiting, the videos stay queued)"
    if running:
        return (
            f"note: no video of batch {batch_id} finished in {quiet_s:.0f} s "
            f"({running} running, {queued} queued){still}"
        )
    depths = queue_depths(settings)
    waiting = depths.waiting(DESCRIBE_QUEUE)
    if waiting == 0:
        held = (
            f"and queue {DESCRIBE_QUEUE} holds no message for them: "
            "python -m producer reap sends lost messages again"
        )
    else:
        count = (
            "their messages wait"
            if waiting is None
            else _n(waiting, "message waits", "messages wait")
        )
        held = (
            f"and {count} in queue {DESCRIBE_QUEUE}: no worker seems to be consuming it "
            "(start one: python -m worker)"
        )
    return (
        f"note: no video of batch {batch_id} started or finished in {quiet_s:.0f} s: "
        f"{queued} queued, none running, {held}{still}"
    )


def _send_again(
    sessions, pick, *, settings, note: str, priority: int, sampling: str | None, dry_run: bool
):
    """List the videos `pick(session)` chooses and, unless a dry run, put them back to
    `queued` in a new batch (the backlog), to be described with `sampling` (None: each
    its own mode, else the setting), and top the broker's window up. `pick` returns
    (videos, header, a line each for the first of them, how many in all). Returns (batch
    id, videos sent), or None when nothing was put back."""
    from db.session import session_scope
    from delivery import outbox
    from producer.requeue import requeue_videos

    with session_scope(sessions) as session:
        videos, header, lines, count = pick(session)
        console.print(header)
        for line in lines[:_REASON_ROWS]:  # plain lines: easy to grep and to paste
            console.print(line, soft_wrap=True)
        if count > min(len(lines), _REASON_ROWS):
            console.print(f"... and {count - min(len(lines), _REASON_ROWS)} more")
        if dry_run or not videos:
            console.print("0 videos sent (dry run)" if dry_run else "0 videos sent")
            return None
        batch_id = requeue_videos(
            session=session,
            videos=videos,
            note=note,
            priority=priority,
            frames=settings.frames,
            sampling=sampling,
            default_sampling=settings.sampling,
        )
    return batch_id, outbox.feed(sessions=sessions, settings=settings)


def _load_videos(session, ids: list[int], *, chunk: int = 10_000) -> list:
    """The video rows of `ids`, in that order, a statement per `chunk` of them."""
    from sqlalchemy import select

    from db.models import Video

    rows = {}
    for start in range(0, len(ids), chunk):
        part = ids[start : start + chunk]
        rows.update((v.id, v) for v in session.scalars(select(Video).where(Video.id.in_(part))))
    return [rows[i] for i in ids]


@cli.command(help="Describe again the videos whose reports match --where (e.g. older prompt).")
@click.option(
    "--where",
    "where_text",
    required=True,
    help='FIELD OP VALUE [and ...] over report fields, e.g. "prompt_version < 2".',
)
@click.option(
    "--sampling",
    type=click.Choice(SAMPLING_MODES),
    default=None,
    help="Describe them with this sampling mode (default: each video's own, else "
    "FLEETSCRIBE_SAMPLING); a report under another mode stays beside the new one.",
)
@click.option("--dry-run", is_flag=True, help="List what matches; send nothing.")
@click.option("--priority", type=click.IntRange(0, 9), default=0, show_default=True)
@click.option("--wait", is_flag=True, help="Follow the batch until every video is finished.")
@_stall_option
def requeue(where_text, sampling, dry_run, priority, wait, stall_s) -> None:
    from models.prompt import PROMPT_VERSION
    from producer.requeue import describe_selection, parse_where, select_again

    settings = load_settings()
    where = parse_where(where_text)
    sessions = _sessions(settings)

    def pick(session):
        current = {
            "model": settings.model,
            "adapter": settings.adapter_name,
            "prompt_version": PROMPT_VERSION,
            "sampling": sampling,
        }
        # A dry run lists a page; a real one takes every match, its rows loaded in bulk.
        limit = _REASON_ROWS if dry_run else None
        chosen = select_again(
            session=session,
            where=where,
            limit=limit,
            default_sampling=settings.sampling,
            **current,
        )
        found = chosen.to_send
        lines = [f"match {m.path} (video {m.video_id}, prompt v{m.prompt_version})" for m in found]
        videos = [] if dry_run else _load_videos(session, [m.video_id for m in found])
        header = describe_selection(chosen, where_text=where_text, **current)
        return videos, header, lines, chosen.again

    done = _send_again(
        sessions,
        pick,
        settings=settings,
        note=f"requeue where {where_text}",
        priority=priority,
        sampling=sampling,
        dry_run=dry_run,
    )
    if done is None:
        return
    from delivery import outbox

    batch_id, sent = done
    mode = f", {sampling} sampling" if sampling else ""
    console.print(
        f"batch {batch_id}: {sent} videos sent to the describe queue "
        f"(prompt v{PROMPT_VERSION}{mode})"
    )
    backlog = _backlog(sessions, batch_id)
    if backlog:
        console.print(f"{backlog} wait in the backlog (SQL), sent as the broker's window drains")
    if wait:
        _follow(
            sessions,
            batch_id,
            settings=settings,
            stall_s=stall_s,
            feed=lambda: outbox.feed(sessions=sessions, settings=settings),
        )


@cli.command(help="Send again what was lost: a dead worker's videos, a dead producer's backlog.")
@click.option(
    "--after",
    type=click.IntRange(1),
    default=None,
    help="Also send videos running longer than this many seconds (a live but hung worker).",
)
@click.option("--dry-run", is_flag=True, help="List what would be sent; send nothing.")
def reap(after, dry_run) -> None:
    from delivery.outbox import restore_held, send_again

    settings = load_settings()
    sessions = _sessions(settings)
    # The videos' own messages may still come back too: the worker then finds the report,
    # or the unique key keeps a second write out, so a video never gets two reports.
    if not dry_run:  # first: a video whose own message is back needs no second one
        restored = restore_held(sessions=sessions, settings=settings)
        if restored:
            console.print(f"{restored} messages held by a dead worker put back on their queue")
    result = send_again(sessions=sessions, settings=settings, running_over_s=after, dry_run=dry_run)
    console.print(
        f"{result.backlog} queued, not sent (the backlog), "
        f"{result.count('orphaned')} running on a dead worker, "
        f"{result.count('vanished')} sent but gone from the broker"
        + (f", {result.count('stale')} running more than {after} s" if after else "")
    )
    for lost in result.found[:_REASON_ROWS]:  # plain lines: easy to grep and to paste
        where = f", worker {lost.worker}" if lost.worker else ""
        console.print(f"{lost.why} {lost.path} (video {lost.video_id}{where})", soft_wrap=True)
    if len(result.found) > _REASON_ROWS:
        console.print(f"... and {len(result.found) - _REASON_ROWS} more")
    sent = "0 videos sent (dry run)" if dry_run else f"{result.sent} videos sent"
    console.print(f"{sent} to the describe queue")


@cli.command(help="Counts by state, videos/minute and ETA; the broker's queues.")
@click.option("--batch", "batch_id", type=int, default=None, help="Batch id (default: all).")
def status(batch_id: int | None) -> None:
    from broker.celery_app import queue_depths
    from db import store
    from db.models import VideoState
    from db.session import session_scope
    from delivery.outbox import window_size
    from producer.status import check_batch, format_eta, progress

    settings = load_settings()
    sessions = _sessions(settings)
    with session_scope(sessions) as session:
        check_batch(session=session, batch_id=batch_id)
        p = progress(session=session, batch_id=batch_id)
    table = Table(title=f"batch {batch_id}" if batch_id else "all videos", header_style="bold")
    table.add_column("state")
    table.add_column("videos", justify="right")
    for state, n in p.counts.items():
        table.add_row(state.value, str(n))
    console.print(table)
    rate = f"{p.per_minute:.1f} videos/minute" if p.per_minute else "no videos finished lately"
    console.print(f"throughput: {rate}; pending: {p.pending}; ETA: {format_eta(p.eta_s)}")
    with session_scope(sessions) as session:
        backlog = store.backlog_count(session=session, batch_id=batch_id)
        size = window_size(session=session, settings=settings)
    queued = p.counts[VideoState.QUEUED]
    console.print(
        f"queued: {backlog} in the backlog (SQL, not sent), {queued - backlog} sent; "
        f"the broker's window holds at most {size} describe messages"
        + ("" if settings.queue_window else " (QUEUE_WINDOW=0: sized from the throughput)")
    )
    _print_queues(queue_depths(settings))


def _print_queues(depths) -> None:
    """One line per queue (all batches): messages waiting, by the broker's own key names."""
    if depths.unknown:
        console.print(f"queues: unknown ({depths.unknown})", soft_wrap=True)
        return
    for queue, parts in depths.queues.items():
        line = f"queue {queue}: {_n(depths.waiting(queue), 'message', 'messages')} waiting"
        if any(key != queue for key in parts):  # Redis: one list per priority
            line += " (" + ", ".join(f"{key} {n}" for key, n in parts.items()) + ")"
        console.print(line, soft_wrap=True)
    if depths.unacked is not None:
        taken = _n(depths.unacked, "message", "messages")
        console.print(f"taken by workers, not yet acknowledged: {taken}")


def _n(count: int, one: str, many: str) -> str:
    return f"{count} {one if count == 1 else many}"


@cli.command(help="Failed and rejected videos with their reasons: counts by reason, then each.")
@click.option("--batch", "batch_id", type=int, default=None, help="Batch id (default: all).")
@click.option("--reason", default=None, help="Only reasons containing this text (any case).")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["table", "csv", "json"]),
    default="table",
    show_default=True,
    help="csv: the videos only; json: {reasons: [...], videos: [...]}.",
)
@click.option(
    "--limit",
    type=click.IntRange(0),
    default=None,
    help=f"List at most this many videos (0: all; default {_FAILURES_LIMIT} in the table, "
    "all in csv and json); the counts are always whole.",
)
def failures(batch_id: int | None, reason: str | None, fmt: str, limit: int) -> None:
    import json

    from db.failures import failed_videos, failure_counts, failure_states
    from db.query import QueryResult, to_csv, to_records, to_table
    from db.session import session_scope
    from producer.status import check_batch

    settings = load_settings()
    sessions = _sessions(settings)
    with session_scope(sessions) as session:
        check_batch(session=session, batch_id=batch_id)
        counts = failure_counts(session=session, batch_id=batch_id, reason=reason)
        states = failure_states(session=session, batch_id=batch_id, reason=reason)
        if limit is None:
            limit = _FAILURES_LIMIT if fmt == "table" else 0
        videos = failed_videos(
            session=session, batch_id=batch_id, reason=reason, limit=limit or None
        )
    by_reason = QueryResult(["reason", "videos"], counts)
    listing = QueryResult(
        ["video_id", "state", "path", "reason", "attempts", "finished_at"],
        [(v.video_id, v.state, v.path, v.reason, v.attempts, v.finished_at) for v in videos],
    )
    if fmt == "json":
        document = {"reasons": to_records(by_reason), "videos": to_records(listing)}
        click.echo(json.dumps(document, indent=2, ensure_ascii=False, default=str))
        return
    if fmt == "csv":
        click.echo(to_csv(listing), nl=False)
        return
    # Piped output gets a wide page instead of rich's 80 columns, so cells don't fold.
    page = Console(highlight=False, soft_wrap=False, width=None if sys.stdout.isatty() else 400)
    scope = f"batch {batch_id}" if batch_id is not None else "all batches"
    if not videos:
        page.print(f"no failed or rejected videos ({scope}{_matching(reason)})")
        return
    page.print(to_table(by_reason))
    page.print(to_table(listing))
    more = sum(states.values()) - len(videos)
    if more > 0:
        page.print(f"... and {more} more (--limit 0 lists them all)")
    page.print(
        f"{states['failed']} failed, {states['rejected']} rejected ({scope}{_matching(reason)})"
    )


def _matching(reason: str | None) -> str:
    return f", reason containing {reason!r}" if reason else ""


@cli.command(help="Write a few short synthetic driving clips to DIR (to try fleetscribe).")
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--count", default=6, show_default=True, type=click.IntRange(1, 1000))
def clips(directory: str, count: int) -> None:
    from producer.clips import make_clips

    paths = make_clips(directory, count=count)
    console.print(f"{len(paths)} synthetic clips written to {directory}")


if __name__ == "__main__":
    run(cli, "python -m producer")
