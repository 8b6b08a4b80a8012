"""The dedupe keys of producer/fingerprint.py, on real files: the whole-file sha256 against
hashlib, and the sampled fast key: what it sees, what it reads, and its one blind spot."""

from __future__ import annotations

import hashlib
import os
import shutil

import numpy as np
import pytest

from producer.clips import make_video
from producer.fingerprint import F1, FAST_KEY_BYTES, fast_key, fast_key_bytes, sha256_file

BIG = 3 * 2**20 + 12345  # sampled: larger than FAST_KEY_BYTES, not a multiple of a page


def write_random(path, size: int, seed: int = 0):
    path.write_bytes(np.random.default_rng(seed).bytes(size))
    return path


def flip(path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))


def small_clip(path, seed: int = 0):
    return make_video(path, seconds=1, fps=8, width=96, height=64, seed=seed)


@pytest.fixture
def big(tmp_path):
    return write_random(tmp_path / "big.bin", BIG)


def test_sha256_file_equals_hashlib_over_the_bytes(tmp_path):
    clip = small_clip(tmp_path / "clip.mp4")
    several_chunks = write_random(tmp_path / "random.bin", 2 * 2**20 + 7)
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    for path in (clip, several_chunks, empty):
        assert sha256_file(path) == hashlib.sha256(path.read_bytes()).hexdigest()


def test_the_key_names_scheme_size_and_digest(big):
    key = fast_key(big)
    scheme, size, digest = key.split(":")
    assert (scheme, int(size)) == ("f1", BIG)
    assert len(digest) == 2 * F1.digest_bytes and int(digest, 16) >= 0
    assert len(f"f1:{2**63 - 1}:{digest}") <= 80  # within 80 characters at any file size
    assert fast_key(big, size=BIG) == key  # the size the caller already has: the same key


def test_a_sampled_key_is_blake2b_of_the_head_the_middle_blocks_and_the_tail(big):
    data = big.read_bytes()
    head, *middle, tail = F1.spans(BIG)
    assert head == (0, F1.head) and tail == (BIG - F1.tail, F1.tail)
    assert len(middle) == F1.blocks
    reference = hashlib.blake2b(digest_size=16)
    for offset, length in (head, *middle, tail):
        reference.update(data[offset : offset + length])
    assert fast_key(big) == f"f1:{BIG}:{reference.hexdigest()}"


@pytest.mark.parametrize("size", [FAST_KEY_BYTES + 1, BIG, 10**9, 2**31, 2**40 + 3])
def test_the_middle_blocks_lie_one_per_stratum_between_head_and_tail(size):
    head, *middle, tail = F1.spans(size)
    stratum = (size - F1.head - F1.tail) / F1.blocks
    for i, (offset, length) in enumerate(middle):
        assert length == F1.block and offset % 4096 == 0
        # inside its own sixteenth of the bytes between head and tail, give or take a page
        assert F1.head + i * stratum - 4096 <= offset
        assert offset + length <= F1.head + (i + 1) * stratum
    ends = [o + n for o, n in (head, *middle)]
    starts = [o for o, _ in (*middle, tail)]
    assert all(end <= start for end, start in zip(ends, starts, strict=True))  # no overlap
    assert sum(n for _, n in (head, *middle, tail)) == FAST_KEY_BYTES == fast_key_bytes(size)


def test_copies_at_two_paths_give_equal_keys(tmp_path, big):
    clip = small_clip(tmp_path / "clip.mp4")
    for original in (big, clip):
        copy = shutil.copy(original, tmp_path / f"copy_of_{original.name}")
        assert fast_key(copy) == fast_key(original)


def _middle_block(size: int) -> int:
    offset, length = F1.spans(size)[1 + F1.blocks // 2]
    return offset + length // 2


@pytest.mark.parametrize(
    "where",
    [lambda size: 0, lambda size: F1.head - 1, _middle_block, lambda size: size - 1],
    ids=["first byte", "last byte of the head", "a sampled middle block", "last byte"],
)
def test_a_flipped_byte_in_sampled_bytes_changes_the_key(big, where):
    before = fast_key(big)
    flip(big, where(BIG))
    assert fast_key(big) != before


def test_a_size_change_of_one_byte_changes_the_key(big):
    before = fast_key(big)
    with open(big, "ab") as f:
        f.write(b"\0")
    appended = fast_key(big)
    os.truncate(big, BIG - 1)
    truncated = fast_key(big)
    assert len({before, appended, truncated}) == 3


def test_a_same_size_edit_in_unsampled_bytes_keeps_the_key_but_not_the_sha256(big):
    """The documented blind spot: the bytes between two middle blocks are never read."""
    (first, n), (second, _) = F1.spans(BIG)[1:3]
    gap = (first + n + second) // 2
    assert first + n < gap < second
    key, digest = fast_key(big), sha256_file(big)
    flip(big, gap)
    assert fast_key(big) == key
    assert sha256_file(big) != digest


def test_a_file_no_larger_than_the_samples_is_hashed_whole(tmp_path):
    clip = small_clip(tmp_path / "clip.mp4")
    data = clip.read_bytes()
    assert len(data) < FAST_KEY_BYTES and fast_key_bytes(len(data)) == len(data)
    key = fast_key(clip)
    assert key == f"f1:{len(data)}:{hashlib.blake2b(data, digest_size=16).hexdigest()}"
    keys = {key}
    for offset in range(len(data)):  # every byte counts
        flip(clip, offset)
        keys.add(fast_key(clip))
        flip(clip, offset)
    assert len(keys) == len(data) + 1
    assert fast_key(clip) == key


def test_the_largest_file_that_is_hashed_whole(tmp_path):
    path = write_random(tmp_path / "edge.bin", FAST_KEY_BYTES)
    data = path.read_bytes()
    assert F1.spans(FAST_KEY_BYTES) == [(0, FAST_KEY_BYTES)]
    assert fast_key(path).endswith(hashlib.blake2b(data, digest_size=16).hexdigest())


def test_a_2_gib_sparse_file_reads_only_the_samples(tmp_path, monkeypatch):
    path = tmp_path / "sparse.bin"
    with open(path, "wb") as f:
        f.truncate(2**31)
    reads: list[tuple[int, int]] = []
    real_pread = os.pread

    def counting_pread(fd, length, offset):
        data = real_pread(fd, length, offset)
        reads.append((offset, len(data)))
        return data

    monkeypatch.setattr(os, "pread", counting_pread)
    key = fast_key(path)
    assert sum(n for _, n in reads) == FAST_KEY_BYTES == fast_key_bytes(2**31)
    assert reads == F1.spans(2**31)  # one read per span, nothing else
    assert key.startswith(f"f1:{2**31}:")
    assert fast_key(path) == key  # deterministic
    zeros = hashlib.blake2b(bytes(FAST_KEY_BYTES), digest_size=16).hexdigest()
    assert key == f"f1:{2**31}:{zeros}"
    with open(path, "r+b") as f:  # a byte in the tail of the sparse file
        f.seek(2**31 - 1)
        f.write(b"\1")
    assert fast_key(path) != key


def test_distinct_clips_get_distinct_keys(tmp_path):
    clips = [small_clip(tmp_path / f"clip_{seed}.mp4", seed=seed) for seed in range(20)]
    assert len({sha256_file(c) for c in clips}) == 20
    assert len({fast_key(c) for c in clips}) == 20


def test_os_errors_propagate(tmp_path, big):
    with pytest.raises(FileNotFoundError):
        fast_key(tmp_path / "missing.mp4")
    with pytest.raises(FileNotFoundError):
        sha256_file(tmp_path / "missing.mp4")
    with pytest.raises(OSError, match=f"^file changed while being read: it ends at byte {BIG}, "):
        fast_key(big, size=BIG + 4096)  # it shrank since the caller took its size
