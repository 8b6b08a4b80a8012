"""Video through PyAV: probe a file (is it usable, and what is it) and sample frames by
timestamp.

Sampling seeks to each target time instead of decoding the whole file, so a half-hour 4K
file costs k short decodes. Timestamps come from the stream, so variable frame rate is
handled; files whose headers give no duration (live mkv/webm, raw streams) are measured
by demuxing packets without decoding them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import av
import numpy as np

from video import events
from video.errors import VideoError
from video.files import check_file

MAX_SIDE = 8192  # larger frames are refused: no dash-cam records them, decoders choke on them
MAX_PIXELS = 8192 * 4320  # 35.4 megapixels: DCI 8K; a larger picture is refused too
# Reaching a sampled time costs every frame decoded from the keyframe before it. Dash-cams
# write a keyframe every second or two; a file that needs more than this many pixels
# decoded to reach one time (about 4,000 frames of 1080p or 1,000 of 4K) is refused rather
# than decoded for hours: e.g. a static picture with one keyframe, a few MB that decode to
# terabytes (a decompression bomb).
MAX_PIXELS_PER_SEEK = 8 * 2**30
_MAX_PACKETS_TO_FIRST_FRAME = 600
# Within this many seconds ahead of the decoder, decoding on is cheaper than a seek.
_SEEK_GAP_S = 2.0


@dataclass
class VideoInfo:
    """What probing learned about a usable video. width/height are as displayed."""

    path: str
    bytes: int
    duration: float | None
    codec: str
    container: str
    width: int
    height: int
    fps: float | None
    rotation: int = 0
    frame_count: int | None = None


SAMPLING_MODES = ("uniform", "events")


@dataclass
class SampledVideo:
    """k (or fewer, for very short files) upright RGB frames and their stream times.

    `sampling` is the mode that chose them ("uniform" or "events"); per frame, `reasons`
    says why it was taken ("uniform" or "event") and `scores` its change score (None when
    no change curve was made). `note` says why "events" was asked but "uniform" used."""

    info: VideoInfo
    frames: list[np.ndarray] = field(repr=False)
    timestamps: list[float]
    sampling: str = "uniform"
    reasons: list[str] = field(default_factory=list)
    scores: list[float | None] = field(default_factory=list)
    note: str | None = None

    def choices(self) -> list[dict]:
        """One dict a frame, as stored: {"t": s, "reason": "uniform"|"event", "score": x}."""
        reasons = self.reasons or ["uniform"] * len(self.timestamps)
        scores = self.scores or [None] * len(self.timestamps)
        return [
            {"t": t, "reason": r, "score": sc}
            for t, r, sc in zip(self.timestamps, reasons, scores, strict=True)
        ]


def _open(path: str) -> av.container.InputContainer:
    try:
        return av.open(path, mode="r", metadata_errors="ignore")
    except av.error.InvalidDataError:
        # ffmpeg logs "moov atom not found" but raises a bare "invalid data" for an MP4 cut
        # before its index was written, so look at the boxes ourselves
        if _mp4_without_moov(path):
            raise VideoError("truncated: the MP4 index (moov atom) is missing") from None
        raise VideoError("not a video: ffmpeg found no known container format") from None
    except PermissionError:
        raise VideoError("cannot read: permission denied") from None
    except av.FFmpegError as e:
        text = str(e).lower()
        if "moov atom not found" in text:
            raise VideoError("truncated: the MP4 index (moov atom) is missing") from None
        raise VideoError(f"not a usable video: {_short(e)}") from None


_MP4_FIRST_BOXES = {b"ftyp", b"moov", b"mdat", b"free", b"skip", b"wide", b"pnot", b"uuid"}


def _mp4_without_moov(path: str) -> bool:
    """Whether `path` starts as an MP4/MOV file but no top-level moov box is in it."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            pos, boxes = 0, 0
            while pos + 8 <= size:
                f.seek(pos)
                head = f.read(16)
                box_size, kind = int.from_bytes(head[:4], "big"), head[4:8]
                if boxes == 0 and kind not in _MP4_FIRST_BOXES:
                    return False
                if kind == b"moov":
                    return False
                boxes += 1
                if box_size == 1 and len(head) == 16:  # 64-bit size follows the type
                    box_size = int.from_bytes(head[8:16], "big")
                if box_size < 8:  # 0: the box runs to the end of the file
                    break
                pos += box_size
    except OSError:
        return False
    return boxes > 0


def _short(e: Exception) -> str:
    text = getattr(e, "strerror", None) or str(e)
    return text.strip().splitlines()[0][:200] if text.strip() else type(e).__name__


def _video_stream(container: av.container.InputContainer) -> av.video.stream.VideoStream:
    streams = [
        s
        for s in container.streams.video
        if not (s.disposition & av.stream.Disposition.attached_pic)
    ]
    if not streams:
        if container.streams.audio:
            raise VideoError("audio only: the file has no video stream")
        raise VideoError("no video stream in the file")
    stream = streams[0]
    if stream.codec_context is None:
        raise VideoError(f"unsupported codec: no decoder for {stream.codec.name or 'unknown'}")
    return stream


def _stream_start(stream) -> float:
    if stream.start_time is not None and stream.time_base:
        return float(stream.start_time * stream.time_base)
    return 0.0


def _header_duration(container, stream) -> float | None:
    if stream.duration and stream.time_base:
        return float(stream.duration * stream.time_base)
    if container.duration and container.duration > 0:
        return container.duration / av.time_base
    return None


def _scan(container, stream, rows: list | None = None) -> tuple[float | None, int]:
    """(last frame time, packet count) by demuxing every packet; no decoding. Each timed
    packet's (time, size, keyframe) is added to `rows` when given (events.change_curve
    reads them instead of demuxing the file again)."""
    last, count = None, 0
    for packet in container.demux(stream):
        if packet.size == 0:
            continue
        count += 1
        if packet.pts is not None and packet.time_base:
            t = float((packet.pts + (packet.duration or 0)) * packet.time_base)
            last = t if last is None else max(last, t)
            if rows is not None:
                # timed as events._packets times a demuxed packet, to the last bit
                rows.append((packet.pts * float(packet.time_base), packet.size, packet.is_keyframe))
    return last, count


def _measure(path: str, index: int, rows: list | None = None) -> tuple[float | None, int]:
    """`_scan` on a fresh open of `path`: a raw stream (.h264) cannot seek back to its start."""
    with _open(path) as container:
        return _scan(container, container.streams[index], rows)


def _fps(stream) -> float | None:
    # A raw elementary stream (.h264) has no timestamps and its demuxer reports a made-up
    # 25 fps, while the codec headers (H.264 SPS timing) may carry the real rate.
    if stream.start_time is None and stream.codec_context.framerate:
        return float(stream.codec_context.framerate)
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    return float(rate) if rate else None


def _check_size(width: int, height: int) -> None:
    if max(width, height) > MAX_SIDE:
        raise VideoError(f"resolution {width}x{height} is larger than {MAX_SIDE} px a side")
    if width * height > MAX_PIXELS:
        raise VideoError(
            f"resolution {width}x{height} is more than {MAX_PIXELS / 1e6:.1f} megapixels"
        )


class _Budget:
    """The pixels decoded to reach one time: a picture too large, or a keyframe too far
    back (a decompression bomb), stops decoding with a VideoError instead of running on."""

    def __init__(self) -> None:
        self.pixels = 0
        self.frames = 0

    def reset(self) -> None:
        self.pixels = self.frames = 0

    def charge(self, frame: av.VideoFrame, target: float | None = None) -> None:
        _check_size(frame.width, frame.height)
        self.pixels += frame.width * frame.height
        self.frames += 1
        if self.pixels > MAX_PIXELS_PER_SEEK:
            goal = "a sampled frame" if target is None else f"{target:.1f} s"
            raise VideoError(
                f"too costly to decode: {self.frames} frames ({self.pixels / 1e9:.1f} gigapixels)"
                f" decoded without reaching {goal}; keyframes too far apart"
                " (a decompression bomb?)"
            )


def _first_frame(container, stream) -> av.VideoFrame:
    packets = 0
    try:
        for packet in container.demux(stream):
            packets += 1
            for frame in packet.decode():
                return frame
            if packets > _MAX_PACKETS_TO_FIRST_FRAME:
                break
        # flush the decoder: a short file may hold its only frames there
        for frame in stream.codec_context.decode(None):
            return frame
    except av.FFmpegError as e:
        raise VideoError(f"cannot decode {stream.codec_context.name}: {_short(e)}") from None
    raise VideoError("no decodable video frame (truncated or corrupt)")


def probe(path: str | os.PathLike) -> VideoInfo:
    """Check that `path` is a usable video and describe it; VideoError says why not."""
    path = os.fspath(path)
    size = check_file(path)
    with _open(path) as container:
        stream = _video_stream(container)
        first = _first_frame(container, stream)
        width, height = first.width, first.height
        if not width or not height:
            raise VideoError("the video stream has no picture size")
        _check_size(width, height)
        duration = _header_duration(container, stream)
        frame_count = stream.frames or None
        if duration is None or not frame_count:
            # no frame count in the headers (matroska never has one): demux to count, which
            # also shows where the packets really end
            end, packets = _measured(path, stream)
            frame_count = frame_count or packets or None
            if duration is None:
                duration = end
            elif duration > 1.0 and end is not None and end < duration * 0.5:
                raise VideoError(
                    f"truncated: frames stop at {end:.1f} s of the declared {duration:.1f} s"
                )
        elif duration > 1.0:
            _check_tail(container, stream, duration)
        return _info(path, size, container, stream, first, duration, frame_count)


def _measured(path: str, stream, rows: list | None = None) -> tuple[float | None, int]:
    """(duration from the packets, packet count), demuxing a fresh open of the file."""
    last, packets = _measure(path, stream.index, rows)
    return (None if last is None else max(0.0, last - _stream_start(stream))), packets


def _info(path, size, container, stream, first, duration, frame_count=None) -> VideoInfo:
    """What a video is, as displayed: width and height swapped for a quarter-turned picture."""
    turned = _rotation(first) % 180 != 0
    return VideoInfo(
        path=path,
        bytes=size,
        duration=duration,
        codec=stream.codec_context.name,
        container=container.format.name,
        width=first.height if turned else first.width,
        height=first.width if turned else first.height,
        fps=_fps(stream),
        rotation=_rotation(first),
        frame_count=frame_count,
    )


def _check_tail(container, stream, duration: float) -> None:
    """A file cut short still declares its full duration: check a frame decodes near the end."""
    start = _stream_start(stream)
    target = start + duration * 0.9
    budget = _Budget()
    try:
        container.seek(int(target / stream.time_base), stream=stream, backward=True)
        for frame in container.decode(stream):
            if frame.time is None or frame.time >= start + duration * 0.5:
                return
            budget.charge(frame, start + duration * 0.5)
    except MemoryError:
        raise
    except av.FFmpegError:
        pass
    raise VideoError(f"truncated: no frame decodes past half of the declared {duration:.1f} s")


def _rotation(frame: av.VideoFrame) -> int:
    try:
        r = round(frame.rotation / 90.0) * 90
    except (AttributeError, TypeError, ValueError):
        return 0
    return r % 360


def scaled_size(width: int, height: int, max_side: int) -> tuple[int, int]:
    """A frame's size once its long side is at most max_side (even sides, aspect kept)."""
    scale = min(1.0, max_side / max(width, height))
    # even sizes keep every pixel format's chroma subsampling happy
    return max(2, int(width * scale) // 2 * 2), max(2, int(height * scale) // 2 * 2)


def _to_rgb(frame: av.VideoFrame, max_side: int) -> np.ndarray:
    w, h = scaled_size(frame.width, frame.height, max_side)
    rgb = frame.to_ndarray(format="rgb24", width=w, height=h)
    turns = _rotation(frame) // 90
    return np.ascontiguousarray(np.rot90(rgb, k=turns)) if turns else rgb


def sample_frames(
    path: str | os.PathLike, k: int, *, max_side: int = 640, sampling: str = "uniform"
) -> SampledVideo:
    """k frames of the video, upright, long side <= max_side.

    `sampling` "uniform": spread evenly by timestamp. "events": a uniform skeleton plus
    frames at the moments that change most (`video.events`); a file that gives nothing to
    score change by gets uniform frames, with `note` saying why."""
    if sampling not in SAMPLING_MODES:
        raise ValueError(f"sampling must be one of {', '.join(SAMPLING_MODES)}, not {sampling!r}")
    path = os.fspath(path)
    size = check_file(path)
    with _open(path) as container:
        stream = _video_stream(container)
        # the headers' size, before any frame is decoded (each decoded frame is checked too)
        _check_size(stream.codec_context.width or 0, stream.codec_context.height or 0)
        # Slice threading, not frame threading ("AUTO"): sampling stops decoding long before
        # the end of the stream, and a frame-threaded decoder left mid-stream can hang for
        # good (PyAV #1849, #1861). Slices still use the cores within a frame.
        stream.thread_type = "SLICE"
        start = _stream_start(stream)
        duration = _header_duration(container, stream)
        packets = None
        rows: list = []  # the packets, when they are demuxed to measure the duration
        if duration is None:
            duration, packets = _measured(path, stream, rows if sampling == "events" else None)
        choices, note = None, None
        if duration is None:
            # no timestamps at all (a raw elementary stream): pick by frame index instead
            if sampling == "events":
                note = "no packet timestamps (a raw stream): uniform frames by index"
            picked = _by_index(container, stream, packets or 0, k)
        else:
            if sampling == "events":
                choices, note = _event_choices(container, stream, start, duration, k, rows)
            targets = [c.t for c in choices or ()] or events.uniform_targets(start, duration, k)
            picked = _seek_and_decode(container, stream, targets)
        if not picked:
            raise VideoError("no decodable video frame (truncated or corrupt)")
        frames = [_to_rgb(f, max_side) for _, f in picked]
        info = _info(path, size, container, stream, picked[0][1], duration)
        sampled = SampledVideo(info, frames, [round(t - start, 3) for t, _ in picked], note=note)
        if choices:
            sampled.sampling = "events"
            sampled.reasons, sampled.scores = _reasons(picked, choices)
        return sampled


def _event_choices(container, stream, start, duration, k, rows):
    """(choices, None), or (None, why not) when the file gives no change curve. `rows`: the
    packets already demuxed (empty: none were)."""
    try:
        curve = events.change_curve(container, stream, start, duration, rows or None)
    except events.NoCurve as e:
        return None, f"{e}: uniform frames"
    except av.FFmpegError as e:
        return None, f"packets unreadable ({_short(e)}): uniform frames"
    return events.choose(start, duration, k, curve), None


def _reasons(picked, choices) -> tuple[list[str], list[float | None]]:
    """Each picked frame's reason and score: those of the choice whose target it is nearest.
    (Targets closer than a frame apart give one frame; it keeps the event's reason.)"""
    reasons, scores = [], []
    for t, _ in picked:
        near = min(choices, key=lambda c: (abs(c.t - t), c.reason != "event"))
        reasons.append(near.reason)
        scores.append(near.score)
    return reasons, scores


uniform_targets = events.uniform_targets


def _frame_time(frame: av.VideoFrame, index: int, fps: float | None) -> float:
    if frame.time is not None:
        return float(frame.time)
    return index / (fps or 25.0)


def _seek_and_decode(container, stream, targets: list[float]) -> list[tuple[float, av.VideoFrame]]:
    """For each target time, the decoded frame nearest to it; duplicates dropped."""
    fps = _fps(stream)
    picked: list[tuple[float, av.VideoFrame]] = []
    budget = _Budget()
    decoder = None
    prev: tuple[float, av.VideoFrame] | None = None
    index = 0
    seekable = True
    for target in targets:
        behind = prev is None or target < prev[0] or target - prev[0] > _SEEK_GAP_S
        if decoder is None or (behind and seekable):
            if seekable:
                try:
                    container.seek(int(target / stream.time_base), stream=stream, backward=True)
                except av.FFmpegError:
                    seekable = False
                    container.seek(0)
            decoder = container.decode(stream)
            prev = None
        chosen = None
        budget.reset()
        try:
            for frame in decoder:
                budget.charge(frame, target)
                t = _frame_time(frame, index, fps)
                index += 1
                if t >= target:
                    if prev is not None and target - prev[0] < t - target:
                        chosen = prev
                    else:
                        chosen = (t, frame)
                    prev = (t, frame)
                    break
                prev = (t, frame)
        except MemoryError:
            raise  # av.MemoryError is an FFmpegError too, but not a damaged tail
        except av.FFmpegError:
            pass  # a damaged tail: keep what decoded
        if chosen is None:
            chosen = prev  # the stream ended before the target: its last frame
        if chosen is None:
            continue
        if not picked or abs(picked[-1][0] - chosen[0]) > 1e-6:
            picked.append(chosen)
    return picked


def _by_index(container, stream, count: int, k: int) -> list[tuple[float, av.VideoFrame]]:
    """k frames at uniform frame indices, for streams that carry no timestamps to seek by."""
    fps = _fps(stream)
    wanted = set(uniform_indices(count, k)) if count else None
    out = []
    budget = _Budget()
    try:
        for i, frame in enumerate(container.decode(stream)):
            budget.charge(frame)
            if wanted is None or i in wanted:
                out.append((_frame_time(frame, i, fps), frame))
                budget.reset()
            if len(out) >= (k if wanted is None else len(wanted)):
                break
    except MemoryError:
        raise
    except av.FFmpegError:
        pass
    return out


def uniform_indices(count: int, k: int) -> list[int]:
    """The centres of k equal slices of range(count), without repeats."""
    return sorted({min(count - 1, int((i + 0.5) * count / k)) for i in range(k)})
