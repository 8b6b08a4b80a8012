"""Short synthetic driving-like videos for the demo and the tests (PyAV + numpy, no torch).

Each frame shows a sky, a grey road with dashed lane lines and a few coloured cars that
move from frame to frame. Two marks make frames checkable after a round trip through a
codec: a red block in the top-left corner of the upright picture (orientation) and a
white bar along the bottom whose length encodes the frame's time (`read_time` reads it
back).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

BAR_FRACTION = 0.1  # the time bar's share of the picture height, at the bottom
MARKER_RGB = (255, 0, 0)
_HORIZON = 0.45  # the horizon's share of the picture height

# Tiny pictures: favour speed, keep enough quality for the marks to survive.
_ENCODER_OPTIONS: dict[str, dict[str, str]] = {
    "libx264": {"preset": "veryfast", "crf": "20"},
    "libx265": {"preset": "ultrafast", "crf": "22", "x265-params": "log-level=error"},
    "libvpx": {"deadline": "realtime", "cpu-used": "8", "crf": "10", "b": "1M"},
    "libvpx-vp9": {"deadline": "realtime", "cpu-used": "8", "crf": "20", "b": "0"},
    "libsvtav1": {"preset": "10", "crf": "30"},
    "mpeg4": {"qscale": "3"},
    "mjpeg": {"qscale": "3"},
}
_PIX_FMT = {"mjpeg": "yuvj420p", "prores": "yuv422p10le", "prores_ks": "yuv422p10le"}
_LIVE_FORMATS = ("matroska", "webm")


@dataclass(frozen=True)
class Event:
    """A short event drawn into a clip: an object (a pedestrian, a cyclist) that crosses the
    road in front of the camera from `start` for `duration` seconds, then is gone.

    `depth` places it (0 at the horizon, 1 at the bottom of the picture); `size` scales it
    (1.0: about a third of the picture high at depth 0.8, a person a few metres ahead)."""

    start: float
    duration: float
    depth: float = 0.8
    size: float = 1.0
    rgb: tuple[int, int, int] = (235, 110, 25)

    @property
    def end(self) -> float:
        return self.start + self.duration

    def covers(self, t: float) -> bool:
        """Whether a frame at time t shows the object."""
        return self.start <= t < self.end


@dataclass(frozen=True)
class _Car:
    lane: float  # -1 left lane, 0 middle, 1 right, as a share of a lane's width
    depth: float  # 0 at the horizon, 1 at the bottom of the picture
    speed: float  # change of depth per second (negative: pulling away)
    rgb: tuple[int, int, int]


def frame_times(*, seconds: float = 2.0, fps: float = 10, vfr: bool = False) -> list[float]:
    """The frame times (s, from 0) that `make_video` writes, millisecond-exact.

    With `vfr`, the first half of the clip runs at twice `fps` and the second half at half
    of it, so picking frames by index and picking them by time give different answers.
    """
    if vfr:
        times, t = [], 0.0
        while t < seconds - 1e-9:
            times.append(round(t, 3))
            t += 0.5 / fps if t < seconds / 2 else 2.0 / fps
        return times
    return [round(i / fps, 3) for i in range(max(1, round(seconds * fps)))]


def read_time(rgb: np.ndarray, seconds: float) -> float:
    """The frame time encoded by the bottom bar of an upright RGB frame (any scale)."""
    h, w = rgb.shape[:2]
    row = rgb[min(h - 1, int(h * (1 - BAR_FRACTION / 2))), :, :].astype(np.int32)
    lit = int((row.mean(axis=1) > 128).sum())
    return lit / w * seconds


def has_marker(rgb: np.ndarray) -> bool:
    """Whether the red orientation block sits in the top-left corner (and only there)."""

    def red(block: np.ndarray) -> bool:
        r, g, b = block.reshape(-1, 3).astype(np.int32).mean(axis=0)
        return r > 150 and g < 90 and b < 90

    h, w = rgb.shape[:2]
    s = max(1, _marker_side(w, h) // 3)  # the middle of the block, clear of chroma blur
    corners = {
        "tl": rgb[s : 2 * s, s : 2 * s],
        "tr": rgb[s : 2 * s, w - 2 * s : w - s],
        "bl": rgb[h - 2 * s : h - s, s : 2 * s],
        "br": rgb[h - 2 * s : h - s, w - 2 * s : w - s],
    }
    return red(corners["tl"]) and not any(red(c) for k, c in corners.items() if k != "tl")


def _marker_side(w: int, h: int) -> int:
    return max(3, min(w, h) // 5)


def _cars(rng: np.random.Generator, count: int) -> list[_Car]:
    palette = [(30, 90, 220), (240, 200, 20), (240, 240, 240), (20, 160, 60), (150, 60, 200)]
    # one car a lane: two in one lane would pass through each other, a sudden change
    lanes = rng.permutation([-1.0, 0.0, 1.0])[: min(count, 3)]
    return [
        _Car(
            lane=float(lane),
            depth=float(rng.uniform(0.15, 0.8)),
            speed=float(rng.uniform(-0.25, 0.25)),
            rgb=palette[int(rng.integers(len(palette)))],
        )
        for lane in lanes
    ]


def _background(w: int, h: int, night: bool) -> tuple[np.ndarray, int, np.ndarray, np.ndarray]:
    """(picture, horizon row, road left edge per row, road right edge per row)."""
    img = np.empty((h, w, 3), np.float32)
    y0 = int(h * _HORIZON)
    sky_top, sky_low = ((5, 5, 20), (25, 25, 50)) if night else ((70, 130, 210), (170, 200, 235))
    ground = (15, 25, 15) if night else (70, 120, 60)
    mix = np.linspace(0.0, 1.0, max(1, y0))[:, None]
    img[:y0] = (np.array(sky_top) * (1 - mix) + np.array(sky_low) * mix)[:, None, :]
    img[y0:] = ground
    rows = np.arange(h)
    p = np.clip((rows - y0) / max(1, h - y0), 0.0, 1.0)  # 0 at the horizon, 1 at the bottom
    half = (0.03 + 0.42 * p) * w
    left, right = w / 2 - half, w / 2 + half
    cols = np.arange(w)[None, :]
    road = (cols >= left[:, None]) & (cols < right[:, None]) & (rows[:, None] >= y0)
    img[road] = (35, 35, 40) if night else (110, 110, 115)
    return img, y0, left, right


def _draw(
    base, y0, left, right, cars: list[_Car], t: float, seconds: float, night: bool, events=()
):
    img = base.copy()
    h, w = img.shape[:2]
    rows = np.arange(y0 + 1, h)
    p = (rows - y0) / max(1, h - y0)
    lane_w = (right[rows] - left[rows]) / 3
    # dashes: evenly spaced in 1/p (road distance), scrolling towards the viewer
    dashed = np.mod(1.0 / p * 0.8 - t * 3.0, 1.0) < 0.5
    line = (200, 200, 120) if night else (245, 245, 245)
    for k in (1, 2):
        x = left[rows] + k * lane_w
        half = np.maximum(0.5, lane_w * 0.04)
        for y, xc, hw, on in zip(rows, x, half, dashed, strict=True):
            if on:
                img[y, int(xc - hw) : int(np.ceil(xc + hw))] = line
    for car in sorted(cars, key=lambda c: _car_depth(c, t)):
        d = _car_depth(car, t)
        y = int(y0 + d * (h - y0))
        lw = (right[min(y, h - 1)] - left[min(y, h - 1)]) / 3
        cx = w / 2 + car.lane * lw
        cw, ch = max(2, int(lw * 0.7)), max(2, int(lw * 0.5))
        x1 = int(cx - cw / 2)
        img[max(y0, y - ch) : y, max(0, x1) : max(0, x1 + cw)] = car.rgb
        if night:  # tail lights
            img[max(y0, y - 2) : y, max(0, x1) : max(0, x1 + 2)] = (255, 60, 40)
            img[max(y0, y - 2) : y, max(0, x1 + cw - 2) : max(0, x1 + cw)] = (255, 60, 40)
    for event in events:
        if event.covers(t):
            _draw_crossing(img, y0, left, right, event, (t - event.start) / event.duration)
    bar = max(2, round(h * BAR_FRACTION))
    img[h - bar :] = 0
    img[h - bar :, : round(w * t / seconds)] = 255
    s = _marker_side(w, h)
    img[:s, :s] = MARKER_RGB
    return img.astype(np.uint8)


def _draw_crossing(img, y0, left, right, event: Event, progress: float) -> None:
    """The event's object, `progress` (0..1) of the way across the road, left to right: a
    walking figure with a striped body and legs that swing, so it has the texture and the
    changing shape of a person or a cyclist rather than a flat block."""
    h = img.shape[0]
    y = min(h - 1, int(y0 + event.depth * (h - y0)))
    road = right[y] - left[y]
    ph = max(6, int((h - y0) * 0.6 * event.depth * event.size))
    pw = max(3, int(ph * 0.35))
    x = int(left[y] - pw + progress * (road + pw))
    top, legs = y - ph, y - ph // 3
    body = img[max(0, top) : max(0, legs), max(0, x) : max(0, x + pw)]
    stripe = max(1, ph // 10)
    rows = (np.arange(body.shape[0]) // stripe) % 2 == 0
    body[rows] = event.rgb
    body[~rows] = (40, 40, 60)
    head = max(1, pw // 2)
    img[max(0, top) : max(0, top + head), max(0, x) : max(0, x + pw)] = (200, 160, 130)
    swing = int(pw * 0.6 * np.sin(progress * 12 * np.pi))  # legs: about six strides
    leg_w = max(1, pw // 4)
    for foot in (x + pw // 4 + swing, x + 3 * pw // 4 - swing):
        img[max(0, legs) : y, max(0, foot - leg_w // 2) : max(0, foot + leg_w - leg_w // 2)] = (
            30,
            30,
            40,
        )


def _car_depth(car: _Car, t: float) -> float:
    # back and forth between 0.1 and 0.95 (a triangle wave): a car never jumps, so the only
    # sudden change in a clip is an event drawn on purpose
    phase = np.mod(car.depth + car.speed * t - 0.1, 1.7)
    return 0.1 + (phase if phase <= 0.85 else 1.7 - phase)


def make_video(
    path: str | os.PathLike,
    *,
    seconds: float = 2.0,
    fps: float = 10,
    width: int = 160,
    height: int = 90,
    codec: str = "libx264",
    container: str | None = None,
    vfr: bool = False,
    rotation: int = 0,
    seed: int = 0,
    pix_fmt: str | None = None,
    no_duration: bool = False,
    night: bool = False,
    encoder_options: dict[str, str] | None = None,
    muxer_options: dict[str, str] | None = None,
    events: list[Event] | tuple[Event, ...] = (),
) -> Path:
    """Write one synthetic driving clip and return its path.

    `width` x `height` is the upright (displayed) picture. `rotation` (degrees,
    counter-clockwise, as `VideoFrame.rotation` reads it back) is stored as a display
    matrix, with the pixels turned the other way so the clip displays upright.
    `no_duration` writes a live matroska/webm file whose headers give no duration.
    `container` is an ffmpeg format name (guessed from the suffix when None);
    `encoder_options` are laid over this module's defaults for `codec`; `muxer_options` go
    to the container (e.g. {"movflags": "+faststart"}); `events` are drawn in (`Event`).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if rotation % 90:
        raise ValueError(f"rotation must be a multiple of 90, not {rotation}")
    turns = (rotation // 90) % 4
    stored_w, stored_h = (height, width) if turns % 2 else (width, height)
    times = frame_times(seconds=seconds, fps=fps, vfr=vfr)
    rng = np.random.default_rng(seed)
    cars = _cars(rng, int(rng.integers(2, 5)))
    base, y0, left, right = _background(width, height, night)

    # "live" makes the matroska muxer skip the duration and the seek index (cues)
    container_options = {**(muxer_options or {}), **({"live": "1"} if no_duration else {})}
    with av.open(str(path), mode="w", format=container, container_options=container_options) as out:
        fmt = out.format.name
        if no_duration and fmt not in _LIVE_FORMATS:
            raise ValueError(f"no_duration needs a matroska or webm container, not {fmt}")
        rate = Fraction(fps).limit_denominator(1001)
        stream = out.add_stream(codec, rate=rate)
        stream.width, stream.height = stored_w, stored_h
        stream.pix_fmt = pix_fmt or _PIX_FMT.get(codec, "yuv420p")
        # constant rate: one tick a frame (AVI, being constant-rate, would otherwise write a
        # null frame per unused tick); variable rate: millisecond ticks
        time_base = Fraction(1, 1000) if vfr else 1 / rate
        stream.codec_context.time_base = time_base
        stream.time_base = time_base
        defaults = dict(_ENCODER_OPTIONS.get(codec, {}))
        if vfr and codec == "libx264":
            # With B-frames the mp4 muxer sums durations from decode-order timestamps, which
            # lag at the switch to the slow half: the header would claim 1.6 s of a 2 s clip.
            defaults["bf"] = "0"
        stream.options = {**defaults, **(encoder_options or {})}
        if turns:
            stream.set_display_rotation(rotation)
        ticks = [round(t / time_base) for t in times]
        ends = [*ticks[1:], round(max(seconds, times[-1] + 1 / fps) / time_base)]
        for t, pts, end in zip(times, ticks, ends, strict=True):
            upright = _draw(base, y0, left, right, cars, t, seconds, night, events)
            stored = np.ascontiguousarray(np.rot90(upright, k=-turns)) if turns else upright
            frame = av.VideoFrame.from_ndarray(stored, format="rgb24")
            frame.pts = pts
            # each frame lasts until the next; the last one's sets where the headers say
            # the clip ends
            frame.duration = end - pts
            frame.time_base = time_base
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    return path


# The demo's variety: (file name, make_video keywords).
_SAMPLES: list[tuple[str, dict]] = [
    ("highway_day.mp4", {"codec": "libx264"}),
    ("city_vp9.webm", {"codec": "libvpx-vp9"}),
    ("night_drive.mkv", {"codec": "libx264", "night": True}),
    ("dashcam_mpeg4.avi", {"codec": "mpeg4"}),
    # a phone held upright: landscape sensor pixels, displayed turned 90° clockwise
    ("phone_rotated.mov", {"codec": "libx264", "rotation": 270, "width": 90, "height": 160}),
    ("variable_rate.mp4", {"codec": "libx264", "vfr": True}),
    ("rural_hevc.mkv", {"codec": "libx265"}),
    ("dusk_vp9.mkv", {"codec": "libvpx-vp9", "night": True, "seconds": 3.0}),
]


def make_clips(directory: str | os.PathLike, count: int = 6, seed: int = 0) -> list[Path]:
    """Write `count` varied sample clips (containers, codecs, night, VFR, rotated phone)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        name, kwargs = _SAMPLES[i % len(_SAMPLES)]
        if i >= len(_SAMPLES):
            stem, suffix = name.rsplit(".", 1)
            name = f"{stem}_{i // len(_SAMPLES)}.{suffix}"
        paths.append(make_video(directory / name, seed=seed + i, **kwargs))
    return paths


def distinct_clips(folder, count: int, *, variants: int = 16, per_folder: int = 100, **clip):
    """`count` small MP4 clips under `folder` (tests and benchmarks: an archive of any
    size; `per_folder` a subfolder, named vNNNN.mp4),
    every one a real decodable video with bytes of its own, written far faster than
    `count` encodes: `variants` clips are encoded by `producer.clips.make_video` (seeds 0..:
    different cars and motion, `clip` its keywords), and file i is variant i % `variants`
    with an ISO BMFF 'free' box carrying i appended after its boxes. Readers skip 'free'
    boxes, so the file probes and decodes as its variant does, but its sha256 is its own:
    the producer, which dedupes by content, records `count` distinct videos."""
    import struct
    import tempfile

    folder = Path(folder)
    with tempfile.TemporaryDirectory() as scratch:  # outside `folder`: not enqueued
        templates = [
            make_video(Path(scratch) / f"variant{k:02d}.mp4", seed=k, **clip).read_bytes()
            for k in range(min(variants, count))
        ]
    paths = []
    for i in range(count):
        payload = f"fleetscribe test clip {i}".encode()
        box = struct.pack(">I4s", 8 + len(payload), b"free") + payload
        path = folder / f"{i // per_folder:02d}" / f"v{i:04d}.mp4"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(templates[i % len(templates)] + box)
        paths.append(path)
    return paths
