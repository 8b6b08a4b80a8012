"""Event-aware sampling on real encoded clips: a 0.6 s crossing that uniform frames miss by
construction must get a frame in every codec and container the sampler handles, and a clip
without an event must get exactly the uniform frames."""

from __future__ import annotations

import itertools

import av
import numpy as np
import pytest

from producer.clips import Event, make_video, read_time
from video import events
from video.media import sample_frames

SECONDS = 40.0
K = 8
# uniform 8 frames of 40 s sit at 2.5, 7.5, ... 37.5 s (nearest frame): this lies between
EVENT = Event(start=19.0, duration=0.6)
SIZE = {"seconds": SECONDS, "fps": 15, "width": 320, "height": 180, "seed": 3}

CASES = {
    "h264.mp4": {"codec": "libx264"},
    "hevc.mkv": {"codec": "libx265"},
    "vp9.webm": {"codec": "libvpx-vp9", "no_duration": True},
    "mjpeg.avi": {"codec": "mjpeg"},
    "vfr.mp4": {"codec": "libx264", "vfr": True},
}


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    directory = tmp_path_factory.mktemp("event_clips")
    made = {}

    def make(name: str, with_event: bool):
        key = (name, with_event)
        if key not in made:
            path = directory / f"{'event' if with_event else 'plain'}_{name}"
            made[key] = make_video(
                path, events=[EVENT] if with_event else [], **SIZE, **CASES[name]
            )
        return made[key]

    return make


def shows_figure(rgb: np.ndarray) -> bool:
    """Whether the crossing figure's orange is in the picture (no car or road is orange)."""
    r, g, b = (rgb[..., i].astype(np.int32) for i in range(3))
    want = EVENT.rgb
    near = (abs(r - want[0]) < 40) & (abs(g - want[1]) < 40) & (abs(b - want[2]) < 40)
    return int(near.sum()) >= 4


@pytest.mark.parametrize("name", list(CASES))
def test_events_put_a_frame_inside_the_crossing_that_uniform_misses(clip, name):
    path = clip(name, with_event=True)
    uniform = sample_frames(path, K, sampling="uniform")
    assert len(uniform.timestamps) == K
    assert not any(EVENT.covers(t) for t in uniform.timestamps), "uniform is to miss it"
    assert not any(shows_figure(f) for f in uniform.frames)

    sampled = sample_frames(path, K, sampling="events")
    assert sampled.sampling == "events" and sampled.note is None
    assert len(sampled.frames) == K
    assert all(a < b for a, b in itertools.pairwise(sampled.timestamps))
    inside = [i for i, t in enumerate(sampled.timestamps) if EVENT.covers(t)]
    assert inside, f"no frame in {EVENT.start}-{EVENT.end} s: {sampled.choices()}"
    for i in inside:
        assert sampled.reasons[i] == "event"
        assert sampled.scores[i] >= events.THRESHOLD
        assert shows_figure(sampled.frames[i]), "the frame's picture does not show the figure"
        # the frame is the one its timestamp says: its drawn time bar agrees
        frame = sampled.frames[i]
        assert read_time(frame, SECONDS) == pytest.approx(sampled.timestamps[i], abs=0.7)
    # the rest is a skeleton that still covers the whole clip
    skeleton = [t for t, r in zip(sampled.timestamps, sampled.reasons, strict=True) if r != "event"]
    assert len(skeleton) >= K - events.event_slots(K)
    assert skeleton[0] < SECONDS / 4 and skeleton[-1] > SECONDS * 3 / 4


@pytest.mark.parametrize("name", list(CASES))
def test_a_clip_without_event_gets_the_uniform_frames(clip, name):
    path = clip(name, with_event=False)
    uniform = sample_frames(path, K, sampling="uniform")
    sampled = sample_frames(path, K, sampling="events")
    assert sampled.sampling == "events"
    assert sampled.reasons == ["uniform"] * K
    assert sampled.timestamps == uniform.timestamps
    assert all(s is not None and s < events.THRESHOLD for s in sampled.scores)
    assert uniform.reasons == [] and uniform.scores == []
    assert [c["reason"] for c in uniform.choices()] == ["uniform"] * K


def test_mp4_index_and_demuxed_packets_agree(clip):
    """The MP4 index (nothing read but the headers) lists the packets demuxing reads."""
    path = clip("h264.mp4", with_event=True)
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        assert len(stream.index_entries) >= stream.frames
        _, indexed, index_keys = events._packets(container, stream, 0.0)
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        demuxed = sorted(
            (p.size, p.is_keyframe) for p in container.demux(stream) if p.size and p.pts is not None
        )
    assert sorted(zip(indexed.astype(int).tolist(), index_keys.tolist(), strict=True)) == [
        (s, bool(k)) for s, k in demuxed
    ]


def test_raw_stream_without_timestamps_falls_back_to_uniform(tmp_path):
    mp4 = make_video(tmp_path / "a.mp4", seconds=2.0, fps=10)
    raw = tmp_path / "a.h264"
    with av.open(str(mp4)) as src, av.open(str(raw), "w", format="h264") as out:
        stream = out.add_stream_from_template(src.streams.video[0])
        for packet in src.demux(src.streams.video[0]):
            if packet.size:
                packet.stream = stream
                out.mux(packet)
    sampled = sample_frames(raw, 4, sampling="events")
    assert sampled.sampling == "uniform"
    assert sampled.note == "no packet timestamps (a raw stream): uniform frames by index"
    assert [c["reason"] for c in sampled.choices()] == ["uniform"] * len(sampled.frames)


def test_a_short_clip_with_few_packets_falls_back_with_its_reason(tmp_path):
    path = make_video(tmp_path / "short.mp4", seconds=1.0, fps=10)
    sampled = sample_frames(path, 4, sampling="events")
    assert sampled.sampling == "uniform"
    assert sampled.note == "only 10 packets with timestamps: uniform frames"
    assert sampled.timestamps == sample_frames(path, 4).timestamps


def test_unknown_sampling_mode_is_refused(clip):
    with pytest.raises(ValueError, match="sampling must be one of uniform, events, not 'peaks'"):
        sample_frames(clip("h264.mp4", with_event=False), K, sampling="peaks")


def flat_curve(seconds: float = 40.0, bumps: dict[float, float] | None = None) -> events.Curve:
    times = np.round(np.arange(0.0, seconds + 1e-9, events.STEP_S), 3)
    scores = np.ones_like(times)
    for t, s in (bumps or {}).items():
        scores[np.argmin(abs(times - t))] = s
    return events.Curve(times, scores, "packets")


def test_choose_without_bumps_is_uniform():
    chosen = events.choose(0.0, 40.0, K, flat_curve())
    assert [c.t for c in chosen] == pytest.approx(events.uniform_targets(0.0, 40.0, K))
    assert {c.reason for c in chosen} == {"uniform"}


def test_choose_spends_slots_on_the_highest_bumps_apart():
    bumps = {11.0: 2.0, 11.5: 1.9, 23.3: 1.6, 31.1: 1.5, 17.7: 1.4, 5.2: 1.2}
    chosen = events.choose(0.0, 40.0, K, flat_curve(bumps=bumps))
    assert len(chosen) == K
    picked = sorted(c.t for c in chosen if c.reason == "event")
    # 11.5 is within SEPARATION_S of 11.0; 5.2 is under THRESHOLD; three slots of eight
    assert picked == pytest.approx([11.0, 23.3, 31.1])
    assert sum(c.reason == "uniform" for c in chosen) == K - 3


def test_a_bump_a_skeleton_frame_already_shows_takes_its_place():
    # five skeleton frames of 40 s sit at 4, 12, 20, 28, 36; with two bumps needing slots
    # the skeleton is six frames (3.33, 10, 16.7, 23.3, 30, 36.7): 10.1 sits on one of them
    bumps = {10.1: 1.8, 26.0: 1.7}
    chosen = events.choose(0.0, 40.0, K, flat_curve(bumps=bumps))
    assert len(chosen) == K
    assert [c.t for c in chosen if c.reason == "event"] == pytest.approx([10.1, 26.0])
    assert all(abs(a.t - b.t) > 1.0 for a, b in itertools.pairwise(chosen))


@pytest.mark.parametrize(("k", "slots"), [(1, 0), (2, 0), (3, 1), (4, 2), (8, 3), (12, 4), (16, 6)])
def test_event_slots(k, slots):
    assert events.event_slots(k) == slots


@pytest.mark.parametrize("seconds", [10.0, 40.0, 120.0])
def test_choose_always_gives_k_distinct_frames_wherever_the_bumps_are(seconds):
    """A bump near a frame of one skeleton size but not of another (the benchmark's 2-min
    clip with a bump at 8.5 s once gave 9 frames of 8) still gives exactly k."""
    rng = np.random.default_rng(0)
    for _ in range(200):
        bumps = {
            float(t): float(s)
            for t, s in zip(rng.uniform(0, seconds, 3), rng.uniform(1.3, 2, 3), strict=True)
        }
        chosen = events.choose(0.0, seconds, K, flat_curve(seconds, bumps))
        times = [c.t for c in chosen]
        assert len(chosen) == K, (bumps, chosen)
        assert times == sorted(times) and len(set(times)) == K
        assert all(0.0 <= t <= seconds for t in times)


def test_packets_demuxed_to_measure_a_file_without_duration_make_the_same_curve(clip):
    """sample_frames hands the packets it demuxed for the duration to the change curve, so
    a live WebM is demuxed once, not twice: the curve is the one demuxing again gives."""
    from video.media import _measured, _stream_start

    path = clip("vp9.webm", with_event=True)
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        rows: list = []
        duration, _ = _measured(str(path), stream, rows)
        start = _stream_start(stream)
        given = events.change_curve(container, stream, start, duration, rows)
        demuxed = events.change_curve(container, stream, start, duration)
    assert len(rows) >= SECONDS * 15 - 1
    assert np.array_equal(given.times, demuxed.times)
    assert np.array_equal(given.scores, demuxed.scores)
