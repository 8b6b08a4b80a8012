"""The store at a million videos: the CLI's and the workers' queries, timed on SQLite and
PostgreSQL, each with its query plan, before and after the query indexes (0006).

    python benchmarks/store_scale.py [--rows 1000000] [--backends sqlite,postgresql]
        [--phases 0005,head,head-nostats] [--no-cli] [--out benchmarks/results/store_scale_cpu]

CPU only; PostgreSQL at --pg (trust auth: a database scale_bench_* is made and dropped),
SQLite under /tmp (deleted after). For each backend a fresh store is built at the first
phase's revision and filled fast (executemany; COPY on PostgreSQL, foreign-key triggers
off: the rows are consistent by construction): --rows videos (done 92%, failed 2% over 20
reasons, rejected 1%, queued 5% of which 80% not sent (the backlog), running 0.1% on a few
workers, some of them dead), 200 batches, one submission per video, one report per done
video (3% of the prompt-v1 ones also have a current v2 report) with about 1.5 hazards
each, and 10 workers. Then ANALYZE (VACUUM ANALYZE on PostgreSQL), and for each phase
(`0005`: the schema before the query indexes, as the baseline; `head`; on SQLite also
`head-nostats`: sqlite_stat1 dropped, as a store nobody ran ANALYZE on plans):
- every query through the real functions of db/ and producer/, median of --runs after one
  warm-up (a call slower than --slow-s is run once more only), each in its own session,
  rolled back; the rewritten functions also as they were at BASE (`@BASE` rows), and
  other forms of two db/store.py queries (`, proposed`; `, one query per state`), each
  checked to answer as the code it would replace does;
- the plan of each statement a function ran (EXPLAIN / EXPLAIN QUERY PLAN), and the big
  tables it reads whole (a `Seq Scan`, SQLite's `SCAN table`);
- the real CLI end to end, as subprocesses with FLEETSCRIBE_DATABASE_URL set (filesystem
  broker in a scratch FLEETSCRIBE_HOME), beside `python -m producer --help` (start-up);
  at 0005 the store says head while they run (the CLI refuses an older revision, and
  0006 only adds indexes).
Writes OUT.json, OUT.txt (the tables, then every plan) and OUT.log.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import inspect
import io
import json
import os
import platform
import random
import re
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sqlalchemy import bindparam, event, select, text, update  # noqa: E402

from benchmarks.machine import cpu_name  # noqa: E402
from db.models import Video, utcnow  # noqa: E402

# The code before this benchmark's rewrites, timed beside today's (`@BASE` rows).
BASE = "f8d204a"
BIG_TABLES = ("videos", "submissions", "reports", "hazards")
BATCHES = 200
WORKERS = [f"gpu-{n:02d}:{4000 + n}" for n in range(10)]
ALIVE, LAPSED, STOPPED = WORKERS[:6], WORKERS[6:8], WORKERS[8:]
FAIL_REASONS = [
    "decode error: invalid NAL unit size at frame 412",
    "decode error: moov atom not found",
    "time limit: describing took more than 600 s",
    "time limit: sampling frames took more than 120 s",
    "internal error: CUDA out of memory while describing (batch of 8)",
    "internal error: worker shut down before the task finished",
    "no frames: the stream has no decodable frame",
    "no frames: every sampled timestamp lies past the end of the stream",
    "corrupt file: truncated at 48% of its declared length",
    "corrupt file: checksum mismatch after copy",
    "unsupported codec: av1 (no decoder in this build)",
    "unsupported codec: prores",
    "decoder crashed: SIGSEGV in libavcodec (isolated)",
    "decompression bomb: 7680x4320 frames, over the 33 megapixel bound",
    "file changed while reading: size differs from the enqueued size",
    "file vanished before it was described",
    "permission denied: the worker cannot read the file",
    "rotation metadata unreadable",
    "audio-only stream: no video track",
    "invalid report after 3 attempts: schema v1: hazards.0.frame out of range",
]
REJECT_REASONS = [
    "not a video: no video stream (ffprobe found only data streams)",
    "too large: 71.2 GB over the 64 GB limit",
    "unreadable: permission denied",
    "empty file",
    "probe timed out after 60 s",
    "not a video: a JPEG image",
]
MODELS = ["Qwen/Qwen3-VL-4B-Instruct", "Qwen/Qwen3-VL-8B-Instruct"]
RISK = (["low", "medium", "high", "critical"], [45, 35, 15, 5])
ROADS = ["highway", "urban", "residential", "rural", "intersection", "parking", "other"]
WEATHER = ["clear", "cloudy", "rain", "snow", "fog", "unknown"]
WORDS = " ".join(
    [
        "the ego vehicle drives along a wet two-lane road with parked cars on the right",
        "a cyclist waits at the crossing while a delivery van double-parks ahead traffic",
        "lights turn amber low sun glare reduces visibility pedestrians gather near the bus",
        "stop construction cones narrow the lane and a truck merges from the left shoulder",
    ]
).split(" ")

_log_file = None


def log(message: str) -> None:
    line = f"{time.strftime('%H:%M:%S')} {message}"
    print(line, flush=True)
    if _log_file is not None:
        _log_file.write(line + "\n")
        _log_file.flush()


# --- synthetic rows -----------------------------------------------------------------------


def _sentence(rng: random.Random, chars: int) -> str:
    words = []
    while sum(len(w) + 1 for w in words) < chars:
        words.append(rng.choice(WORDS))
    return " ".join(words).capitalize() + "."


def _report_variants(rng: random.Random, n: int = 512) -> list[tuple]:
    """(json text, flat fields, hazards) of `n` plausible schema-v1 reports (~1.2 KB)."""
    out = []
    for _ in range(n):
        params = {
            "road_type": rng.choice(ROADS),
            "lane_count": rng.randint(1, 4),
            "ego_lane_position": rng.choice(["left", "middle", "right", "single"]),
            "traffic_light_state": rng.choice(["red", "yellow", "green", "none"]),
            "pedestrian_on_road": rng.random() < 0.15,
            "closest_vehicle_distance": rng.choice(["near", "medium", "far", "none"]),
            "ego_vehicle_speed": rng.choice(["stopped", "slow", "moderate", "fast"]),
            "road_curvature": rng.choice(["straight", "gentle", "sharp"]),
            "weather": rng.choice(WEATHER),
            "visibility": rng.choice(["good", "moderate", "poor"]),
            "time_of_day": rng.choice(["day", "dawn_dusk", "night"]),
            "traffic_density": rng.choice(["none", "light", "moderate", "heavy"]),
            "risk_factor": rng.choices(*RISK)[0],
        }
        hazards = [
            {
                "kind": rng.choice(["pedestrian", "vehicle", "cyclist", "obstacle", "road"]),
                "description": _sentence(rng, rng.randint(40, 120)),
                "frame": rng.randrange(8),
            }
            for _ in range(rng.choice([0, 1, 1, 2, 2, 3]))
        ]
        report = {
            "schema_version": 1,
            "scene_description": _sentence(rng, rng.randint(300, 700)),
            "driving_parameters": params,
            "hazards": hazards,
            "risk_assessment": _sentence(rng, rng.randint(120, 300)),
        }
        flat = tuple(
            params[k]
            for k in (
                "risk_factor",
                "road_type",
                "weather",
                "visibility",
                "time_of_day",
                "traffic_density",
                "pedestrian_on_road",
            )
        )
        out.append((json.dumps(report), flat, hazards))
    return out


COLUMNS = {
    "batches": "id created_at frames priority inputs note key completed_at",
    "workers": "name started_at heartbeat_at stopped_at",
    "videos": "id path sha256 bytes fast_key dedupe duration codec container width height "
    "fps rotation state reason attempts frames priority batch_id worker created_at "
    "updated_at started_at finished_at published_at",
    "submissions": "id batch_id path video_id outcome created_at",
    "reports": "id video_id model adapter prompt_version schema_version valid error raw_text "
    "report risk_factor road_type weather visibility time_of_day traffic_density "
    "pedestrian_on_road frame_timestamps tokens_in tokens_out latency_s worker_host created_at",
    "hazards": "id report_id video_id kind description frame timestamp_s",
}


@dataclass
class Samples:
    """Real keys drawn while generating, for the lookups."""

    sha256: list[str] = field(default_factory=list)
    fast_key: list[str] = field(default_factory=list)
    sizes: list[int] = field(default_factory=list)
    paths: dict[int, list[str]] = field(default_factory=dict)  # batch -> paths
    ids: list[int] = field(default_factory=list)  # running, queued, done
    finished: deque = field(default_factory=lambda: deque(maxlen=300))  # the newest finishes
    counts: dict[str, int] = field(default_factory=dict)


class Synthetic:
    """The rows of a store of `n` videos, generated chunk by chunk (same seed, same rows)."""

    def __init__(self, n: int, *, now: datetime, ts: Callable, seed: int = 16):
        self.n, self.now, self.ts = n, now, ts
        self.rng = random.Random(seed)
        self.variants = _report_variants(self.rng)
        self.span = timedelta(days=60)
        self.tail = max(1, int(n * 0.051))  # the newest ids: queued and running
        self.running = max(1, int(n * 0.001))
        self.priority = {b: (0 if self.rng.random() < 0.7 else self.rng.randint(1, 9))
                         for b in range(1, BATCHES + 1)}  # fmt: skip
        self.samples = Samples()
        self.report_id = self.hazard_id = 0

    def batch_of(self, i: int) -> int:
        return (i - 1) * BATCHES // self.n + 1

    def _when(self, i: int) -> datetime:
        """When video `i` would have finished: the archive is described in id order."""
        return self.now - self.span * ((self.n - i) / self.n)

    def batches(self) -> list[tuple]:
        rows = []
        for b in range(1, BATCHES + 1):
            first = (b - 1) * self.n // BATCHES + 1
            created = self._when(first) - timedelta(hours=1)
            inputs = b * self.n // BATCHES - first + 1
            done = None if b == BATCHES else self.ts(created + timedelta(minutes=20))
            key = hashlib.sha256(b"batch %d" % b).hexdigest()
            rows.append((b, self.ts(created), 8, self.priority[b], inputs, "", key, done))
        return rows

    def workers(self) -> list[tuple]:
        now = self.now
        rows = [(w, self.ts(now - timedelta(days=3)), self.ts(now), None) for w in ALIVE]
        rows += [(w, self.ts(now - timedelta(days=3)), self.ts(now - timedelta(minutes=20)), None)
                 for w in LAPSED]  # fmt: skip
        rows += [(w, self.ts(now - timedelta(days=9)), self.ts(now - timedelta(days=2)),
                  self.ts(now - timedelta(days=2))) for w in STOPPED]  # fmt: skip
        return rows

    def chunk(self, start: int, stop: int) -> dict[str, list[tuple]]:
        """Videos start..stop-1 with their submissions, reports and hazards."""
        rng, ts = self.rng, self.ts
        out = {"videos": [], "submissions": [], "reports": [], "hazards": []}
        counts = self.samples.counts
        for i in range(start, stop):
            b = self.batch_of(i)
            first = (b - 1) * self.n // BATCHES + 1
            created = self._when(first) - timedelta(hours=1) + timedelta(milliseconds=i - first)
            tail_pos = i - (self.n - self.tail) - 1
            r = rng.random()
            if r < 0.01:
                state = "rejected"
            elif r < 0.03:
                state = "failed"
            elif tail_pos >= 0:
                state = "running" if tail_pos < self.running else "queued"
            else:
                state = "done"
            counts[state] = counts.get(state, 0) + 1
            unreadable = state == "rejected" and r < 0.003
            size = None if unreadable else rng.randint(20 * 2**20, 2 * 2**30)
            sha = None if unreadable else f"{rng.getrandbits(256):064x}"
            fast = None if unreadable else f"{size:x}-{rng.getrandbits(128):032x}"
            path = f"/archive/fleet/site{i % 7}/cam{i % 40:02d}/drive_{i:08d}.mp4"
            reason = worker = started = finished = published = None
            attempts = 0
            if state in ("done", "failed"):
                finished = self._when(i) + timedelta(seconds=rng.uniform(-30, 0))
                started = finished - timedelta(seconds=rng.uniform(2, 40))
                published = created + timedelta(seconds=rng.uniform(1, 60))
                worker = rng.choice(WORKERS)
                attempts = 1 if state == "done" else rng.randint(1, 3)
                if state == "failed":  # a few reasons are most of them
                    reason = FAIL_REASONS[min(int(rng.expovariate(0.25)), len(FAIL_REASONS) - 1)]
            elif state == "rejected":
                reason = rng.choice(REJECT_REASONS)
            elif state == "running":
                worker = rng.choice(ALIVE) if rng.random() < 0.9 else rng.choice(LAPSED + STOPPED)
                age = rng.uniform(7200, 10800) if rng.random() < 0.01 else rng.uniform(0, 600)
                started = self.now - timedelta(seconds=age)
                published = started - timedelta(seconds=rng.uniform(1, 300))
                attempts = 1
            elif tail_pos - self.running < 0.2 * (self.tail - self.running):  # the window
                published = self.now - timedelta(seconds=rng.uniform(1, 600))
                if rng.random() < 0.05:  # taken by a worker, not started yet
                    worker = rng.choice(ALIVE) if rng.random() < 0.7 else rng.choice(LAPSED)
            updated = finished or started or published or created
            out["videos"].append((
                i, path, sha, size, fast, None if unreadable else "sha256",
                None if unreadable else rng.uniform(30, 600),
                None if unreadable else rng.choice(["h264", "h264", "hevc"]),
                None if unreadable else "mov,mp4,m4a,3gp,3g2,mj2",
                None if unreadable else 1920, None if unreadable else 1080,
                None if unreadable else 30.0, None if unreadable else 0,
                state, reason, attempts, 8, self.priority[b], b, worker, ts(created),
                ts(updated), started and ts(started), finished and ts(finished),
                published and ts(published),
            ))  # fmt: skip
            outcome = "rejected" if state == "rejected" else "queued"
            out["submissions"].append((i, b, path, i, outcome, ts(created)))
            if i % 997 == 0 and sha is not None:
                self.samples.sha256.append(sha)
                self.samples.fast_key.append(fast)
                self.samples.sizes.append(size)
            if b in (BATCHES // 2, BATCHES):
                self.samples.paths.setdefault(b, []).append(path)
            if (state in ("running", "queued") or i % 4001 == 0) and len(self.samples.ids) < 4096:
                self.samples.ids.append(i)
            if state in ("done", "failed"):
                self.samples.finished.append(i)
            if state == "done":
                version = 1 if i < 0.6 * self.n else 2
                model = MODELS[0] if rng.random() < 0.9 else MODELS[1]
                adapter = "" if version == 1 or rng.random() < 0.85 else "fleet-lora-3"
                self._report(out, i, finished, model, adapter, version)
                if version == 1 and rng.random() < 0.03:  # described again already
                    self._report(out, i, finished, MODELS[0], "", 2)
        return out

    def _report(self, out, video_id, finished, model, adapter, version) -> None:
        rng = self.rng
        self.report_id += 1
        rid = self.report_id
        start = rng.uniform(0, 30)
        stamps = [round(start + 3.75 * k, 2) for k in range(8)]
        worker = rng.choice(WORKERS).split(":")[0]
        common = (json.dumps(stamps), rng.randint(2800, 3400), rng.randint(300, 520),
                  rng.uniform(0.2, 2.5), worker, self.ts(finished))  # fmt: skip
        if rng.random() < 0.02:  # the model's text was no valid report
            raw = _sentence(rng, 400)
            out["reports"].append((rid, video_id, model, adapter, version, 1, False,
                                   "not JSON: Expecting value: line 1 column 1 (char 0)", raw,
                                   None, *([None] * 7), *common))  # fmt: skip
            return
        body, flat, hazards = rng.choice(self.variants)
        out["reports"].append(
            (rid, video_id, model, adapter, version, 1, True, None, body, body, *flat, *common)
        )
        for h in hazards:
            self.hazard_id += 1
            out["hazards"].append((self.hazard_id, rid, video_id, h["kind"], h["description"],
                                   h["frame"], stamps[h["frame"]]))  # fmt: skip


# --- backends -----------------------------------------------------------------------------


class Backend:
    """One fresh store: made, filled, timed, removed."""

    name: str
    url: str

    def ts(self, when: datetime):
        return when

    def create(self) -> None: ...

    def drop(self) -> None: ...

    def write(self, table: str, rows: list[tuple]) -> None: ...

    def finish_load(self) -> None: ...

    def analyze(self) -> None: ...

    def explain(self, connection, statement: str, parameters) -> list[str]: ...

    def version(self) -> str: ...


class SQLite(Backend):
    name = "sqlite"

    def __init__(self, folder: Path):
        self.path = folder / f"scale_bench_{os.getpid()}.db"
        self.url = f"sqlite:///{self.path}"

    def ts(self, when: datetime):
        # SQLAlchemy's SQLite DATETIME storage format (the wall clock, UTC here)
        return when.strftime("%Y-%m-%d %H:%M:%S.%f")

    def create(self) -> None:
        self.drop()

    def drop(self) -> None:
        for suffix in ("", "-wal", "-shm", "-journal"):
            Path(f"{self.path}{suffix}").unlink(missing_ok=True)

    def _raw(self) -> sqlite3.Connection:
        if getattr(self, "_conn", None) is None:
            self._conn = sqlite3.connect(self.path, isolation_level=None)
            for pragma in ("foreign_keys=OFF", "synchronous=OFF", "cache_size=-1048576"):
                self._conn.execute(f"PRAGMA {pragma}")
        return self._conn

    def write(self, table: str, rows: list[tuple]) -> None:
        columns = COLUMNS[table].split()
        conn = self._raw()
        conn.execute("BEGIN")
        conn.executemany(
            f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})",
            rows,
        )
        conn.execute("COMMIT")

    def finish_load(self) -> None:
        self._raw().execute("PRAGMA wal_checkpoint(TRUNCATE)")
        self._conn.close()
        self._conn = None

    def analyze(self) -> None:
        conn = sqlite3.connect(self.path, isolation_level=None)
        conn.execute("ANALYZE")
        conn.close()

    def drop_stats(self) -> None:
        conn = sqlite3.connect(self.path, isolation_level=None)
        conn.execute("DROP TABLE IF EXISTS sqlite_stat1")
        conn.execute("DROP TABLE IF EXISTS sqlite_stat4")
        conn.close()

    def explain(self, connection, statement, parameters) -> list[str]:
        rows = connection.exec_driver_sql("EXPLAIN QUERY PLAN " + statement, parameters).all()
        depth = {0: -1}
        lines = []
        for node, parent, _, detail in rows:
            depth[node] = depth.get(parent, -1) + 1
            lines.append("  " * depth[node] + detail)
        return lines

    def version(self) -> str:
        return sqlite3.sqlite_version

    def size(self) -> str:
        return f"{self.path.stat().st_size / 2**30:.2f} GiB"


class PostgreSQL(Backend):
    name = "postgresql"

    def __init__(self, admin_url: str):
        self.admin = admin_url
        self.database = f"scale_bench_{os.getpid()}"
        self.url = f"{admin_url.rsplit('/', 1)[0]}/{self.database}"
        self._conn = None

    def _admin(self, sql: str):
        import psycopg

        with psycopg.connect(self.admin, autocommit=True) as conn:
            cur = conn.execute(sql)
            return cur.fetchall() if cur.description else None

    def create(self) -> None:
        self.drop()
        self._admin(f'CREATE DATABASE "{self.database}"')

    def drop(self) -> None:
        self._admin(f'DROP DATABASE IF EXISTS "{self.database}" WITH (FORCE)')

    def _raw(self):
        import psycopg

        if self._conn is None:
            self._conn = psycopg.connect(self.url)
            # The rows are consistent by construction: no foreign-key trigger per row.
            self._conn.execute("SET session_replication_role = replica")
            self._conn.execute("SET synchronous_commit = off")
        return self._conn

    def write(self, table: str, rows: list[tuple]) -> None:
        conn = self._raw()
        with (
            conn.cursor() as cur,
            cur.copy(f"COPY {table} ({', '.join(COLUMNS[table].split())}) FROM STDIN") as copy,
        ):
            for row in rows:
                copy.write_row(row)
        conn.commit()

    def finish_load(self) -> None:
        conn = self._raw()
        for table in ("batches", *BIG_TABLES):
            conn.execute(
                f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), "
                f"(SELECT max(id) FROM {table}))"
            )
        conn.commit()
        conn.close()
        self._conn = None

    def analyze(self) -> None:
        import psycopg

        # VACUUM too: it sets the visibility map, which index-only scans need (autovacuum
        # would, on a live store)
        with psycopg.connect(self.url, autocommit=True) as conn:
            conn.execute("VACUUM ANALYZE")

    def explain(self, connection, statement, parameters) -> list[str]:
        rows = connection.exec_driver_sql("EXPLAIN " + statement, parameters).all()
        return [r[0] for r in rows]

    def version(self) -> str:
        return self._admin("SELECT version()")[0][0].split(" on ")[0]

    def size(self) -> str:
        size = self._admin(f"SELECT pg_database_size('{self.database}')")[0][0]
        return f"{size / 2**30:.2f} GiB"


def load(backend: Backend, rows: int, chunk: int) -> tuple[Samples, dict]:
    """Fill the store; the samples for the lookups and the seconds each part took."""
    began = time.perf_counter()
    data = Synthetic(rows, now=utcnow(), ts=backend.ts)
    backend.write("batches", data.batches())
    backend.write("workers", data.workers())
    generate_s = write_s = 0.0
    for start in range(1, rows + 1, chunk):
        t0 = time.perf_counter()
        part = data.chunk(start, min(start + chunk, rows + 1))
        t1 = time.perf_counter()
        for table in BIG_TABLES:
            backend.write(table, part[table])
        t2 = time.perf_counter()
        generate_s += t1 - t0
        write_s += t2 - t1
        if (start - 1) // chunk % 10 == 0:
            log(f"  {backend.name}: {start + len(part['videos']) - 1:,} videos written")
    backend.finish_load()
    data.samples.counts.update(reports=data.report_id, hazards=data.hazard_id)
    took = {"generate_s": round(generate_s, 1), "write_s": round(write_s, 1)}
    took["load_s"] = round(time.perf_counter() - began, 1)
    return data.samples, took


# --- the queries --------------------------------------------------------------------------


def _committed(path: str, name: str):
    """The module at `path` as it was at BASE (None if git cannot say)."""
    try:
        source = subprocess.run(
            ["git", "show", f"{BASE}:{path}"], cwd=ROOT, capture_output=True, text=True,
            check=True,
        ).stdout  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return None
    spec = importlib.util.spec_from_loader(name, loader=None)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    exec(compile(source, f"{BASE}:{path}", "exec"), module.__dict__)
    return module


# --- other forms of db/store.py's queries, timed beside what it has ------------------------


def proposed_state_counts(*, session, batch_id=None, window=timedelta(minutes=5)):
    """store.state_counts with the first start and the last finish read one state at a
    time over the whole store: min/max under `state = ?` is one step of
    ix_videos_state_started / ix_videos_state_finished, under `state IN (...)` it reads
    every finished video. A batch's few thousand videos are read once, as before."""
    from sqlalchemy import func

    from db.models import VideoState
    from db.store import StateCounts, _batch_video_ids

    scope = Video.id.in_(_batch_video_ids(batch_id)) if batch_id is not None else True
    rows = session.execute(select(Video.state, func.count()).where(scope).group_by(Video.state))
    counts = {state: 0 for state in VideoState}
    for state, n in rows:
        counts[VideoState(state)] = n
    finished = (VideoState.DONE, VideoState.FAILED)
    if batch_id is None:
        starts = [
            session.scalar(select(func.min(Video.started_at)).where(Video.state == state))
            for state in finished
        ]
        ends = [
            session.scalar(select(func.max(Video.finished_at)).where(Video.state == state))
            for state in finished
        ]
        first_started = min((t for t in starts if t is not None), default=None)
        last_finished = max((t for t in ends if t is not None), default=None)
    else:
        first_started, last_finished = session.execute(
            select(func.min(Video.started_at), func.max(Video.finished_at)).where(
                scope, Video.state.in_(finished)
            )
        ).one()
    recent = session.scalar(
        select(func.count()).where(
            scope, Video.state.in_(finished), Video.finished_at >= utcnow() - window
        )
    )
    return StateCounts(counts, first_started, last_finished, recent or 0)


def orphaned_per_state(*, session, lapsed_before):
    """store.orphaned as one query per state, an alternative measured, not proposed: an
    analyzed SQLite reads the whole table for the OR of the two (a store nobody ran
    ANALYZE on does not), while PostgreSQL then reads the whole queued backlog for the
    second instead of the few claimed rows of ix_videos_state_worker (in its BitmapOr)."""
    from sqlalchemy import or_

    from db.models import VideoState
    from db.store import _alive

    alive = _alive(lapsed_before)
    running_nowhere = (Video.state == VideoState.RUNNING) & or_(
        Video.worker.is_(None), Video.worker.not_in(alive)
    )
    taken_by_the_dead = (
        (Video.state == VideoState.QUEUED) & Video.worker.is_not(None) & Video.worker.not_in(alive)
    )
    # No ORDER BY: an analyzed SQLite (no STAT4) would read the whole table in id order
    # rather than sort the few rows an index finds; SKIP LOCKED never waits, so the order
    # rows are locked in does not matter.
    found = []
    for condition in (running_nowhere, taken_by_the_dead):
        found += session.scalars(select(Video).where(condition).with_for_update(skip_locked=True))
    return sorted(found, key=lambda video: video.id)


def queries(samples: Samples) -> list[tuple[str, str, Callable]]:
    """(group, name, fn(session)) for every query timed; functions not there are left out."""
    from config.settings import Settings
    from db import failures, store
    from db.models import Submission
    from models.prompt import PROMPT_VERSION
    from producer import requeue, status

    settings = Settings()
    now = utcnow()
    lapsed = now - timedelta(seconds=settings.heartbeat_lapse_s)
    latest, middle = BATCHES, BATCHES // 2
    current = {
        "model": settings.model,
        "adapter": settings.adapter_name,
        "prompt_version": PROMPT_VERSION,
    }
    old_prompt = requeue.parse_where("prompt_version < 2")
    critical = requeue.parse_where("risk_factor = critical")
    half = samples.paths[middle][:128]
    resume = half + [p.replace("drive_", "new_") for p in half]  # 128 recorded, 128 not
    found: list[tuple[str, str, Callable]] = []

    def add(group: str, name: str, fn: Callable | None, **kwargs) -> None:
        if fn is None:
            log(f"  note: no function for {name} here: not timed")
            return
        found.append((group, name, lambda s: fn(session=s, **kwargs)))

    def each(fn: Callable | None, key: str, values: list):
        """One call per value (a lookup is one row; 50 of them time better than one)."""
        if fn is None:
            return None
        return lambda session: [fn(session=session, **{key: v}) for v in values]

    def resume_lookup(session, batch_id, paths):
        query = select(Submission.path).where(
            Submission.batch_id == batch_id, Submission.path.in_(paths)
        )
        return session.scalars(query).all()

    def takes(fn: Callable, name: str) -> bool:
        return name in inspect.signature(fn).parameters

    again = requeue.select_again
    add("status", "progress (all)", status.progress, batch_id=None)
    add("status", "progress --batch latest", status.progress, batch_id=latest)
    add("status", "check_batch", status.check_batch, batch_id=middle)
    add("status", "state_counts (all)", store.state_counts)
    add("status", "state_counts (all), proposed", proposed_state_counts)
    add("status", "state_counts --batch latest", store.state_counts, batch_id=latest)
    add("status", "state_counts --batch latest, proposed", proposed_state_counts, batch_id=latest)
    add("status", "backlog_count --batch latest", getattr(store, "backlog_count", None),
        batch_id=latest)  # fmt: skip
    add("failures", "failure_counts (all)", failures.failure_counts)
    add("failures", "failed_videos (all)", failures.failed_videos)
    if takes(failures.failed_videos, "limit"):
        add("failures", "failed_videos (all) limit 1000", failures.failed_videos, limit=1000)
    add("failures", "failure_states (all)", getattr(failures, "failure_states", None))
    add("failures", "failure_counts --batch", failures.failure_counts, batch_id=middle)
    add("failures", "failed_videos --batch", failures.failed_videos, batch_id=middle)
    add("failures", "failure_counts --reason", failures.failure_counts, reason="Time Limit")
    add("failures", "failed_videos --reason", failures.failed_videos, reason="Time Limit")
    add("requeue", "select_again prompt_version < 2", again, where=old_prompt, **current)
    add("requeue", "select_again risk_factor = critical", again, where=critical, **current)
    if takes(again, "limit"):
        add("requeue", "select_again prompt_version < 2 limit 50", again, where=old_prompt,
            limit=50, **current)  # fmt: skip
        add("requeue", "select_again risk_factor = critical limit 50", again, where=critical,
            limit=50, **current)  # fmt: skip
    add("sweep", "orphaned", store.orphaned, lapsed_before=lapsed)
    add("sweep", "orphaned, one query per state", orphaned_per_state, lapsed_before=lapsed)
    add("sweep", "stale_running 1 h", store.stale_running, older_than=now - timedelta(hours=1))
    add("sweep", "unheld 256 ids", store.unheld, video_ids=samples.ids[:256], lapsed_before=lapsed)
    add("sweep", "backlog limit 256", getattr(store, "backlog", None), limit=256)
    add("sweep", "backlog_count", getattr(store, "backlog_count", None))
    add("sweep", "finished_since 5 min", getattr(store, "finished_since", None),
        since=now - timedelta(minutes=5))  # fmt: skip
    add("sweep", "live_workers", getattr(store, "live_workers", None), lapsed_before=lapsed)
    add("sweep", "sent_not_taken", getattr(store, "sent_not_taken", None))
    add("producer", "find_video sha256 x50", each(store.find_video, "sha256", samples.sha256[:50]))
    add("producer", "videos_by_sha256 50", getattr(store, "videos_by_sha256", None),
        sha256s=set(samples.sha256[:50]))  # fmt: skip
    by_fast_key = getattr(store, "find_by_fast_key", None)
    if by_fast_key is not None:
        add(
            "producer", "find_by_fast_key x50", each(by_fast_key, "fast_key", samples.fast_key[:50])
        )
    add("producer", "videos_by_fast_key 50", getattr(store, "videos_by_fast_key", None),
        fast_keys=set(samples.fast_key[:50]))  # fmt: skip
    add("producer", "fast_key lookup x50 (SQL)", lambda session: [
        session.scalars(select(Video).where(Video.fast_key == k)).all()
        for k in samples.fast_key[:50]
    ])  # fmt: skip
    add("producer", "sizes_without_fast_key 256", getattr(store, "sizes_without_fast_key", None),
        sizes=set(samples.sizes[:256]))  # fmt: skip
    add("producer", "resume lookup 256 paths (SQL)",
        lambda session: resume_lookup(session, middle, resume))  # fmt: skip
    add("producer", "recorded_paths 256", getattr(store, "recorded_paths", None),
        batch_id=middle, paths=resume)  # fmt: skip
    if hasattr(store, "submitted_in_batch"):
        add("producer", "submitted_in_batch", store.submitted_in_batch,
            batch_id=latest, video_id=samples.ids[0])  # fmt: skip
    add("producer", "submitted_videos 256 ids", getattr(store, "submitted_videos", None),
        batch_id=latest, ids=set(samples.ids[-256:]))  # fmt: skip
    add("producer", "latest_batch_id", store.latest_batch_id)
    base_failures = _committed("db/failures.py", "base_failures")
    base_requeue = _committed("producer/requeue.py", "base_requeue")
    if base_failures is not None:
        add("failures", f"failure_counts (all) @{BASE}", base_failures.failure_counts)
        add("failures", f"failed_videos (all) @{BASE}", base_failures.failed_videos)
        add("failures", f"failure_counts --reason @{BASE}", base_failures.failure_counts,
            reason="Time Limit")  # fmt: skip
    if base_requeue is not None:
        add("requeue", f"select_again prompt_version < 2 @{BASE}", base_requeue.select_again,
            where=old_prompt, **current)  # fmt: skip
        add("requeue", f"select_again risk_factor = critical @{BASE}",
            base_requeue.select_again, where=critical, **current)  # fmt: skip
    return found


def _size(result) -> int | None:
    if isinstance(result, list | set | dict | tuple):
        return len(result)
    if isinstance(result, int):
        return result
    if hasattr(result, "to_send"):
        return result.videos
    if hasattr(result, "counts"):
        return sum(result.counts.values())
    return None


def signature(result) -> str:
    """What a query answered, comparable across two ways of asking it."""
    if hasattr(result, "to_send"):  # a requeue Selection: the counts and the first matches
        again = getattr(result, "again", len(result.to_send))
        first = [(m.video_id, m.prompt_version) for m in result.to_send[:50]]
        return repr((result.reports, result.videos, result.current,
                     sorted(result.not_done.items()), again, first))  # fmt: skip
    if isinstance(result, list) and result and isinstance(result[0], Video):
        return repr([v.id for v in result])
    if hasattr(result, "first_started"):  # StateCounts
        return repr(sorted(result.counts.items())) + repr(
            (result.first_started, result.last_finished, result.finished_recently)
        )
    return hashlib.sha256(repr(result).encode()).hexdigest()


class Recorder:
    """The distinct statements the engine runs while `on` (for EXPLAIN)."""

    def __init__(self, engine):
        self.on = False
        self.seen: list[tuple[str, object]] = []
        event.listen(engine, "before_cursor_execute", self._statement)

    def _statement(self, conn, cursor, statement, parameters, context, executemany):
        if statement.startswith(("BEGIN", "SAVEPOINT", "RELEASE")) or not self.on:
            return
        if all(s != statement for s, _ in self.seen) and len(self.seen) < 6:
            self.seen.append((statement, parameters))


def full_scans(backend: str, plan: list[str]) -> list[str]:
    """The big tables a plan reads whole, or whose whole index it walks."""
    found = []
    for line in plan:
        if backend == "postgresql":
            m = re.search(r"Seq Scan on (\w+)", line)
            if m and m.group(1) in BIG_TABLES:
                found.append(m.group(1))
        else:
            m = re.match(r"\s*SCAN (\w+)(?: USING (?:COVERING )?INDEX (\w+))?", line)
            if m and m.group(1) in BIG_TABLES:
                found.append(m.group(1) + (f" (index {m.group(2)})" if m.group(2) else ""))
    return found


def time_queries(backend: Backend, engine, samples: Samples, phase: str, runs: int,
                 slow_s: float) -> list[dict]:  # fmt: skip
    from db.session import make_sessionmaker

    sessions = make_sessionmaker(engine)
    recorder = Recorder(engine)
    results = []
    for group, name, fn in queries(samples):
        times = []
        out = None
        recorder.seen = []
        for k in range(1 + runs):
            recorder.on = k == 0
            with sessions() as session:
                began = time.perf_counter()
                out = fn(session)
                took = time.perf_counter() - began
                if k == 0:  # read while the session holds the rows
                    answer, size = signature(out), _size(out)
                session.rollback()
            recorder.on = False
            if k == 0:
                statements = len(recorder.seen)
                if took > slow_s and runs:
                    times.append(took)  # one more run only: a slow query is clearly slow
                    with sessions() as session:
                        began = time.perf_counter()
                        fn(session)
                        times.append(time.perf_counter() - began)
                        session.rollback()
                    break
                continue
            times.append(took)
        plans = []
        with engine.connect() as conn:
            for statement, parameters in recorder.seen:
                try:
                    plan = backend.explain(conn, statement, parameters)
                except Exception as e:  # a plan we cannot get is reported, not fatal
                    plan = [f"(no plan: {type(e).__name__}: {str(e).splitlines()[0]})"]
                    conn.rollback()
                plans.append({"sql": " ".join(statement.split()), "plan": plan})
            conn.rollback()
        row = {
            "backend": backend.name,
            "phase": phase,
            "group": group,
            "query": name,
            "median_ms": round(statistics.median(times) * 1000, 2),
            "runs": len(times),
            "rows": size,
            "signature": answer,
            "statements": statements,
            "full_scans": sorted({t for p in plans for t in full_scans(backend.name, p["plan"])}),
            "plans": plans,
        }
        results.append(row)
        scans = ", ".join(row["full_scans"]) or "-"
        log(f"  {backend.name} {phase:>12} {name:<48} {row['median_ms']:>10.1f} ms  "
            f"rows {row['rows']}  full scans: {scans}")  # fmt: skip
    event.remove(engine, "before_cursor_execute", recorder._statement)
    answers = {r["query"]: r["signature"] for r in results}
    for r in results:  # a rewrite must answer as the code it replaces does
        for suffix in (f" @{BASE}", ", proposed", ", one query per state"):
            if r["query"].endswith(suffix) and r["query"][: -len(suffix)] in answers:
                r["same_as"] = r["query"][: -len(suffix)]
                r["same"] = answers[r["same_as"]] == r["signature"]
                same = "the same as" if r["same"] else "NOT the same as"
                log(f"  {backend.name} {phase}: {r['query']} answers {same} {r['same_as']}")
    return results


def time_cli(
    backend: Backend, phase: str, runs: int, slow_s: float, timeout_s: float
) -> list[dict]:
    home = Path(tempfile.mkdtemp(prefix="scale_bench_home_", dir="/tmp"))
    env = {**os.environ, "FLEETSCRIBE_DATABASE_URL": backend.url, "FLEETSCRIBE_HOME": str(home)}
    env.pop("FLEETSCRIBE_BROKER_URL", None)  # the filesystem broker: nothing to wait for
    commands = [
        ["--help"],
        ["status"],
        ["status", "--batch", str(BATCHES)],
        ["failures", "--batch", str(BATCHES // 2)],
        ["failures"],
        ["requeue", "--where", "prompt_version < 2", "--dry-run"],
        ["requeue", "--where", "risk_factor = critical", "--dry-run"],
    ]
    results = []
    for args in commands:
        times, code, lines, error = [], None, 0, ""
        for k in range(1 + runs):
            began = time.perf_counter()
            try:
                out = subprocess.run(
                    [sys.executable, "-m", "producer", *args], cwd=ROOT, env=env,
                    capture_output=True, text=True, timeout=timeout_s,
                )  # fmt: skip
            except subprocess.TimeoutExpired:
                times, code, error = [timeout_s], "timeout", f"over {timeout_s:.0f} s"
                break
            took = time.perf_counter() - began
            code, lines = out.returncode, len(out.stdout.splitlines())
            error = out.stderr.strip().splitlines()[-1] if out.returncode else ""
            if k > 0 or took > slow_s:
                times.append(took)
            if took > slow_s:
                break
        row = {
            "backend": backend.name,
            "phase": phase,
            "command": "python -m producer " + " ".join(
                f'"{a}"' if " " in a else a for a in args),
            "median_s": round(statistics.median(times), 3),
            "runs": len(times),
            "exit": code,
            "stdout_lines": lines,
            "error": error,
        }  # fmt: skip
        results.append(row)
        log(f"  {backend.name} {phase:>12} {row['command']:<70} {row['median_s']:>8.2f} s "
            f"exit {code}, {lines} lines {error}")  # fmt: skip
    shutil.rmtree(home, ignore_errors=True)
    return results


# --- the run ------------------------------------------------------------------------------


@contextmanager
def stamped_head(url: str, revision: str):
    """The CLI refuses a store below head: for the CLI's runs on an older revision whose
    later migrations only add indexes (0006), say head, then the truth again."""
    from db.migrate import head_revision
    from db.session import make_engine

    head = head_revision()
    if revision in ("head", head):
        yield
        return
    engine = make_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(text("UPDATE alembic_version SET version_num = :v"), {"v": head})
        log(f"  (the CLI at {revision}: alembic_version says {head} while it runs)")
        yield
    finally:
        with engine.begin() as conn:
            conn.execute(text("UPDATE alembic_version SET version_num = :v"), {"v": revision})
        engine.dispose()


def refresh(engine, samples: Samples) -> None:
    """Now, for the phase about to be timed: the live workers beat, and the newest 300
    finishes lie within the last 150 s (a fleet describing two videos a second)."""
    from db.models import Worker

    now = utcnow()
    with engine.begin() as conn:
        conn.execute(update(Worker).where(Worker.name.in_(ALIVE)).values(heartbeat_at=now))
        finishes = [
            {
                "vid": vid,
                "end": now - timedelta(seconds=k / 2),
                "start": now - timedelta(seconds=k / 2 + 20),
            }
            for k, vid in enumerate(reversed(samples.finished))
        ]
        conn.execute(
            update(Video)
            .where(Video.id == bindparam("vid"))
            .values(finished_at=bindparam("end"), started_at=bindparam("start")),
            finishes,
        )


def run_backend(backend: Backend, args) -> dict:
    from db.migrate import upgrade
    from db.session import make_engine

    backend.create()
    info: dict = {"backend": backend.name, "version": backend.version(), "migrate_s": {}}
    try:
        phases = args.phases.split(",")
        engine = make_engine(backend.url)
        upgrade(engine, phases[0])
        engine.dispose()
        log(f"{backend.name}: schema at {phases[0]}; loading {args.rows:,} videos")
        samples, took = load(backend, args.rows, args.chunk)
        info.update(took, counts=samples.counts)
        t0 = time.perf_counter()
        backend.analyze()
        info["analyze_s"] = round(time.perf_counter() - t0, 1)
        info["size_loaded"] = backend.size()
        log(f"{backend.name}: loaded in {took['load_s']} s, analyzed in {info['analyze_s']} s, "
            f"{info['size_loaded']}; {samples.counts}")  # fmt: skip
        results, cli = [], []
        for phase in phases:
            revision = "head" if phase.startswith("head") else phase
            engine = make_engine(backend.url)
            if phase == "head-nostats":
                if backend.name != "sqlite":
                    continue
                backend.drop_stats()
            elif phase != phases[0]:
                t0 = time.perf_counter()
                upgrade(engine, revision)
                info["migrate_s"][f"{phases[0]}->{phase}"] = round(time.perf_counter() - t0, 1)
                engine.dispose()
                backend.analyze()
                engine = make_engine(backend.url)
                log(f"{backend.name}: upgraded to {phase} in {info['migrate_s']} s")
            refresh(engine, samples)
            results += time_queries(backend, engine, samples, phase, args.runs, args.slow_s)
            engine.dispose()
            if args.cli and phase != "head-nostats":
                with stamped_head(backend.url, revision):
                    cli += time_cli(backend, phase, args.cli_runs, args.slow_s, args.cli_timeout)
        info["size_final"] = backend.size()
        info["results"], info["cli"] = results, cli
        return info
    finally:
        if not args.keep:
            backend.drop()


def tables(runs: list[dict], phases: list[str]) -> str:
    """The timings side by side: a column per backend and phase."""
    from rich.console import Console
    from rich.table import Table

    console = Console(record=True, width=220, file=io.StringIO())
    columns = [(r["backend"], p) for r in runs for p in phases
               if p != "head-nostats" or r["backend"] == "sqlite"]  # fmt: skip
    table = Table(title="queries: median ms (full scans of big tables)", header_style="bold")
    table.add_column("query")
    for backend, phase in columns:
        table.add_column(f"{backend}\n{phase}", justify="right")
    cell: dict = {}
    names: list[str] = []
    for r in runs:
        for q in r["results"]:
            if q["query"] not in names:
                names.append(q["query"])
            scans = "*" if q["full_scans"] else ""
            cell[(q["query"], q["backend"], q["phase"])] = f"{q['median_ms']:.1f}{scans}"
    for name in names:
        table.add_row(name, *[cell.get((name, b, p), "") for b, p in columns])
    console.print(table)
    console.print("* the plan reads a big table (or its whole index); see the plans below")
    if not any(r["cli"] for r in runs):
        return console.export_text()
    cli = Table(title="CLI end to end: median s (python start-up: the --help row)",
                header_style="bold")  # fmt: skip
    cli.add_column("command")
    cli_columns = [c for c in columns if c[1] != "head-nostats"]
    for backend, phase in cli_columns:
        cli.add_column(f"{backend}\n{phase}", justify="right")
    cell, names = {}, []
    for r in runs:
        for c in r["cli"]:
            if c["command"] not in names:
                names.append(c["command"])
            mark = "" if c["exit"] == 0 else f" (exit {c['exit']})"
            cell[(c["command"], c["backend"], c["phase"])] = f"{c['median_s']:.2f}{mark}"
    for name in names:
        cli.add_row(name, *[cell.get((name, b, p), "") for b, p in cli_columns])
    console.print(cli)
    return console.export_text()


def plans_text(runs: list[dict]) -> str:
    out = []
    for r in runs:
        for q in r["results"]:
            out.append(f"== {q['backend']} {q['phase']}: {q['query']} ({q['median_ms']} ms)")
            for p in q["plans"]:
                out.append(f"   {p['sql'][:400]}")
                out += [f"     {line}" for line in p["plan"]]
    return "\n".join(out) + "\n"


def main() -> int:
    global _log_file
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000, help="videos")
    parser.add_argument("--backends", default="sqlite,postgresql")
    parser.add_argument("--phases", default="0005,head,head-nostats",
                        help="revisions timed in turn on the same rows; head-nostats: "
                        "SQLite without sqlite_stat1")  # fmt: skip
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--cli-runs", type=int, default=3)
    parser.add_argument("--slow-s", type=float, default=3.0)
    parser.add_argument("--cli-timeout", type=float, default=120.0)
    parser.add_argument("--no-cli", dest="cli", action="store_false")
    parser.add_argument("--chunk", type=int, default=20_000, help="videos per write")
    parser.add_argument("--pg", default="postgresql://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--keep", action="store_true", help="leave the stores (debugging)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/store_scale_cpu"))
    args = parser.parse_args()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    _log_file = open(args.out + ".log", "w")  # noqa: SIM115 (kept open for the whole run)
    import sqlalchemy

    meta = {
        "when": time.strftime("%Y-%m-%d %H:%M:%S"),
        "cpu": f"{cpu_name()} ({os.cpu_count()} cores)",
        "python": platform.python_version(),
        "sqlalchemy": sqlalchemy.__version__,
        "args": vars(args),
    }
    log(f"store_scale: {args.rows:,} videos on {meta['cpu']}; phases {args.phases}")
    runs = []
    for name in args.backends.split(","):
        backend = SQLite(Path("/tmp")) if name == "sqlite" else PostgreSQL(args.pg)
        runs.append(run_backend(backend, args))
        meta[name] = runs[-1]["version"]
        summary = tables(runs, args.phases.split(","))
        Path(args.out + ".json").write_text(json.dumps({**meta, "runs": runs}, indent=1) + "\n")
        header = (f"store_scale {meta['when']}: {args.rows:,} videos; {meta['cpu']}; "
                  + "; ".join(f"{r['backend']} {r['version']}" for r in runs))  # fmt: skip
        Path(args.out + ".txt").write_text(header + "\n\n" + summary + "\n" + plans_text(runs))
    print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
