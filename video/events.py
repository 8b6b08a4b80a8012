"""Event-aware frame choice: where a clip changes most, read from what the container gives
without decoding.

An inter-coded stream (H.264, HEVC, VP9, AV1, MPEG-4) codes each frame as the change from
frames before it, so its packet sizes over time are a motion curve for free: a pedestrian
stepping out, a cyclist cutting in or a light changing grows the packets of the half
second it lasts. MP4/MOV files list every packet's size and time in their index
(`stream.index_entries`: nothing is read beyond the headers); other containers are demuxed
(packets read, none decoded). An intra-only stream (MJPEG, ProRes: every packet a
keyframe) has no motion in its sizes; there a few hundred tiny thumbnails are decoded
instead, and the change is their difference from one to the next.

The curve is the mean packet size over a short window (`WINDOW_S`), keyframes left out,
divided by the larger of the medians just before and just after it (`BASELINE_S` each
side). So a steady rise or fall (the car speeds up, the frame rate changes, it gets dark)
scores about 1 on both sides of the step, and only a bump that stands above both sides
scores high: something that came and went.

`choose` keeps a uniform skeleton over the clip and gives up to `event_slots(k)` of the
k frames to the highest bumps above `THRESHOLD` that no skeleton frame already sees. A
clip without such bumps gets exactly the uniform frames.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass

import av
import numpy as np

log = logging.getLogger(__name__)

WINDOW_S = 0.5  # what one change is averaged over: about an event's length
BASELINE_S = 4.0  # what it is compared with, each side
STEP_S = 0.1  # the curve's resolution
RATE_S = 2.0  # the frame rate is counted over this long
MIN_SIDE_S = 1.0  # near the clip's ends a side needs this much to compare with
ONE_SIDED = 2.0  # how much more a bump near an end must stand out
THRESHOLD = 1.3  # a bump at least 30% above both sides is an event
SEPARATION_S = 1.5  # two event frames are at least this far apart
COVERED_S = 0.3  # a skeleton frame this close to a bump already shows it
MIN_PACKETS = 20  # fewer packets than this: no curve, uniform frames
INTRA_SHARE = 0.9  # this share of keyframes or more: an intra-only stream
THUMB_RATE = 8.0  # thumbnails a second for an intra-only stream
THUMB_SIZE = (64, 36)
MAX_THUMBS = 3000  # at most this many decoded for one file (30 min at 1.7 a second)


@dataclass(frozen=True)
class Choice:
    """One frame to take: its target time (s, stream time), why, and its change score."""

    t: float
    reason: str  # "uniform" or "event"
    score: float | None = None


@dataclass
class Curve:
    """Change scores on a regular grid of stream times; `source` says what they came from."""

    times: np.ndarray
    scores: np.ndarray
    source: str  # "packets" (index or demux) or "thumbnails"

    def at(self, t: float) -> float:
        """The score at time t (nearest grid point)."""
        i = int(np.clip(np.searchsorted(self.times, t), 0, len(self.times) - 1))
        if i > 0 and abs(self.times[i - 1] - t) < abs(self.times[i] - t):
            i -= 1
        return float(self.scores[i])


class NoCurve(Exception):
    """The file gives nothing to score change by; the message says why (stored as the note)."""


def event_slots(k: int) -> int:
    """How many of k frames may go to events: 3 of 8, 4 of 12; none below 3 frames."""
    return 0 if k < 3 else max(1, round(k * 3 / 8))


def uniform_targets(start: float, duration: float, k: int) -> list[float]:
    """The centres of k equal slices of [start, start + duration]."""
    return [start + (i + 0.5) * duration / k for i in range(k)]


def change_curve(container, stream, start: float, duration: float, rows=None) -> Curve:
    """The change curve of `stream` (NoCurve says why there is none). `rows`: its packets'
    (time, size, keyframe), when the caller has demuxed them already."""
    times, sizes, keys = _packets(container, stream, start, rows)
    if len(times) < MIN_PACKETS:
        raise NoCurve(f"only {len(times)} packets with timestamps")
    if keys.mean() >= INTRA_SHARE:
        times, sizes = _thumbnail_changes(container, stream, start, duration)
        return _curve(times, sizes, start, duration, "thumbnails")
    sizes = sizes.astype(np.float64)
    # keyframes come on a schedule and are many times larger: left out, not a change
    inter = ~keys
    times, sizes = times[inter], sizes[inter]
    return _curve(times, sizes, start, duration, "packets")


def _packets(
    container, stream, start: float, rows=None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(times, sizes, keyframe flags) of the stream's packets, in time order: `rows` if
    given, else from the MP4/MOV index, else demuxed."""
    entries = stream.index_entries
    usable = entries is not None and len(entries) >= max(MIN_PACKETS, stream.frames or 0)
    if rows is None and usable:
        # an MP4/MOV index: every sample's decode time, size and flags, nothing read
        rows = [(e.timestamp, e.size, e.is_keyframe) for e in entries if not e.is_discard]
        table = np.array(rows, dtype=np.float64)
        ts = table[:, 0]
        # decode times run ahead of presentation by the reorder delay: start them at 0
        times = start + (ts - ts.min()) * float(stream.time_base)
        return _ordered(times, table[:, 1], table[:, 2] > 0)
    if rows is None:
        rows = []
        tb = float(stream.time_base) if stream.time_base else None
        for packet in container.demux(stream):
            if packet.size and packet.pts is not None and tb:
                rows.append((packet.pts * tb, packet.size, packet.is_keyframe))
        container.seek(0)
    if not rows:
        return np.empty(0), np.empty(0), np.empty(0, bool)
    table = np.array(rows, dtype=np.float64)
    return _ordered(table[:, 0], table[:, 1], table[:, 2] > 0)


def _ordered(times, sizes, keys):
    order = np.argsort(times, kind="stable")
    return times[order], sizes[order], keys[order]


def _thumbnail_changes(container, stream, start, duration) -> tuple[np.ndarray, np.ndarray]:
    """(times, change) from tiny grey thumbnails of an intra-only stream: each packet
    decodes alone, so THUMB_RATE of them a second are decoded, the rest only demuxed."""
    rate = min(THUMB_RATE, MAX_THUMBS / max(duration, 1e-3))
    tb = float(stream.time_base)
    times, changes = [], []
    prev, next_t = None, -1.0
    try:
        for packet in container.demux(stream):
            if not packet.size or packet.pts is None:
                continue
            t = packet.pts * tb
            if t < next_t:
                continue
            next_t = t + 1.0 / rate
            for frame in packet.decode():
                thumb = frame.to_ndarray(
                    format="gray", width=THUMB_SIZE[0], height=THUMB_SIZE[1]
                ).astype(np.float32)
                if prev is not None:
                    times.append(t)
                    changes.append(float(np.abs(thumb - prev).mean()) + 0.25)
                prev = thumb
    except av.FFmpegError:
        pass  # a damaged tail: score what decoded
    container.seek(0)
    if len(times) < MIN_PACKETS // 2:
        raise NoCurve(f"only {len(times)} thumbnails decoded")
    return np.array(times), np.array(changes)


def _curve(times, values, start: float, duration: float, source: str) -> Curve:
    if len(times) < MIN_PACKETS // 2:
        raise NoCurve("too few inter-coded packets")
    grid = np.arange(start, start + duration + STEP_S / 2, STEP_S)
    sums = np.concatenate([[0.0], np.cumsum(values)])
    lo = np.searchsorted(times, grid - WINDOW_S / 2)
    hi = np.searchsorted(times, grid + WINDOW_S / 2)
    count = hi - lo
    mean = _fill(np.where(count > 0, (sums[hi] - sums[lo]) / np.maximum(count, 1), np.nan))
    # bytes a second, not a packet: where the frame rate changes (VFR) fewer, larger
    # packets are not a change. The rate is counted over a wider window than the sizes,
    # so a window that holds one packet more or less does not jitter the level.
    wide = np.searchsorted(times, grid + RATE_S / 2) - np.searchsorted(times, grid - RATE_S / 2)
    span = np.minimum(grid + RATE_S / 2, times[-1]) - np.maximum(grid - RATE_S / 2, times[0])
    rate = wide / np.maximum(span, STEP_S)
    level = mean * rate
    n = max(1, round(BASELINE_S / STEP_S))
    gap = max(1, round(WINDOW_S / STEP_S))
    before, after = _sides(level, n, gap)
    base = np.fmax(before, after)  # the larger side; one side where the other is missing
    scores = np.where(base > 0, level / np.where(base > 0, base, 1.0), 1.0)
    # with one side only, a trend (the clip starts in motion) looks like a bump: such a
    # point must stand out by ONE_SIDED more
    one_sided = np.isnan(before) | np.isnan(after)
    scores = np.where(one_sided, 1.0 + (scores - 1.0) / ONE_SIDED, scores)
    return Curve(grid, np.nan_to_num(scores, nan=1.0), source)


def _sides(level: np.ndarray, n: int, gap: int) -> tuple[np.ndarray, np.ndarray]:
    """Per point i, the median of the n levels ending `gap` points before it and of the n
    starting `gap` after it. Near the clip's ends a side is shorter; shorter than
    MIN_SIDE_S it is missing (NaN), and where both are, the point scores 1."""
    size = len(level)
    before = np.full(size, np.nan)
    after = np.full(size, np.nan)
    least = max(1, round(MIN_SIDE_S / STEP_S))
    if size >= n:
        medians = np.median(np.lib.stride_tricks.sliding_window_view(level, n), axis=1)
        idx = np.arange(size)
        b0, a0 = idx - gap - n + 1, idx + gap
        ok = b0 >= 0
        before[ok] = medians[b0[ok]]
        ok = a0 + n <= size
        after[ok] = medians[a0[ok]]
    ends = min(size, n + gap)
    for i in sorted({*range(ends), *range(size - ends, size)}):  # the ends: partial windows
        if np.isnan(before[i]):
            lo, hi = max(0, i - gap - n + 1), i - gap + 1
            if hi - lo >= least:
                before[i] = np.median(level[lo:hi])
        if np.isnan(after[i]):
            lo, hi = i + gap, min(size, i + gap + n)
            if hi - lo >= least:
                after[i] = np.median(level[lo:hi])
    return before, after


def _fill(level: np.ndarray) -> np.ndarray:
    """Grid points with no packet in their window take the nearest known level."""
    known = ~np.isnan(level)
    if known.all() or not known.any():
        return np.nan_to_num(level, nan=0.0)
    idx = np.arange(len(level))
    return np.interp(idx, idx[known], level[known])


def choose(start: float, duration: float, k: int, curve: Curve) -> list[Choice]:
    """k frame targets: a uniform skeleton plus up to `event_slots(k)` event frames at the
    highest bumps of `curve` that the skeleton does not already show."""
    peaks = _peaks(curve, event_slots(k))
    skeleton = uniform_targets(start, duration, k - len(peaks))
    choices = []
    for t in skeleton:
        # a bump that this skeleton frame already shows (within COVERED_S) takes its place
        near = [p for p in peaks if abs(p[0] - t) <= COVERED_S]
        if near:
            best = max(near, key=lambda p: p[1])
            choices.append(Choice(best[0], "event", round(best[1], 3)))
        else:
            choices.append(Choice(t, "uniform", round(curve.at(t), 3)))
    taken = {c.t for c in choices}
    choices += [Choice(t, "event", round(s, 3)) for t, s in peaks if t not in taken]
    # the slots of bumps that took a skeleton frame's place go to the widest gaps left
    while len(choices) < k:
        t = _widest_gap(sorted(c.t for c in choices), start, start + duration)
        choices.append(Choice(t, "uniform", round(curve.at(t), 3)))
    return sorted(choices, key=lambda c: c.t)


def _widest_gap(times: list[float], start: float, end: float) -> float:
    """The middle of the widest gap between frames; an end's gap counts double (a frame
    there would sit at its middle, as the skeleton's end frames do)."""
    gaps = [(2 * (times[0] - start), start + (times[0] - start) / 2)]
    gaps += [(b - a, (a + b) / 2) for a, b in itertools.pairwise(times)]
    gaps.append((2 * (end - times[-1]), end - (end - times[-1]) / 2))
    return max(gaps)[1]


def _peaks(curve: Curve, slots: int) -> list[tuple[float, float]]:
    """Up to `slots` (time, score) local maxima above THRESHOLD, highest first, apart."""
    if slots <= 0:
        return []
    order = np.argsort(-curve.scores, kind="stable")
    peaks: list[tuple[float, float]] = []
    for i in order:
        score = float(curve.scores[i])
        if score < THRESHOLD or len(peaks) >= slots:
            break
        t = float(curve.times[i])
        if all(abs(t - p) >= SEPARATION_S for p, _ in peaks):
            peaks.append((t, score))
    return peaks
