"""probe: what a usable video is, the one-line reason for each unusable one; check_allowed."""

from __future__ import annotations

import os

import av
import numpy as np
import pytest

from producer.clips import make_video
from video.errors import PathNotAllowed, VideoError
from video.files import check_allowed
from video.media import MAX_SIDE, probe, sample_frames


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    return tmp_path_factory.mktemp("probe_clips")


def reason(path) -> str:
    with pytest.raises(VideoError) as caught:
        probe(path)
    text = str(caught.value)
    assert "\n" not in text
    return text


def cut(src, dst, fraction: float):
    data = src.read_bytes()
    dst.write_bytes(data[: int(len(data) * fraction)])
    return dst


def write_audio(path, codec: str):
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=44100)
        samples = stream.codec_context.frame_size or 1024
        for i in range(10):
            frame = av.AudioFrame.from_ndarray(
                np.zeros((1, samples), np.float32), format="fltp", layout="mono"
            )
            frame.sample_rate = 44100
            frame.pts = i * samples
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return path


# ---- usable files


def test_good_file_is_described(clips):
    path = make_video(clips / "good.mp4", seconds=2.0, fps=10)
    info = probe(path)
    assert info.path == str(path)
    assert info.bytes == path.stat().st_size
    assert info.codec == "h264"
    assert "mp4" in info.container
    assert (info.width, info.height) == (160, 90)
    assert info.fps == pytest.approx(10.0)
    assert info.duration == pytest.approx(2.0, abs=0.05)
    assert info.frame_count == 20
    assert info.rotation == 0


@pytest.mark.parametrize("rotation", [90, 270])
def test_rotated_file_reports_displayed_size(clips, rotation):
    path = make_video(clips / f"rot{rotation}.mp4", rotation=rotation, width=90, height=160)
    info = probe(path)
    assert info.rotation == rotation
    assert (info.width, info.height) == (90, 160)


@pytest.mark.parametrize(
    ("name", "kwargs", "codec", "fps"),
    [
        ("vp9.webm", {"codec": "libvpx-vp9"}, "vp9", 10.0),
        ("mpeg4.avi", {"codec": "mpeg4", "fps": 25}, "mpeg4", 25.0),
        ("hevc.mkv", {"codec": "libx265", "seconds": 1.5}, "hevc", 10.0),
        ("ntsc.mov", {"fps": 30000 / 1001}, "h264", 29.97),
    ],
)
def test_other_codecs_and_containers(clips, name, kwargs, codec, fps):
    info = probe(make_video(clips / name, **kwargs))
    assert info.codec == codec
    assert info.fps == pytest.approx(fps, abs=0.01)
    assert info.duration == pytest.approx(kwargs.get("seconds", 2.0), abs=0.05)
    assert (info.width, info.height) == (160, 90)


@pytest.mark.parametrize(("name", "codec"), [("live.mkv", "libx264"), ("live.webm", "libvpx-vp9")])
def test_live_file_duration_is_measured_from_packets(clips, name, codec):
    info = probe(make_video(clips / name, codec=codec, no_duration=True))
    assert info.duration == pytest.approx(2.0, abs=0.11)
    assert info.frame_count == 20


def test_raw_stream_has_no_duration_but_counts_frames(clips):
    info = probe(make_video(clips / "raw.h264"))
    assert info.duration is None
    assert info.frame_count == 20
    assert info.fps == pytest.approx(10.0)
    assert info.container == "h264"


def test_slightly_short_tail_is_still_usable(clips):
    full = make_video(clips / "long.mkv", seconds=3.0)
    info = probe(cut(full, clips / "cut90.mkv", 0.9))
    assert info.duration == pytest.approx(3.0, abs=0.05)  # as declared
    assert 0 < info.frame_count < 30


# ---- unusable files: each reason, word for word


def test_empty_file(tmp_path):
    path = tmp_path / "empty.mp4"
    path.touch()
    assert reason(path) == "empty file (0 bytes)"


def test_random_bytes(tmp_path):
    path = tmp_path / "noise.mp4"
    path.write_bytes(np.random.default_rng(0).bytes(20_000))
    assert reason(path) == "not a video: ffmpeg found no known container format"


def test_text_file(tmp_path):
    path = tmp_path / "notes.mkv"
    path.write_text("dash-cam notes, not a video\n" * 100)
    assert reason(path) == "not a video: ffmpeg found no known container format"


@pytest.mark.parametrize(("name", "codec"), [("speech.m4a", "aac"), ("speech.mp3", "mp3")])
def test_audio_only(tmp_path, name, codec):
    path = write_audio(tmp_path / name, codec)
    assert reason(path) == "audio only: the file has no video stream"


@pytest.mark.parametrize("fraction", [0.3, 0.5, 0.9])
def test_mp4_cut_before_its_index(clips, tmp_path, fraction):
    full = make_video(clips / "full.mp4", seconds=3.0)  # moov written last, as usual
    path = cut(full, tmp_path / "cut.mp4", fraction)
    assert reason(path) == "truncated: the MP4 index (moov atom) is missing"


def test_faststart_mp4_cut_in_half(clips, tmp_path):
    full = make_video(
        clips / "faststart.mp4",
        seconds=3.0,
        encoder_options={"g": "5"},  # keyframes to seek to near the end of what is left
        muxer_options={"movflags": "+faststart"},
    )
    path = cut(full, tmp_path / "cut.mp4", 0.4)
    assert reason(path) == "truncated: no frame decodes past half of the declared 3.0 s"


@pytest.mark.parametrize(("name", "codec"), [("tail.mkv", "libx264"), ("tail.webm", "libvpx-vp9")])
def test_matroska_cut_short(clips, tmp_path, name, codec):
    full = make_video(clips / f"full_{name}", seconds=3.0, codec=codec)
    text = reason(cut(full, tmp_path / name, 0.4))
    assert text.startswith("truncated: frames stop at ")
    assert text.endswith(" s of the declared 3.0 s")


def test_directory(tmp_path):
    assert reason(tmp_path) == "is a directory, not a file"


def test_missing_file(tmp_path):
    assert reason(tmp_path / "gone.mp4") == "no such file"


def test_fifo_is_not_a_regular_file(tmp_path):
    path = tmp_path / "pipe.mp4"
    os.mkfifo(path)
    assert reason(path).startswith("not a regular file")


NOBODY = 65534  # the unprivileged user and group (nobody, nogroup)


def _probe_in_child(path: str, uids: tuple[int, int, int], conn) -> None:
    """In a forked child: take the (real, effective, saved) user and group ids `uids`,
    probe `path`, and send back what came of it (never raises)."""
    try:
        os.setgroups([])
        os.setresgid(*uids)
        os.setresuid(*uids)
        if os.geteuid() != uids[1] or os.getuid() != uids[0] or os.getgroups():
            conn.send(("setup", f"still uid {os.getresuid()} groups {os.getgroups()}"))
            return
        info = probe(path)
        conn.send(("ok", info.codec))
    except VideoError as e:
        conn.send(("VideoError", str(e)))
    except BaseException as e:  # sent to the test, which fails on it
        conn.send((type(e).__name__, str(e)))
    finally:
        conn.close()


def probe_unprivileged(path, uids=(NOBODY, NOBODY, NOBODY)) -> tuple[str, str]:
    """probe(path) as an unprivileged user: ("ok", codec) or (exception name, its text).

    As root (CI), a forked child drops to `uids` first (the interpreter under /root is not
    runnable by another user, so no subprocess), since root reads files whatever their
    mode; as any other user the probe runs here."""
    if os.geteuid() != 0:
        try:
            return "ok", probe(path).codec
        except VideoError as e:
            return "VideoError", str(e)
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    ours, theirs = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_probe_in_child, args=(str(path), uids, theirs))
    child.start()
    theirs.close()
    try:
        if not ours.poll(60):
            pytest.fail("the unprivileged probe sent nothing within 60 s")
        return ours.recv()
    finally:
        ours.close()
        child.join(10)
        if child.is_alive():
            child.kill()
            child.join()


@pytest.fixture
def open_dir():
    """A directory anyone can enter (pytest's tmp_path is root's alone), removed after."""
    import shutil
    import tempfile
    from pathlib import Path

    folder = Path(tempfile.mkdtemp(prefix="fleetscribe-perm-"))
    folder.chmod(0o755)
    yield folder
    shutil.rmtree(folder)


def test_unreadable_file(clips, open_dir):
    data = make_video(clips / "lock_src.mp4").read_bytes()
    readable, locked = open_dir / "readable.mp4", open_dir / "locked.mp4"
    for path, mode in ((readable, 0o644), (locked, 0)):
        path.write_bytes(data)
        path.chmod(mode)
    # the same user reads a readable file beside it: the directory is not what stops it
    assert probe_unprivileged(readable) == ("ok", "h264")
    assert probe_unprivileged(locked) == ("VideoError", "cannot read: permission denied")


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to keep a root real uid")
def test_unreadable_file_that_access_allows(clips, open_dir):
    """Real uid root, effective uid nobody: access() (real uid) says readable but opening
    (effective uid) is refused, so the reason comes from the open, word for word the same."""
    locked = open_dir / "locked.mp4"
    locked.write_bytes(make_video(clips / "lock_src.mp4").read_bytes())
    locked.chmod(0)
    assert probe_unprivileged(locked, uids=(0, NOBODY, 0)) == (
        "VideoError",
        "cannot read: permission denied",
    )


def test_picture_too_large(tmp_path):
    path = tmp_path / "banner.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=10)
        stream.width, stream.height, stream.pix_fmt = MAX_SIDE + 16, 16, "yuv420p"
        stream.options = {"preset": "ultrafast"}
        frame = av.VideoFrame.from_ndarray(np.zeros((16, MAX_SIDE + 16, 3), np.uint8), "rgb24")
        frame.pts = 0
        container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    assert reason(path) == f"resolution {MAX_SIDE + 16}x16 is larger than {MAX_SIDE} px a side"


@pytest.mark.parametrize("name", ["empty.mp4", "noise.mp4", "speech.m4a", "cut.mp4", "gone.mp4"])
def test_sample_frames_refuses_with_the_same_reason(clips, tmp_path, name):
    path = tmp_path / name
    if name == "empty.mp4":
        path.touch()
    elif name == "noise.mp4":
        path.write_bytes(np.random.default_rng(1).bytes(5000))
    elif name == "speech.m4a":
        write_audio(path, "aac")
    elif name == "cut.mp4":
        cut(make_video(clips / "full.mp4", seconds=3.0), path, 0.5)
    expected = reason(path)
    with pytest.raises(VideoError) as caught:
        sample_frames(path, 4)
    assert str(caught.value) == expected


# ---- check_allowed


@pytest.fixture
def roots(tmp_path):
    base = tmp_path.resolve()  # check_allowed answers with real paths
    videos, other = base / "videos", base / "videos2"
    (videos / "day1").mkdir(parents=True)
    other.mkdir()
    (videos / "day1" / "a.mp4").write_bytes(b"x")
    (other / "b.mp4").write_bytes(b"x")
    (base / "secret.txt").write_text("x")
    return videos, other


def test_path_inside_a_root_is_allowed(roots):
    videos, _ = roots
    assert check_allowed(videos / "day1" / "a.mp4", [videos]) == videos / "day1" / "a.mp4"
    assert check_allowed(str(videos / "day1" / "." / "a.mp4"), [videos]).name == "a.mp4"
    assert check_allowed(videos, [videos]) == videos


def test_no_roots_allows_everything(roots):
    videos, _ = roots
    assert check_allowed(videos.parent / "secret.txt", []).name == "secret.txt"


def test_dot_dot_escape_is_refused(roots):
    videos, _ = roots
    with pytest.raises(PathNotAllowed, match="outside FLEETSCRIBE_VIDEO_ROOTS"):
        check_allowed(videos / "day1" / ".." / ".." / "secret.txt", [videos])


def test_sibling_with_a_common_prefix_is_refused(roots):
    videos, other = roots
    with pytest.raises(PathNotAllowed):
        check_allowed(other / "b.mp4", [videos])
    assert check_allowed(other / "b.mp4", [videos, other]).name == "b.mp4"


def test_symlink_pointing_outside_is_refused(roots):
    videos, _ = roots
    link = videos / "day1" / "innocent.mp4"
    link.symlink_to(videos.parent / "secret.txt")
    with pytest.raises(PathNotAllowed):
        check_allowed(link, [videos])


def test_symlinked_root_is_resolved(roots, tmp_path):
    videos, _ = roots
    alias = tmp_path / "alias"
    alias.symlink_to(videos)
    assert check_allowed(alias / "day1" / "a.mp4", [videos]) == videos / "day1" / "a.mp4"
    assert check_allowed(videos / "day1" / "a.mp4", [alias]) == videos / "day1" / "a.mp4"
