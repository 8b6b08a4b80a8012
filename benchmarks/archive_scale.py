"""Enqueue at archive scale: today's batch-at-once producer against the streaming one, side
by side in one run, on generated archives of growing size; then the store's CLI queries at
a million rows (benchmarks/store_scale.py).

    python benchmarks/archive_scale.py [--sizes 1000,10000,100000] [--baseline f8d204a]
        [--store-rows 1000000] [--out benchmarks/results/archive_scale_cpu]

CPU only; Redis at --redis (a database of its own, flushed), PostgreSQL at --pg (a
database archive_bench is made and dropped). The baseline is the producer as it was at
commit --baseline (a git worktree of it: probe and hash everything, record all in one
transaction, then send every message), run with the same virtualenv. Each archive is
`producer.clips.distinct_clips`: small real MP4s, each with bytes of its own (so every
file is a video of its own and a message), a thousand to a folder.

For every size and producer, `python -m producer enqueue ARCHIVE` runs as a subprocess
while this script samples, every 20 ms: the describe lists' length in Redis (the first
message's time) and the producer's peak resident memory (VmHWM). After it exits: the
broker's memory for the describe queue (MEMORY USAGE of each list) and for the whole
server (used_memory, against before). Files/s is files over the command's wall time.

Then, to say what limits files/s, one process measures on the 1,000-file archive what each
step costs per file alone: sha256 and the fast key of the file, the PyAV probe, the round
trip through the killable probing pool, recording a row, sending a message.

Writes OUT.json, OUT.txt (the printed tables) and OUT.log.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.machine import cpu_name  # noqa: E402

PY = sys.executable
LOG: list[str] = []


def say(line: str = "") -> None:
    print(line, flush=True)
    LOG.append(line)


def archive(root: Path, count: int) -> Path:
    """The archive of `count` files, made once and kept between runs."""
    from producer.clips import distinct_clips

    folder = root / f"archive_{count}"
    marker = folder / ".complete"
    if not marker.exists():
        say(f"writing archive of {count} files to {folder}")
        distinct_clips(folder, count, per_folder=1000)
        marker.write_text(str(count))
    return folder


def baseline_tree(commit: str, where: Path) -> Path:
    """A git worktree of the producer as it was at `commit`."""
    if not (where / "producer").is_dir():
        subprocess.run(
            ["git", "-C", str(ROOT), "worktree", "add", "--detach", str(where), commit],
            check=True,
            capture_output=True,
        )
    return where


def fresh_database(pg: str) -> str:
    import psycopg

    with psycopg.connect(pg, autocommit=True) as conn:
        conn.execute("DROP DATABASE IF EXISTS archive_bench WITH (FORCE)")
        conn.execute("CREATE DATABASE archive_bench")
    return pg.rsplit("/", 1)[0] + "/archive_bench"


def describe_bytes(client) -> tuple[int, int]:
    """(messages, bytes) the describe lists hold, by Redis's MEMORY USAGE."""
    messages = size = 0
    for key in client.scan_iter("describe*"):
        if client.type(key) == b"list":
            messages += client.llen(key)
            size += client.memory_usage(key, samples=0) or 0
    return messages, size


def peak_rss(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def run_producer(tree: Path, folder: Path, *, env: dict, redis_url: str) -> dict:
    import redis

    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    used_before = client.info("memory")["used_memory"]
    upgrade = subprocess.run(
        [PY, "-m", "db", "upgrade"], cwd=tree, env=env, capture_output=True, text=True
    )
    assert upgrade.returncode == 0, upgrade.stderr
    started = time.monotonic()
    proc = subprocess.Popen(
        [PY, "-m", "producer", "enqueue", str(folder)],
        cwd=tree,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    first = None
    rss = 0
    while proc.poll() is None:
        rss = max(rss, peak_rss(proc.pid) or 0)
        if first is None and sum(
            client.llen(k) for k in client.scan_iter("describe*") if client.type(k) == b"list"
        ):
            first = time.monotonic() - started
        time.sleep(0.02)
    wall = time.monotonic() - started
    out, err = proc.communicate()
    assert proc.returncode == 0, err[-2000:]
    messages, size = describe_bytes(client)
    used_after = client.info("memory")["used_memory"]
    client.close()
    files = sum(1 for _ in folder.rglob("*.mp4"))
    return {
        "files": files,
        "wall_s": round(wall, 2),
        "files_per_s": round(files / wall, 1),
        "first_message_s": round(first, 2) if first is not None else None,
        "peak_rss_mib": round(rss / 2**20, 1),
        "broker_messages": messages,
        "broker_describe_bytes": size,
        "broker_used_delta_bytes": used_after - used_before,
        "stdout_tail": out.strip().splitlines()[-3:],
    }


def per_file_costs(folder: Path, pg_url: str, redis_url: str, count: int = 1000) -> dict:
    """What each step costs per file, measured alone in this process."""
    from concurrent.futures import ThreadPoolExecutor

    from config.settings import Settings
    from db import store
    from db.migrate import upgrade
    from db.session import make_engine, make_sessionmaker, session_scope
    from delivery import outbox
    from producer import enqueue as enq
    from producer.fingerprint import fast_key, sha256_file
    from video.media import probe

    paths = sorted(str(p) for p in folder.rglob("*.mp4"))[:count]
    costs = {}

    def timed(name, fn):
        began = time.perf_counter()
        fn()
        costs[name] = round((time.perf_counter() - began) / len(paths) * 1000, 3)

    timed("sha256_ms", lambda: [sha256_file(p) for p in paths])
    timed("fast_key_ms", lambda: [fast_key(p) for p in paths])
    timed("probe_ms", lambda: [probe(p) for p in paths])
    settings = Settings(database_url=pg_url, broker_url=redis_url, home=Path("/tmp/ab-home"))
    pool = enq.probe_pool(settings)
    try:
        pool.run(len, "warm")
        timed("pool_round_trip_ms", lambda: [pool.run(len, p) for p in paths])
        with ThreadPoolExecutor(pool.processes) as threads:
            timed(
                "inspect_all_cores_ms",
                lambda: list(threads.map(lambda p: pool.run(enq.inspect_file, p, settings), paths)),
            )
    finally:
        pool.close()
    items = [enq.inspect_file(p, settings) for p in paths]
    url = fresh_database(pg_url.rsplit("/", 1)[0] + "/postgres")
    engine = make_engine(url)
    upgrade(engine)
    sessions = make_sessionmaker(engine)
    batch_sizes = enq.CHUNK

    def record_all():
        with session_scope(sessions) as session:
            batch, _ = store.open_batch(session=session, key=None, frames=8, priority=0, note="")
        for start in range(0, len(items), batch_sizes):
            enq.record_chunk(
                items[start : start + batch_sizes],
                sessions=sessions,
                batch_id=batch.id,
                frames=8,
                priority=0,
            )

    timed("record_ms", record_all)
    settings = Settings(
        database_url=url, broker_url=redis_url, home=Path("/tmp/ab-home"), queue_window=count
    )
    timed("send_ms", lambda: outbox.feed(sessions=sessions, settings=settings))
    engine.dispose()
    costs["cores"] = os.cpu_count()
    return costs


def table(rows: list[dict]) -> list[str]:
    head = (
        f"{'files':>7} {'producer':<10} {'wall s':>8} {'files/s':>8} {'first msg s':>11} "
        f"{'peak RSS MiB':>12} {'broker msgs':>11} {'broker MiB':>10} {'x files/s':>9}"
    )
    lines = [head, "-" * len(head)]
    by_size: dict[int, dict[str, dict]] = {}
    for row in rows:
        by_size.setdefault(row["files"], {})[row["producer"]] = row
    for files, pair in sorted(by_size.items()):
        base = pair.get("baseline")
        for name in ("baseline", "streaming"):
            r = pair.get(name)
            if r is None:
                continue
            ratio = r["files_per_s"] / base["files_per_s"] if base and name != "baseline" else None
            first = f"{r['first_message_s']:.2f}" if r["first_message_s"] is not None else "-"
            lines.append(
                f"{files:>7} {name:<10} {r['wall_s']:>8.1f} {r['files_per_s']:>8.1f} "
                f"{first:>11} {r['peak_rss_mib']:>12.1f} {r['broker_messages']:>11} "
                f"{r['broker_describe_bytes'] / 2**20:>10.2f} "
                f"{f'{ratio:.2f}x' if ratio else '':>9}"
            )
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1000,10000,100000")
    parser.add_argument("--baseline", default="f8d204a", help="commit of the batch producer")
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/15")
    parser.add_argument("--pg", default="postgresql://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--scratch", default="/tmp/archive_bench")
    parser.add_argument("--store-rows", type=int, default=1_000_000, help="0: skip the store")
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/archive_scale_cpu"))
    args = parser.parse_args()

    scratch = Path(args.scratch)
    scratch.mkdir(parents=True, exist_ok=True)
    trees = {
        "baseline": baseline_tree(args.baseline, scratch / "baseline_tree"),
        "streaming": ROOT,
    }
    say(f"archive_scale on {cpu_name()}, {os.cpu_count()} cores, {platform.python_version()}")
    say(f"baseline: commit {args.baseline}; streaming: the working tree")
    rows = []
    for count in [int(s) for s in args.sizes.split(",")]:
        folder = archive(scratch, count)
        for name, tree in trees.items():
            url = fresh_database(args.pg)
            env = {k: v for k, v in os.environ.items() if not k.startswith("FLEETSCRIBE_")}
            env.update(
                FLEETSCRIBE_BROKER_URL=args.redis,
                FLEETSCRIBE_DATABASE_URL=url,
                FLEETSCRIBE_HOME=str(scratch / "home"),
                PYTHONPATH=str(tree),
            )
            say(f"{count} files, {name} producer ...")
            row = {"producer": name, **run_producer(tree, folder, env=env, redis_url=args.redis)}
            say(json.dumps(row))
            rows.append(row)
    say()
    lines = table(rows)
    for line in lines:
        say(line)
    costs = per_file_costs(archive(scratch, 1000), args.pg, args.redis)
    say()
    say("per file, each step alone (ms): " + json.dumps(costs))
    store = None
    if args.store_rows:
        say()
        say(f"store at {args.store_rows} rows: benchmarks/store_scale.py")
        out = Path(args.out).with_name(Path(args.out).name + "_store")
        done = subprocess.run(
            [PY, str(ROOT / "benchmarks/store_scale.py"), "--rows", str(args.store_rows),
             "--out", str(out)],
            capture_output=True,
            text=True,
        )  # fmt: skip
        for line in done.stdout.splitlines():
            say(line)
        if done.returncode == 0 and out.with_suffix(".json").exists():
            store = json.loads(out.with_suffix(".json").read_text())
        else:
            say(f"store_scale failed: {done.stderr[-2000:]}")
    document = {
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "baseline_commit": args.baseline,
        "rows": rows,
        "per_file_ms": costs,
        "store": store,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(document, indent=2) + "\n")
    text = "\n".join(lines) + "\n\nper file (ms): " + json.dumps(costs) + "\n"
    out.with_suffix(".txt").write_text(text)
    out.with_suffix(".log").write_text("\n".join(LOG) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
