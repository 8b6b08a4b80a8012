"""Dedupe keys: the whole-file sha256 against the sampled fast key, side by side, one run.

    python benchmarks/dedupe_keys.py [--sizes-mb 8,64,512] [--out benchmarks/results/NAME]

CPU only. Three parts:
- speed: files of random bytes, keyed cold (the page cache evicted before each read with
  POSIX_FADV_DONTNEED after an fsync) and warm (cached): time, MB of file keyed per second,
  files/s, bytes asked for and bytes the storage delivered (/proc/self/io read_bytes), the
  fast key's speed-up; the candidate sampling schemes on the largest file; and hashlib's
  sha256 and blake2b speed in memory (whether the disk or the hash limits the full key);
- safety: a corpus of distinct synthetic clips (producer.clips; several parameter sets,
  many of them identical but for the seed, so sizes coincide): fast-key collisions against
  sha256 distinctness, pairs sharing a size;
- adversarial: copies of two clips edited on purpose, to show what the fast key sees.
Writes OUT.json, OUT.txt (the printed tables and verdict) and OUT.log.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from itertools import pairwise
from math import comb
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.machine import cpu_name  # noqa: E402
from producer import fingerprint  # noqa: E402
from producer.fingerprint import F1, Scheme, fast_key, sha256_file  # noqa: E402

MB = 1_000_000
CANDIDATES = [  # the schemes compared on the largest file, cold
    Scheme("small", head=64 << 10, tail=64 << 10, blocks=8, block=4 << 10),
    F1,
    Scheme("large", head=1 << 20, tail=1 << 20, blocks=32, block=64 << 10),
]
# The safety corpus: (name, count, suffix, make_video keywords); seeds differ within a set.
RAW = dict(codec="rawvideo", seconds=4, fps=10, width=320, height=180)  # 3.4 MB, one size
MJPEG = dict(
    codec="mjpeg", seconds=12, fps=15, width=640, height=360, encoder_options={"qscale": "2"}
)
CORPUS = [
    ("raw-avi", 70, ".avi", RAW),
    ("raw-mkv-night", 50, ".mkv", {**RAW, "night": True}),
    ("mjpeg-mp4", 50, ".mp4", MJPEG),
    ("mjpeg-mov-faststart", 30, ".mov", {**MJPEG, "muxer_options": {"movflags": "+faststart"}}),
    ("ffv1-mkv", 40, ".mkv", dict(codec="ffv1", seconds=12, fps=10, width=640, height=360)),
    ("h264-mp4", 60, ".mp4", dict(seconds=2, fps=10, width=160, height=90)),  # hashed whole
]

_T0 = time.perf_counter()
_LOG: list[str] = []


def log(message: str) -> None:
    line = f"[{time.perf_counter() - _T0:6.1f} s] {message}"
    _LOG.append(line)
    print(line, flush=True)


def storage_read_bytes() -> int:
    """Bytes this process had the storage layer fetch (not page-cache hits)."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("read_bytes:"):
            return int(line.split()[1])
    return -1


def evict(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def warm(path: Path) -> None:
    with open(path, "rb") as f:
        while f.read(8 << 20):
            pass


def write_random(path: Path, size: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, 8 << 20)
            f.write(rng.bytes(n))
            left -= n
        f.flush()
        os.fsync(f.fileno())


@contextmanager
def readahead_kept():
    """fast_key with its POSIX_FADV_RANDOM turned into a no-op: the kernel's readahead."""
    real = os.posix_fadvise

    def advise(fd, offset, length, advice):
        if advice != os.POSIX_FADV_RANDOM:
            real(fd, offset, length, advice)

    os.posix_fadvise = advise
    try:
        yield
    finally:
        os.posix_fadvise = real


def timed(fn, path: Path, *, cold: bool, trials: int) -> dict:
    """Median seconds of `fn(path)` over `trials`, and the storage bytes of one call."""
    seconds, fetched = [], []
    if not cold:
        warm(path)
    for _ in range(trials):
        if cold:
            evict(path)
        before = storage_read_bytes()
        began = time.perf_counter()
        fn(path)
        seconds.append(time.perf_counter() - began)
        fetched.append(storage_read_bytes() - before)
    return {"seconds": statistics.median(seconds), "storage_bytes": int(statistics.median(fetched))}


def speed_rows(work: Path, sizes_mb: list[int]) -> tuple[list[dict], list[dict]]:
    rows, schemes = [], []
    largest = None
    for i, size_mb in enumerate(sizes_mb):
        size = size_mb * MB
        path = work / f"random_{size_mb}MB.bin"
        write_random(path, size, seed=i)
        sha_trials = max(2, min(5, 512 // size_mb))
        for cold in (True, False):
            state = "cold" if cold else "warm"
            sha = timed(sha256_file, path, cold=cold, trials=sha_trials)
            fast = timed(fast_key, path, cold=cold, trials=21)
            for name, m, asked in (
                ("sha256 (whole file)", sha, size),
                ("fast key f1", fast, F1.bytes_read(size)),
            ):
                rows.append(
                    {
                        "file_mb": size_mb,
                        "cache": state,
                        "key": name,
                        "ms_per_file": round(m["seconds"] * 1e3, 2),
                        "mb_per_s": round(size / MB / m["seconds"], 1),
                        "files_per_s": round(1 / m["seconds"], 1),
                        "bytes_asked": asked,
                        "storage_bytes": m["storage_bytes"] if cold else 0,
                    }
                )
            rows[-1]["x_faster"] = round(sha["seconds"] / fast["seconds"], 1)
            log(
                f"{size_mb} MB {state}: sha256 {sha['seconds'] * 1e3:.1f} ms, "
                f"fast {fast['seconds'] * 1e3:.2f} ms ({rows[-1]['x_faster']}x)"
            )
        if largest:
            largest.unlink()
        largest = path
    for scheme in CANDIDATES:
        cases = [(scheme.name, False)] + (
            [(f"{scheme.name}, readahead on", True)] if scheme is F1 else []
        )
        for label, keep_readahead in cases:

            def key(p, scheme=scheme):
                return fast_key(p, scheme=scheme)

            with readahead_kept() if keep_readahead else nullcontext():
                m = timed(key, largest, cold=True, trials=21)
            schemes.append(
                {
                    "scheme": label,
                    "file_mb": sizes_mb[-1],
                    "bytes_asked": scheme.bytes_read(largest.stat().st_size),
                    "reads": len(scheme.spans(largest.stat().st_size)),
                    "storage_bytes": m["storage_bytes"],
                    "ms_per_file_cold": round(m["seconds"] * 1e3, 2),
                }
            )
            log(f"scheme {label}: {schemes[-1]}")
    largest.unlink()
    return rows, schemes


def hash_speed() -> dict:
    data = np.random.default_rng(0).bytes(256 << 20)
    out = {}
    for name, make in (
        ("sha256", fingerprint.hashlib.sha256),
        ("blake2b-16", lambda: fingerprint.hashlib.blake2b(digest_size=16)),
    ):
        best = float("inf")
        for _ in range(3):
            began = time.perf_counter()
            make().update(data)
            best = min(best, time.perf_counter() - began)
        out[name] = round(len(data) / MB / best, 1)
    log(f"in memory, MB/s: {out}")
    return out


def make_corpus(folder: Path, sets: list[tuple]) -> list[tuple[str, Path]]:
    from producer.clips import make_video

    jobs = []
    for name, count, suffix, kwargs in sets:
        for seed in range(count):
            jobs.append((name, folder / f"{name}_{seed:03d}{suffix}", seed, kwargs))

    def one(job):
        name, path, seed, kwargs = job
        make_video(path, seed=seed, **kwargs)
        return name, path

    with ThreadPoolExecutor(os.cpu_count() or 2) as pool:
        return list(pool.map(one, jobs))


def per_clip(corpus: list[tuple[str, Path]]) -> dict:
    """Cold median ms per clip of the probe enqueue runs anyway, the fast key and sha256."""
    from video.media import probe

    paths = [p for _, p in corpus][::5]
    out = {"clips": len(paths)}
    for name, fn in (("probe", probe), ("fast_key", fast_key), ("sha256", sha256_file)):
        out[f"{name}_ms"] = round(
            statistics.median(timed(fn, p, cold=True, trials=1)["seconds"] for p in paths) * 1e3,
            2,
        )
    log(f"per clip, cold: {out}")
    return out


def collisions(keys: list[str], shas: list[str]) -> int:
    """How many distinct contents share a key with another content."""
    by_key = defaultdict(set)
    for key, sha in zip(keys, shas, strict=True):
        by_key[key].add(sha)
    return sum(len(contents) - 1 for contents in by_key.values())


def safety(corpus: list[tuple[str, Path]]) -> list[dict]:
    rows = []
    sets = defaultdict(list)
    for name, path in corpus:
        sets[name].append(path)
    for name, paths in [*sets.items(), ("all", [p for _, p in corpus])]:
        sizes = [p.stat().st_size for p in paths]
        shas = [sha256_file(p) for p in paths]
        keys = [fast_key(p) for p in paths]
        others = {
            scheme.name: collisions([fast_key(p, scheme=scheme) for p in paths], shas)
            for scheme in CANDIDATES
            if scheme is not F1
        }
        rows.append(
            {
                "set": name,
                "clips": len(paths),
                "sizes": f"{min(sizes) / 1024:.0f}-{max(sizes) / 1024:.0f} KiB",
                "sampled": sum(s > F1.total for s in sizes),
                "distinct_sha256": len(set(shas)),
                "distinct_fast_keys": len(set(keys)),
                "fast_key_collisions": collisions(keys, shas),
                "collisions_other_schemes": " / ".join(f"{n} {c}" for n, c in others.items()),
                "same_size_pairs": sum(comb(n, 2) for n in Counter(sizes).values()),
                "distinct_sizes": len(set(sizes)),
            }
        )
        log(f"safety {rows[-1]}")
    return rows


def unsampled_offset(size: int) -> int:
    """An offset in the middle that no F1 span covers (halfway along the widest gap)."""
    spans = F1.spans(size)
    gaps = [(b[0] - (a[0] + a[1]), a[0] + a[1]) for a, b in pairwise(spans)]
    width, start = max(gaps)
    assert width > 0, "file too small to have unsampled bytes"
    return start + width // 2


def remux(src: Path, dst: Path) -> None:
    import av

    with av.open(str(src)) as inp, av.open(str(dst), "w") as out:
        stream = inp.streams.video[0]
        copy = out.add_stream_from_template(stream)
        for packet in inp.demux(stream):
            if packet.dts is None:
                continue
            packet.stream = copy
            out.mux(packet)


def adversarial(folder: Path, originals: list[Path]) -> list[dict]:
    rows = []
    for original in originals:
        data = original.read_bytes()
        size = len(data)
        middle_block = F1.spans(size)[1 + F1.blocks // 2]
        edits = {
            "identical copy, another path": (data, "same (a true duplicate)"),
            "1 byte flipped in an unsampled middle gap": (
                flip(data, unsampled_offset(size)),
                "same: blind by construction",
            ),
            "1 byte flipped in the head": (flip(data, 1000), "different"),
            "1 byte flipped in the tail": (flip(data, size - 1000), "different"),
            "1 byte flipped in a sampled middle block": (
                flip(data, middle_block[0] + middle_block[1] // 2),
                "different",
            ),
            "truncated by 1 byte": (data[:-1], "different"),
            "1 byte appended": (data + b"\0", "different"),
        }
        base_key, base_sha = fast_key(original), sha256_file(original)
        for label, (content, expected) in edits.items():
            path = folder / f"edit_{original.stem}{original.suffix}"
            path.write_bytes(content)
            rows.append(adversarial_row(original, label, path, base_key, base_sha, expected))
        # matroska takes no raw video by stream copy: MOV for the AVI, MKV for the MP4
        other = ".mov" if original.suffix == ".avi" else ".mkv"
        target = folder / f"remux_{original.stem}{other}"
        try:
            remux(original, target)
        except Exception as e:  # a codec the other container refuses: say so, go on
            rows.append({"clip": original.name, "change": f"remux failed: {e}"})
        else:
            label = f"re-muxed into {target.suffix} (stream copy)"
            rows.append(adversarial_row(original, label, target, base_key, base_sha, "different"))
    for row in rows:
        log(f"adversarial {row}")
    return rows


def flip(data: bytes, offset: int) -> bytes:
    return data[:offset] + bytes([data[offset] ^ 0xFF]) + data[offset + 1 :]


def adversarial_row(original, label, path, base_key, base_sha, expected) -> dict:
    same_key = fast_key(path) == base_key
    same_sha = sha256_file(path) == base_sha
    return {
        "clip": f"{original.name} ({original.stat().st_size / 1024:.0f} KiB)",
        "change": label,
        "fast_key": "same" if same_key else "different",
        "sha256": "same" if same_sha else "different",
        "expected_fast_key": expected,
    }


def render(title: str, rows: list[dict], cols: list[tuple[str, str]]) -> str:
    from rich.console import Console
    from rich.table import Table

    out = Table(title=title, header_style="bold")
    for heading, _ in cols:
        out.add_column(heading, overflow="fold")
    for row in rows:
        out.add_row(*[str(row.get(key, "")) for _, key in cols])
    console = Console(record=True, width=170)
    console.print(out)
    return console.export_text()


def verdict(speed: list[dict], corpus: list[dict], edits: list[dict], sizes_mb) -> str:
    big = sizes_mb[-1]
    cold = {r["key"]: r for r in speed if r["file_mb"] == big and r["cache"] == "cold"}
    warm_ = {r["key"]: r for r in speed if r["file_mb"] == big and r["cache"] == "warm"}
    fast, sha = cold["fast key f1"], cold["sha256 (whole file)"]
    total = next(r for r in corpus if r["set"] == "all")
    missed = [e for e in edits if e.get("fast_key") == "same" and e.get("sha256") == "different"]
    wrong = [
        e for e in edits if "fast_key" in e and not e["expected_fast_key"].startswith(e["fast_key"])
    ]
    return (
        f"verdict: the fast key reads {F1.total // 1024} KiB per file (at most) instead of the "
        f"whole file; on {big} MB files it is {fast['x_faster']}x faster cold "
        f"({fast['ms_per_file']} against {sha['ms_per_file']} ms) and "
        f"{warm_['fast key f1']['x_faster']}x warm; {total['fast_key_collisions']} fast-key "
        f"collisions in {total['distinct_sha256']} distinct clips ({total['sampled']} of them "
        f"sampled, {total['same_size_pairs']} pairs of the same size); of {len(edits)} edited "
        f"copies it missed {len(missed)} (each a same-size flip inside unsampled bytes), "
        f"{len(wrong)} outcomes differed from the expected."
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes-mb", default="8,64,512", help="random files, MB (10^6 bytes)")
    parser.add_argument("--corpus-scale", type=float, default=1.0, help="x each set's count")
    parser.add_argument("--work", default=None, help="a folder on the disk to measure")
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/dedupe_keys_cpu"))
    args = parser.parse_args()
    sizes_mb = [int(s) for s in args.sizes_mb.split(",")]

    machine = f"{cpu_name()}, {os.cpu_count()} cores"
    work = Path(tempfile.mkdtemp(prefix="fs-dedupe-", dir=args.work))
    log(f"{machine}; work folder {work}; scheme f1 reads {F1.total} bytes at most")
    try:
        memory = hash_speed()
        speed, schemes = speed_rows(work, sizes_mb)
        sets = [(n, max(2, round(c * args.corpus_scale)), s, k) for n, c, s, k in CORPUS]
        began = time.perf_counter()
        corpus_paths = make_corpus(work / "clips", sets)
        log(f"{len(corpus_paths)} clips written in {time.perf_counter() - began:.0f} s")
        corpus = safety(corpus_paths)
        clip_costs = per_clip(corpus_paths)
        picks = [
            next(p for n, p in corpus_paths if n == "raw-avi"),
            next(p for n, p in corpus_paths if n == "mjpeg-mp4" and p.stat().st_size > F1.total),
        ]
        (work / "edits").mkdir()
        edits = adversarial(work / "edits", picks)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    text = "\n".join(
        [
            f"fleetscribe dedupe keys on {machine}",
            f"in memory: sha256 {memory['sha256']} MB/s, blake2b-16 {memory['blake2b-16']} MB/s",
            f"per corpus clip, cold, median of {clip_costs['clips']}: probe (video.media.probe) "
            f"{clip_costs['probe_ms']} ms, fast key {clip_costs['fast_key_ms']} ms, sha256 "
            f"{clip_costs['sha256_ms']} ms",
            render(
                "speed: whole-file sha256 against the f1 fast key (median)",
                speed,
                [
                    ("file MB", "file_mb"),
                    ("cache", "cache"),
                    ("key", "key"),
                    ("ms/file", "ms_per_file"),
                    ("MB/s", "mb_per_s"),
                    ("files/s", "files_per_s"),
                    ("bytes asked", "bytes_asked"),
                    ("storage bytes", "storage_bytes"),
                    ("x faster", "x_faster"),
                ],
            ),
            render(
                f"sampling schemes, cold, {sizes_mb[-1]} MB file",
                schemes,
                [
                    ("scheme", "scheme"),
                    ("reads", "reads"),
                    ("bytes asked", "bytes_asked"),
                    ("storage bytes", "storage_bytes"),
                    ("ms/file", "ms_per_file_cold"),
                ],
            ),
            render(
                "safety: distinct synthetic clips (seeds differ within a set)",
                corpus,
                [
                    ("set", "set"),
                    ("clips", "clips"),
                    ("sizes", "sizes"),
                    ("sampled (> 768 KiB)", "sampled"),
                    ("distinct sha256", "distinct_sha256"),
                    ("distinct fast keys", "distinct_fast_keys"),
                    ("fast-key collisions", "fast_key_collisions"),
                    ("collisions, other schemes", "collisions_other_schemes"),
                    ("distinct sizes", "distinct_sizes"),
                    ("same-size pairs", "same_size_pairs"),
                ],
            ),
            render(
                "adversarial: edited copies against the original",
                edits,
                [
                    ("clip", "clip"),
                    ("change", "change"),
                    ("fast key", "fast_key"),
                    ("sha256", "sha256"),
                    ("expected (fast key)", "expected_fast_key"),
                ],
            ),
            verdict(speed, corpus, edits, sizes_mb),
        ]
    )
    print(text, flush=True)
    log("done")
    result = {
        "machine": machine,
        "when": time.strftime("%Y-%m-%d %H:%M:%S"),
        "args": vars(args),
        "scheme": {
            "name": F1.name,
            "head": F1.head,
            "tail": F1.tail,
            "blocks": F1.blocks,
            "block": F1.block,
            "total": F1.total,
            "digest_bytes": F1.digest_bytes,
        },
        "hash_mb_per_s_in_memory": memory,
        "speed": speed,
        "schemes": schemes,
        "corpus": corpus,
        "per_clip_cold": clip_costs,
        "adversarial": edits,
        "verdict": text.splitlines()[-1],
    }
    Path(args.out + ".json").write_text(json.dumps(result, indent=2) + "\n")
    Path(args.out + ".txt").write_text(text + "\n")
    Path(args.out + ".log").write_text("\n".join(_LOG) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
