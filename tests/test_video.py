"""Frame sampling on real encoded files: codecs, containers, VFR, rotation, no duration."""

from __future__ import annotations

import itertools

import av
import numpy as np
import pytest

from producer.clips import frame_times, has_marker, make_clips, make_video, read_time
from video.media import probe, sample_frames, uniform_indices, uniform_targets

SECONDS = 2.0


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    """make_video into one module-wide folder, each distinct clip written once."""
    directory = tmp_path_factory.mktemp("clips")
    made = {}

    def make(name: str, **kwargs):
        key = name + repr(sorted(kwargs.items()))
        if key not in made:
            made[key] = make_video(directory / f"{len(made)}_{name}", **kwargs)
        return made[key]

    return make


def assert_frames_match_times(sampled, seconds: float = SECONDS):
    """Each frame's drawn time bar agrees with the timestamp returned for it."""
    for frame, t in zip(sampled.frames, sampled.timestamps, strict=True):
        tolerance = 2.5 * seconds / frame.shape[1]  # a couple of pixels of the bar
        assert read_time(frame, seconds) == pytest.approx(t, abs=tolerance)


def assert_increasing(timestamps):
    assert all(a < b for a, b in itertools.pairwise(timestamps)), timestamps


@pytest.mark.parametrize(
    ("name", "codec", "codec_name"),
    [
        ("h264.mp4", "libx264", "h264"),
        ("vp9.webm", "libvpx-vp9", "vp9"),
        ("mpeg4.avi", "mpeg4", "mpeg4"),
        ("mpeg4.mkv", "mpeg4", "mpeg4"),
        ("hevc.mkv", "libx265", "hevc"),
        ("h264.mov", "libx264", "h264"),
        ("prores.mov", "prores", "prores"),
        ("av1.mkv", "libsvtav1", "libdav1d"),
    ],
)
def test_samples_uniformly_across_codecs_and_containers(clip, name, codec, codec_name):
    sampled = sample_frames(clip(name, codec=codec), 8)
    assert sampled.info.codec == codec_name
    assert (sampled.info.width, sampled.info.height) == (160, 90)
    assert len(sampled.frames) == 8
    for frame in sampled.frames:
        assert frame.shape == (90, 160, 3)
        assert frame.dtype == np.uint8
        assert has_marker(frame)
    assert_increasing(sampled.timestamps)
    # at 10 fps the frame nearest each slice centre is at most half a frame away
    for t, target in zip(sampled.timestamps, uniform_targets(0.0, 2.0, 8), strict=True):
        assert t == pytest.approx(target, abs=0.05 + 1e-3)
    assert_frames_match_times(sampled)


@pytest.mark.parametrize("name", ["vfr.mp4", "vfr.mkv"])
def test_variable_frame_rate_samples_by_real_time(clip, name):
    written = frame_times(seconds=SECONDS, fps=10, vfr=True)
    sampled = sample_frames(clip(name, vfr=True), 8)
    assert_increasing(sampled.timestamps)
    for t in sampled.timestamps:
        assert min(abs(t - w) for w in written) < 2e-3, f"{t} is not a written frame time"
    assert_frames_match_times(sampled)
    # frames are dense in the first second, sparse in the second: picking by frame index
    # would take 6 of 8 from the first second, picking by time takes half from each
    assert sum(t >= 1.0 for t in sampled.timestamps) == 4
    # the nearest written frame to each slice centre: at most half the largest gap away
    targets = uniform_targets(0.0, sampled.info.duration, 8)
    for t, target in zip(sampled.timestamps, targets, strict=True):
        assert abs(t - target) <= 0.1 + 1e-3


@pytest.mark.parametrize("rotation", [90, 270])
@pytest.mark.parametrize(("width", "height"), [(160, 90), (90, 160)])
@pytest.mark.parametrize("suffix", ["mp4", "mov"])
def test_rotated_video_comes_out_upright(clip, rotation, width, height, suffix):
    path = clip(f"rot.{suffix}", rotation=rotation, width=width, height=height)
    with av.open(str(path)) as container:  # the file really stores turned pixels
        stream = container.streams.video[0]
        assert (stream.width, stream.height) == (height, width)
    sampled = sample_frames(path, 4)
    assert sampled.info.rotation == rotation
    assert (sampled.info.width, sampled.info.height) == (width, height)
    for frame in sampled.frames:
        assert frame.shape == (height, width, 3)
        assert has_marker(frame), "the red block is not top-left: the frame is not upright"
    assert_frames_match_times(sampled)


@pytest.mark.parametrize(("name", "codec"), [("live.mkv", "libx264"), ("live.webm", "libvpx-vp9")])
def test_live_file_without_duration_is_measured(clip, name, codec):
    path = clip(name, codec=codec, no_duration=True)
    with av.open(str(path)) as container:
        assert container.duration is None
        assert container.streams.video[0].duration is None
    sampled = sample_frames(path, 6)
    assert sampled.info.duration == pytest.approx(SECONDS, abs=0.11)
    assert len(sampled.frames) == 6
    assert_increasing(sampled.timestamps)
    assert sampled.timestamps[0] < 0.3 and sampled.timestamps[-1] > 1.6
    assert_frames_match_times(sampled)


def test_raw_h264_without_timestamps_is_sampled_by_index(clip):
    path = clip("raw.h264")
    with av.open(str(path)) as container:
        assert container.streams.video[0].start_time is None
    sampled = sample_frames(path, 8)
    assert sampled.info.duration is None
    assert sampled.info.fps == 10  # from the H.264 headers, not the raw demuxer's 25
    assert len(sampled.frames) == 8
    assert_increasing(sampled.timestamps)
    assert_frames_match_times(sampled)
    written = frame_times(seconds=SECONDS, fps=10)
    picked = [written[i] for i in uniform_indices(len(written), 8)]
    assert sampled.timestamps == pytest.approx(picked, abs=1e-3)


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [
        ("short.mp4", {}),
        ("short.webm", {"codec": "libvpx-vp9"}),
        ("short_live.mkv", {"no_duration": True}),
        ("short.h264", {}),
    ],
)
def test_fewer_frames_than_k_gives_each_frame_once(clip, name, kwargs):
    sampled = sample_frames(clip(name, seconds=0.3, **kwargs), 8)
    assert sampled.timestamps == pytest.approx([0.0, 0.1, 0.2], abs=1e-3)
    assert_frames_match_times(sampled, seconds=0.3)
    for i, a in enumerate(sampled.frames):
        for b in sampled.frames[i + 1 :]:
            assert not np.array_equal(a, b)


def test_single_frame_is_taken_from_the_middle(clip):
    sampled = sample_frames(clip("h264.mp4"), 1)
    assert len(sampled.frames) == 1
    assert sampled.timestamps[0] == pytest.approx(1.0, abs=0.05 + 1e-3)
    assert_frames_match_times(sampled)


def test_long_side_is_scaled_to_max_side(clip):
    sampled = sample_frames(clip("h264.mp4"), 3, max_side=64)
    for frame in sampled.frames:
        assert frame.shape == (36, 64, 3)
        assert has_marker(frame)
    assert_frames_match_times(sampled)
    portrait = sample_frames(clip("rot.mp4", rotation=270, width=90, height=160), 2, max_side=64)
    assert [f.shape for f in portrait.frames] == [(64, 36, 3)] * 2
    assert all(has_marker(f) for f in portrait.frames)


def test_small_video_is_not_upscaled(clip):
    sampled = sample_frames(clip("h264.mp4"), 2, max_side=640)
    assert [f.shape for f in sampled.frames] == [(90, 160, 3)] * 2


def test_full_hd_is_sampled_at_640(clip):
    path = clip("fullhd.mp4", width=1920, height=1080, encoder_options={"preset": "ultrafast"})
    sampled = sample_frames(path, 4, max_side=640)
    assert (sampled.info.width, sampled.info.height) == (1920, 1080)
    assert [f.shape for f in sampled.frames] == [(360, 640, 3)] * 4
    assert all(has_marker(f) for f in sampled.frames)
    assert_frames_match_times(sampled)


def test_night_clip_is_darker_than_day(clip):
    day = sample_frames(clip("h264.mp4"), 1).frames[0]
    night = sample_frames(clip("night.mp4", night=True), 1).frames[0]
    sky = slice(20, 35)  # below the marker, above the horizon
    assert night[sky].mean() < day[sky].mean() / 3
    assert has_marker(night)


def test_make_clips_writes_varied_usable_clips(tmp_path):
    paths = make_clips(tmp_path, count=6)
    assert len(paths) == len({p.name for p in paths}) == 6
    infos = [probe(p) for p in paths]
    assert {p.suffix for p in paths} >= {".mp4", ".mkv", ".webm", ".mov"}
    assert {i.codec for i in infos} >= {"h264", "vp9", "mpeg4"}
    assert any(i.rotation and i.height > i.width for i in infos)
    assert all(i.duration == pytest.approx(2.0, abs=0.15) for i in infos)


def test_uniform_targets_are_slice_centres():
    assert uniform_targets(0.0, 10.0, 5) == pytest.approx([1, 3, 5, 7, 9])
    assert uniform_targets(2.0, 4.0, 2) == pytest.approx([3.0, 5.0])
    assert uniform_targets(0.0, 6.0, 1) == pytest.approx([3.0])


def test_uniform_indices_are_slice_centres_without_repeats():
    assert uniform_indices(10, 5) == [1, 3, 5, 7, 9]
    assert uniform_indices(100, 1) == [50]
    assert uniform_indices(3, 8) == [0, 1, 2]
    assert uniform_indices(1, 4) == [0]
    for count in range(1, 40):
        for k in range(1, 12):
            picked = uniform_indices(count, k)
            assert len(picked) == min(count, k)
            assert picked == sorted(set(picked))
            assert picked[0] >= 0 and picked[-1] < count


def test_decoders_use_slice_threads_never_frame_threads(clip, monkeypatch):
    """Sampling leaves the decoder mid-stream; a frame-threaded decoder left there can hang
    (PyAV #1849): every seek-and-decode runs on a slice-threaded stream."""
    import video.media as media

    seen = []
    decode = media._seek_and_decode

    def recording(container, stream, targets):
        seen.append(stream.thread_type)
        return decode(container, stream, targets)

    monkeypatch.setattr(media, "_seek_and_decode", recording)
    for sampling in ("uniform", "events"):
        sample_frames(clip("h264.mp4", codec="libx264"), 8, sampling=sampling)
    assert seen and all(t == av.codec.context.ThreadType.SLICE for t in seen), seen


def _hangs_the_first_time(marker: str) -> str:
    """In a decoding process: hangs unless `marker` exists (it makes it first)."""
    import os
    import time

    if not os.path.exists(marker):
        open(marker, "w").close()
        time.sleep(60)
    return "answered"


def test_a_call_that_times_out_runs_once_more_in_a_new_process_then_fails(tmp_path):
    import time

    from video.errors import VideoError
    from video.processes import KillablePool

    pool = KillablePool(processes=1, timeout_s=2, memory_gib=0, what="frame decoding")
    try:
        # a hang that does not come back (a decoder's own race): the second process answers
        assert pool.run(_hangs_the_first_time, str(tmp_path / "marker")) == "answered"
        # one that does (a stalled mount, a loop): two timeouts, then the reason
        with pytest.raises(VideoError) as failed:
            pool.run(time.sleep, 30)
        assert str(failed.value) == "frame decoding took longer than 2 s, twice; killed"
    finally:
        pool.close()
