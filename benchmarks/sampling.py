"""Frame sampling on the CPU (issue 18): `uniform` against `events` against a full-decode
motion scan, side by side in one run, on synthetic dash-cam clips of 10 s to 30 min.

    .venv/bin/python benchmarks/sampling.py [--quick] [--scratch DIR] [--repeats 3]
        [--scan-max-s 1800] [--out benchmarks/results/sampling_cpu]

`--quick` runs only the 10 s and 40 s clips (a check in a minute or two once built).

Clips: H.264 in MP4 at 30 fps, a keyframe a second (libx264 veryfast, crf 23, g 30, so
B-frames too), 1280x720 and 1920x1080, of 10 s, 40 s, 2 min, 10 min and 30 min; and HEVC
in MKV and VP9 in WebM at 2 min, and HEVC in MKV at 30 min, 720p (no MP4 index: the events
mode demuxes every packet; no full-scan on the 30-min MKV). Every clip is a row of 10 s
segments made by `producer.clips.make_video`: each segment that carries an event is
encoded for it, the plain ones are three encodes reused, and a clip is written by remuxing
them (stream copy, timestamps shifted), so a 30-minute file takes seconds to build.
Segments and clips are cached under --scratch (built on a fresh machine: a few minutes).
Each built clip is checked: its probe (duration, frame count), and on every frame any
method picked, the time bar (it encodes the *segment's* time, so it must read the picked
time modulo 10 s) and the crossing figure (seen exactly when an event covers the picked
time: this checks where the segments landed).

Events: walking figures crossing the road (`producer.clips.Event`), duration 0.4-1.0 s,
depth 0.55-0.9, size 0.6-1.2, at random times from a seeded RNG, one to a segment, never
across a join: 1 a clip up to 40 s, 2 in 2 min, 3 in 10 min, 5 in 30 min; plus clips with
none (40 s, 10 min, 30 min) to count event frames where nothing happens. An event is
caught when a picked frame's time t (from the clip's start) has `event.covers(t)`.

Methods, in one process on the same file: `uniform` and `events` are
`video.media.sample_frames(path, 8, sampling=...)`, one untimed warm-up each, then
--repeats runs interleaved (u, e, e, u, ...), the median kept. `full-scan` is the
reference written here: decode every frame (thread_type AUTO), a 64x36 grey thumbnail of
each (swscale's FAST_BILINEAR: the default bicubic doubles its cost at 1080p), motion =
mean absolute difference to the previous one (smoothed over 5 frames; the joins between
segments are cuts no real drive has, so their difference is not counted), then 5 uniform
frames plus the 3 highest-moving moments at least 1.5 s apart, decoded as sample_frames
decodes its targets. It runs --repeats times on clips up to 2 min and once on longer ones,
and only on clips up to --scan-max-s. CPU seconds are time.process_time() differences
(every thread of this process); wall seconds beside. `curve` is the events mode's own work
alone (change_curve + choose on an open file): where its targets land in a GOP changes the
decoding it costs, so events can cost less than uniform; curve is what it adds. Finally
cProfile of the events mode on the longest clips. Problems found by the checks (and a
method returning more than k frames) are listed.

Writes OUT.json, OUT.txt (the table) and OUT.log.
"""

from __future__ import annotations

import argparse
import cProfile
import hashlib
import io
import json
import os
import platform
import pstats
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import av
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.machine import cpu_name  # noqa: E402
from producer.clips import Event, make_video, read_time  # noqa: E402
from video import events as ev  # noqa: E402
from video import media  # noqa: E402

K = 8
FPS = 30
SEGMENT_S = 10
RESOLUTIONS = [(1280, 720), (1920, 1080)]
# (length s, clips, events each); with no-event clips at 40 s, 10 min and 30 min
LENGTHS = [(10, 3, 1), (40, 2, 1), (120, 1, 2), (600, 1, 3), (1800, 1, 5)]
NO_EVENT_LENGTHS = (40, 600, 1800)
QUICK_MAX_S = 40
CODECS = {  # codec: (suffix, encoder options), the same for every segment of a codec
    "libx264": (".mp4", {"g": "30", "preset": "veryfast", "crf": "23"}),
    "libx265": (".mkv", {"g": "30", "preset": "ultrafast", "crf": "26"}),
    "libvpx-vp9": (
        ".webm",
        {"g": "30", "deadline": "realtime", "cpu-used": "8", "crf": "32", "b": "0"},
    ),
}
# (codec, length s, size, events, full-scan?): the 30-min MKV shows the demux's cost
OTHER_CODECS = [
    ("libx265", 120, (1280, 720), 2, True),
    ("libvpx-vp9", 120, (1280, 720), 2, True),
    ("libx265", 1800, (1280, 720), 3, False),
]
REMUX_VERSION = 2  # part of a clip's cache key: a change to remux() rebuilds the clips
PLAIN_SEEDS = (101, 102, 103)
LOG: list[str] = []


def say(line: str = "") -> None:
    print(line, flush=True)
    LOG.append(line)


@dataclass(frozen=True)
class Segment:
    width: int
    height: int
    codec: str
    seed: int
    event: Event | None = None  # in segment time

    def path(self, scratch: Path) -> Path:
        key = hashlib.sha1(repr((self, CODECS[self.codec])).encode()).hexdigest()[:10]
        kind = "event" if self.event else "plain"
        return (
            scratch
            / "segments"
            / f"{self.height}p_{self.codec}_{kind}_{key}{CODECS[self.codec][0]}"
        )


@dataclass
class Clip:
    name: str
    length_s: int
    width: int
    height: int
    codec: str
    segments: list[Segment]
    events: list[Event] = field(default_factory=list)  # in clip time
    scan: bool = True  # whether full-scan runs on it

    def path(self, scratch: Path) -> Path:
        key = hashlib.sha1(repr((REMUX_VERSION, self.segments)).encode()).hexdigest()[:10]
        return (
            scratch
            / "clips"
            / f"{self.name.replace(' ', '_').replace('/', '-')}_{key}{CODECS[self.codec][0]}"
        )


def draw_event(rng: np.random.Generator) -> Event:
    duration = float(rng.uniform(0.4, 1.0))
    return Event(
        start=round(float(rng.uniform(0.3, SEGMENT_S - 0.3 - duration)), 3),
        duration=round(duration, 3),
        depth=round(float(rng.uniform(0.55, 0.9)), 3),
        size=round(float(rng.uniform(0.6, 1.2)), 3),
    )


def make_clip(rng, name, length, width, height, codec, n_events) -> Clip:
    n = length // SEGMENT_S
    slots = set(rng.choice(n, size=n_events, replace=False).tolist()) if n_events else set()
    segments, events = [], []
    for i in range(n):
        if i in slots:
            e = draw_event(rng)
            segments.append(Segment(width, height, codec, int(rng.integers(1000, 10**6)), e))
            events.append(Event(round(i * SEGMENT_S + e.start, 3), e.duration, e.depth, e.size))
        else:
            segments.append(Segment(width, height, codec, int(rng.choice(PLAIN_SEEDS))))
    return Clip(name, length, width, height, codec, segments, events)


def catalog(seed: int) -> list[Clip]:
    """Every clip of a full run, drawn in a fixed order (--quick keeps a subset of these)."""
    rng = np.random.default_rng(seed)
    clips = []
    for width, height in RESOLUTIONS:
        for length, count, n_events in LENGTHS:
            label = f"{length}s" if length < 60 else f"{length // 60}min"
            for c in range(count):
                tag = f"#{c + 1}" if count > 1 else ""
                name = f"{label}{tag} {height}p h264/mp4"
                clips.append(make_clip(rng, name, length, width, height, "libx264", n_events))
            if length in NO_EVENT_LENGTHS:
                name = f"{label} {height}p h264/mp4 no-event"
                clips.append(make_clip(rng, name, length, width, height, "libx264", 0))
    for codec, length, (width, height), n_events, scan in OTHER_CODECS:
        short = {"libx265": "hevc/mkv", "libvpx-vp9": "vp9/webm"}[codec]
        name = f"{length // 60}min {height}p {short}"
        clips.append(make_clip(rng, name, length, width, height, codec, n_events))
        clips[-1].scan = scan
    return clips


def encode_segment(segment: Segment, path: Path) -> float:
    started = time.monotonic()
    tmp = path.with_name("tmp_" + path.name)
    make_video(
        tmp,
        seconds=SEGMENT_S,
        fps=FPS,
        width=segment.width,
        height=segment.height,
        codec=segment.codec,
        seed=segment.seed,
        encoder_options=CODECS[segment.codec][1],
        events=[segment.event] if segment.event else [],
    )
    tmp.rename(path)
    return time.monotonic() - started


def remux(sources: list[Path], out: Path) -> None:
    """Concatenate same-settings segments by stream copy, shifting each one's timestamps."""
    tmp = out.with_name("tmp_" + out.name)
    with av.open(str(tmp), "w", format=None if out.suffix != ".webm" else "webm") as dst:
        ost = None
        for i, source in enumerate(sources):
            with av.open(str(source)) as src:
                ist = src.streams.video[0]
                if ost is None:
                    ost = dst.add_stream_from_template(ist)
                offset = round(i * SEGMENT_S / ist.time_base)
                # (the demuxer's empty flush packet left out)
                packets = [p for p in src.demux(ist) if p.size and p.pts is not None]
                # matroska stores no decode times: the demuxer leaves the first ones of a
                # stream with B-frames unset; give them one frame each before the first known
                known = next((j for j, p in enumerate(packets) if p.dts is not None), 0)
                tick = max(1, round(1 / (FPS * ist.time_base)))
                for j, packet in enumerate(packets):
                    if packet.dts is None:
                        packet.dts = (packets[known].dts or 0) - (known - j) * tick
                    packet.pts += offset
                    packet.dts += offset
                    packet.stream = ost
                    dst.mux(packet)
    tmp.rename(out)


def build(clips: list[Clip], scratch: Path, jobs: int) -> dict:
    """Encode the segments the clips need (in parallel) and remux the clips; all cached."""
    needed = {s: s.path(scratch) for c in clips for s in c.segments}
    todo = {s: p for s, p in needed.items() if not p.exists()}
    (scratch / "segments").mkdir(parents=True, exist_ok=True)
    (scratch / "clips").mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    if todo:
        cached = len(needed) - len(todo)
        say(f"encoding {len(todo)} segments of {SEGMENT_S} s ({cached} cached), {jobs} processes")
        with ProcessPoolExecutor(jobs) as pool:
            list(pool.map(encode_segment, todo, todo.values()))
    encode_s = time.monotonic() - started
    remux_s = {}
    for clip in clips:
        path = clip.path(scratch)
        if not path.exists():
            t = time.monotonic()
            remux([needed[s] for s in clip.segments], path)
            remux_s[clip.name] = round(time.monotonic() - t, 2)
            say(
                f"  built {clip.name}: {path.stat().st_size / 1e6:.1f} MB in {remux_s[clip.name]} s"
            )
    return {
        "segments_encoded": len(todo),
        "segments_cached": len(needed) - len(todo),
        "encode_wall_s": round(encode_s, 1),
        "remux_s": remux_s,
        "build_wall_s": round(time.monotonic() - started, 1),
    }


def probe_problems(clip: Clip, path: Path) -> list[str]:
    info = media.probe(path)
    problems = []
    if info.duration is None or abs(info.duration - clip.length_s) > 0.1:
        problems.append(f"duration {info.duration} != {clip.length_s}")
    if info.frame_count != clip.length_s * FPS:
        problems.append(f"frames {info.frame_count} != {clip.length_s * FPS}")
    if (info.width, info.height) != (clip.width, clip.height):
        problems.append(f"size {info.width}x{info.height}")
    return problems


def figure_seen(rgb: np.ndarray) -> bool:
    """Whether the crossing figure's orange stripes (235, 110, 25) are in the picture."""
    px = rgb.reshape(-1, 3).astype(np.int16)
    orange = (abs(px[:, 0] - 235) < 45) & (abs(px[:, 1] - 110) < 45) & (px[:, 2] < 80)
    return int(orange.sum()) >= 30


def frame_problems(clip: Clip, times: list[float], frames: list[np.ndarray]) -> list[str]:
    """The time bar must read each picked time modulo the segment; the figure must be seen
    exactly when an event covers the picked time."""
    problems = []
    for t, rgb in zip(times, frames, strict=True):
        local = t - SEGMENT_S * min(int(t // SEGMENT_S), clip.length_s // SEGMENT_S - 1)
        bar = read_time(rgb, SEGMENT_S)
        if abs(bar - local) > 1.5 / FPS + SEGMENT_S / rgb.shape[1]:
            problems.append(f"t={t:.3f}: bar reads {bar:.3f} s, expected {local:.3f}")
        covered = any(e.covers(t) for e in clip.events)
        if figure_seen(rgb) != covered:
            problems.append(f"t={t:.3f}: figure {'missing' if covered else 'seen without event'}")
    return problems


def full_scan(path: Path, joins: list[float], k: int = K, skeleton: int = 5, apart: float = 1.5):
    """The reference: every frame decoded; (times, reasons, frames) of its k picks."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        start = media._stream_start(stream)
        duration = media._header_duration(container, stream)
        times, motion, prev = [], [], None
        for frame in container.decode(stream):
            thumb = frame.to_ndarray(
                format="gray", width=64, height=36, interpolation="FAST_BILINEAR"
            )
            thumb = thumb.astype(np.int16)
            times.append(float(frame.time))
            motion.append(0.0 if prev is None else float(np.abs(thumb - prev).mean()))
            prev = thumb
        times, motion = np.array(times), np.array(motion)
        for j in joins:  # the cut at a join: scored as no change
            motion[np.abs(times - (start + j)) < 0.5 / FPS] = 0.0
        motion = np.convolve(motion, np.ones(5) / 5, mode="same")
        peaks: list[float] = []
        for i in np.argsort(-motion, kind="stable"):
            if len(peaks) == k - skeleton:
                break
            if all(abs(times[i] - p) >= apart for p in peaks):
                peaks.append(float(times[i]))
        targets = sorted(ev.uniform_targets(start, duration, skeleton) + peaks)
        picked = media._seek_and_decode(container, stream, targets)
        frames = [media._to_rgb(f, 640) for _, f in picked]
        reasons = [
            "event" if min(abs(t - p) for p in peaks) < 0.5 / FPS else "uniform" for t, _ in picked
        ]
        return [round(t - start, 3) for t, _ in picked], reasons, frames


def run_method(method: str, path: Path, joins: list[float]) -> dict:
    cpu, wall = time.process_time(), time.perf_counter()
    if method == "full-scan":
        times, reasons, frames = full_scan(path, joins)
    else:
        s = media.sample_frames(path, K, sampling=method)
        times, frames = s.timestamps, s.frames
        reasons = s.reasons or ["uniform"] * len(times)
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    return {"cpu_s": cpu, "wall_s": wall, "times": times, "reasons": reasons, "frames": frames}


def curve_cost(path: Path) -> float:
    """CPU seconds of the events mode's own work alone: the change curve and the choice,
    on an open file (what events adds to uniform, apart from where its targets land)."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        start = media._stream_start(stream)
        duration = media._header_duration(container, stream)
        cpu = time.process_time()
        ev.choose(start, duration, K, ev.change_curve(container, stream, start, duration))
        return time.process_time() - cpu


def caught_by(clip: Clip, times: list[float]) -> list[int]:
    return [i for i, e in enumerate(clip.events) if any(e.covers(t) for t in times)]


def measure(clip: Clip, path: Path, repeats: int, scan: bool) -> dict:
    joins = [i * SEGMENT_S for i in range(1, len(clip.segments))]
    runs: dict[str, list[dict]] = {"uniform": [], "events": [], "full-scan": []}
    warm = {m: run_method(m, path, joins) for m in ("uniform", "events")}
    curve = []
    for r in range(repeats):  # interleaved: u, e, e, u, ...
        for m in ("uniform", "events") if r % 2 == 0 else ("events", "uniform"):
            runs[m].append(run_method(m, path, joins))
        curve.append(curve_cost(path))
    if scan:
        for _ in range(repeats if clip.length_s <= 120 else 1):
            runs["full-scan"].append(run_method("full-scan", path, joins))
    row: dict = {
        "clip": clip.name,
        "length_s": clip.length_s,
        "resolution": f"{clip.width}x{clip.height}",
        "codec": clip.codec,
        "generated": [asdict(e) for e in clip.events],
        "curve_cpu_s": round(statistics.median(curve), 4),
        "problems": probe_problems(clip, path),
    }
    for m, done in runs.items():
        if not done:
            row[m] = None
            continue
        last = done[-1]
        if any(d["times"] != last["times"] for d in [*done, warm.get(m, last)]):
            row["problems"].append(f"{m}: picks differ between repeats")
        if len(last["times"]) > K:
            row["problems"].append(f"{m}: {len(last['times'])} frames for k={K}")
        row["problems"] += [f"{m} {p}" for p in frame_problems(clip, last["times"], last["frames"])]
        reasons = zip(last["times"], last["reasons"], strict=True)
        event_times = [t for t, why in reasons if why == "event"]
        row[m] = {
            "cpu_s": round(statistics.median(d["cpu_s"] for d in done), 4),
            "wall_s": round(statistics.median(d["wall_s"] for d in done), 4),
            "cpu_s_each": [round(d["cpu_s"], 4) for d in done],
            "times": last["times"],
            "reasons": last["reasons"],
            "caught": caught_by(clip, last["times"]),
            "event_frames": len(event_times),
            "event_frames_on_event": sum(
                any(e.covers(t) for e in clip.events) for t in event_times
            ),
        }
    missed = [i for i in range(len(clip.events)) if i not in row["uniform"]["caught"]]
    row["uniform_missed"] = missed
    row["events_caught_of_missed"] = [i for i in missed if i in row["events"]["caught"]]
    row["events_lost"] = [i for i in row["uniform"]["caught"] if i not in row["events"]["caught"]]
    row["feasible"] = min(len(missed), ev.event_slots(K))
    return row


COLUMNS = [  # (heading, width)
    ("clip", 31), ("uni CPU", 8), ("ev CPU", 7), ("ev/uni", 6), ("curve", 6), ("scan CPU", 8),
    ("wall u/e/scan", 17), ("caught u/e/scan", 15), ("u-miss->ev", 10), ("ev frames", 9),
]  # fmt: skip


def table(rows: list[dict]) -> list[str]:
    def line(cells):
        cells = zip(cells, COLUMNS, strict=True)
        return " ".join(
            f"{c:<{w}}" if i == 0 else f"{c:>{w}}" for i, (c, (_, w)) in enumerate(cells)
        )

    lines = [line([h for h, _ in COLUMNS])]
    lines.append("-" * len(lines[0]))
    for r in rows:
        u, e, f = r["uniform"], r["events"], r["full-scan"]
        n = len(r["generated"])
        lines.append(line([
            r["clip"], f"{u['cpu_s']:.3f}", f"{e['cpu_s']:.3f}", f"{e['cpu_s'] / u['cpu_s']:.2f}",
            f"{r['curve_cpu_s']:.3f}", f"{f['cpu_s']:.2f}" if f else "-",
            f"{u['wall_s']:.2f}/{e['wall_s']:.2f}/{f['wall_s']:.1f}" if f
            else f"{u['wall_s']:.2f}/{e['wall_s']:.2f}/-",
            f"{len(u['caught'])}/{len(e['caught'])}/{len(f['caught']) if f else '-'} of {n}",
            f"{len(r['events_caught_of_missed'])}/{len(r['uniform_missed'])}" if n else "-",
            f"{e['event_frames_on_event']}/{e['event_frames']}{'*' if len(e['times']) > K else ''}",
        ]))  # fmt: skip
    return lines


def summary(rows: list[dict]) -> dict:
    hit = [r for r in rows if r["generated"]]
    missed = sum(len(r["uniform_missed"]) for r in hit)
    caught = sum(len(r["events_caught_of_missed"]) for r in hit)
    feasible = sum(r["feasible"] for r in hit)
    scanned = [r for r in hit if r["full-scan"]]
    ratios = {r["clip"]: r["events"]["cpu_s"] / r["uniform"]["cpu_s"] for r in rows}
    worst = max(ratios, key=ratios.get)
    events_cpu = sum(r["events"]["cpu_s"] for r in rows)
    return {
        "events": sum(len(r["generated"]) for r in hit),
        "caught_uniform": sum(len(r["uniform"]["caught"]) for r in hit),
        "caught_events": sum(len(r["events"]["caught"]) for r in hit),
        "caught_full_scan": sum(len(r["full-scan"]["caught"]) for r in scanned),
        "events_in_scanned_clips": sum(len(r["generated"]) for r in scanned),
        "caught_events_in_scanned_clips": sum(len(r["events"]["caught"]) for r in scanned),
        "uniform_missed": missed,
        "events_caught_of_missed": caught,
        "catch_ratio": round(caught / missed, 3) if missed else None,
        "k_feasible_missed": feasible,
        "k_feasible_caught": min(caught, feasible),
        "k_feasible_ratio": round(min(caught, feasible) / feasible, 3) if feasible else None,
        "events_lost": sum(len(r["events_lost"]) for r in hit),
        "cpu_ratio_total": round(events_cpu / sum(r["uniform"]["cpu_s"] for r in rows), 3),
        "cpu_ratio_worst": [worst, round(ratios[worst], 3)],
        "curve_share_total": round(sum(r["curve_cpu_s"] for r in rows) / events_cpu, 3),
        "false_event_frames_no_event_clips": sum(
            r["events"]["event_frames"] for r in rows if not r["generated"]
        ),
        "event_frames_off_event_event_clips": sum(
            r["events"]["event_frames"] - r["events"]["event_frames_on_event"] for r in hit
        ),
        "problems": sum(len(r["problems"]) for r in rows),
    }


def footer(total: dict, args) -> list[str]:
    t = total
    scan_limit = f" up to {args.scan_max_s} s" if args.scan_max_s < 1800 else ""
    return [
        "",
        "CPU: median process CPU seconds per video (every thread) of --repeats runs, uniform and"
        " events interleaved; wall seconds beside. curve: CPU seconds of events mode's own work"
        " alone (change_curve + choose on an open file). Where events mode is cheaper than"
        " uniform its targets sit nearer keyframes (uniform's at x.5 s of a 1 s GOP decode"
        " ~15 frames each, a skeleton of 5 may land on keyframes): curve is the honest overhead.",
        f"scan: full-scan, {args.repeats} runs up to 2 min, one above, on clips with events"
        f"{scan_limit} (not on the 30-min HEVC/MKV: '-').",
        "caught u/e/scan: events with a picked frame inside them, by uniform / events /"
        " full-scan. u-miss->ev: of the events uniform misses, how many events mode catches."
        " ev frames: events-mode frames taken as 'event' that show an event / all of them (on a"
        f" no-event clip each is a false event frame); *: events mode returned more than k={K}"
        " frames (a PROBLEM below).",
        f"k=8 leaves events mode at most {ev.event_slots(K)} frames beyond its 5-frame skeleton:"
        " the 30-min H.264 clips carry 5 events, so at most 3 of them can be caught;"
        " 'k-feasible' counts at most 3 missed events a clip.",
        "",
        f"events {t['events']}: caught by uniform {t['caught_uniform']}, by events"
        f" {t['caught_events']}; in the clips full-scan ran on ({t['events_in_scanned_clips']}"
        f" events): full-scan {t['caught_full_scan']},"
        f" events {t['caught_events_in_scanned_clips']}",
        f"uniform missed {t['uniform_missed']}, events caught {t['events_caught_of_missed']}"
        f" of them ({t['catch_ratio']}); k-feasible {t['k_feasible_caught']} of"
        f" {t['k_feasible_missed']} ({t['k_feasible_ratio']}); target >= 0.9",
        f"events lost (caught by uniform, missed by events): {t['events_lost']}",
        f"events/uniform CPU: {t['cpu_ratio_total']} over all clips, worst"
        f" {t['cpu_ratio_worst'][1]} ({t['cpu_ratio_worst'][0]}); target <= 1.5;"
        f" curve share of events CPU {t['curve_share_total']}",
        f"event frames on no-event clips: {t['false_event_frames_no_event_clips']}; off any"
        f" event on clips with events: {t['event_frames_off_event_event_clips']}",
        f"check problems (probe, time bar, figure, frame count, repeats): {t['problems']}",
    ]


def profile_events(path: Path, top: int = 14) -> str:
    profiler = cProfile.Profile(time.process_time)  # process CPU: decoders' threads too
    profiler.enable()
    media.sample_frames(path, K, sampling="events")
    profiler.disable()
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(top)
    return "\n".join(line for line in out.getvalue().splitlines() if line.strip())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help=f"only clips up to {QUICK_MAX_S} s")
    parser.add_argument("--scratch", default="/tmp/fleetscribe-sampling-bench")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--scan-max-s", type=int, default=1800, help="full-scan up to this long")
    parser.add_argument("--jobs", type=int, default=2, help="processes encoding segments")
    parser.add_argument("--seed", type=int, default=18)
    parser.add_argument("--out", help="default benchmarks/results/sampling_cpu[_quick]")
    args = parser.parse_args()
    name = "sampling_cpu_quick" if args.quick else "sampling_cpu"
    out = Path(args.out or ROOT / "benchmarks/results" / name)
    scratch = Path(args.scratch)
    started = time.monotonic()
    clips = [c for c in catalog(args.seed) if not args.quick or c.length_s <= QUICK_MAX_S]
    sources = {
        p: hashlib.sha256((ROOT / p).read_bytes()).hexdigest()[:12]
        for p in ("video/events.py", "video/media.py")
    }
    say(
        f"sampling on {cpu_name()}, {os.cpu_count()} cores, Python {platform.python_version()},"
        f" PyAV {av.__version__} (FFmpeg {av.ffmpeg_version_info})"
    )
    say(f"{len(clips)} clips, k={K}, {args.repeats} repeats; sha256 of {sources}")
    built = build(clips, scratch, args.jobs)
    say(f"build: {json.dumps(built)}")
    rows = []
    for clip in clips:
        scan = bool(clip.events) and clip.scan and clip.length_s <= args.scan_max_s
        row = measure(clip, clip.path(scratch), args.repeats, scan)
        rows.append(row)
        say(
            json.dumps(
                {k: v for k, v in row.items() if k not in ("uniform", "events", "full-scan")}
            )
        )
        for m in ("uniform", "events", "full-scan"):
            if row[m]:
                say(f"  {m}: {json.dumps(row[m])}")
    lines = table(rows)
    total = summary(rows)
    lines += footer(total, args)
    say()
    for line in lines:
        say(line)
    for r in rows:
        for p in r["problems"]:
            say(f"PROBLEM {r['clip']}: {p}")
    profiles = {}
    for clip in clips:
        if clip.length_s == max(c.length_s for c in clips) and clip.events:
            say(f"\ncProfile, events mode, {clip.name} (process CPU s, by tottime):")
            profiles[clip.name] = profile_events(clip.path(scratch))
            say(profiles[clip.name])
    total_s = round(time.monotonic() - started, 1)
    say(f"\ntotal run time {total_s} s (build {built['build_wall_s']} s)")
    document = {
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "pyav": av.__version__,
        "ffmpeg": av.ffmpeg_version_info,
        "args": vars(args),
        "source_sha256": sources,
        "k": K,
        "segment_s": SEGMENT_S,
        "codecs": CODECS,
        "build": built,
        "rows": rows,
        "summary": total,
        "profiles": profiles,
        "total_s": total_s,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(document, indent=1) + "\n")
    out.with_suffix(".txt").write_text("\n".join(lines) + "\n")
    out.with_suffix(".log").write_text("\n".join(LOG) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
