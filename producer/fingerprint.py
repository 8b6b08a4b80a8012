"""Content keys of input files: the full sha256, and a fast key read from a few samples.

`sha256_file` reads every byte. `fast_key` reads a small fixed amount per file (F1: at
most 768 KiB, whatever the size) and keys the file by its size plus a blake2b digest of
- the head, 256 KiB: an MP4's ftyp and, when faststart, its moov (sample tables that differ
  between any two recordings); an MKV's EBML header and first cluster; a TS's PAT/PMT;
- the tail, 256 KiB: where a non-faststart MP4 (most dashcams) keeps its moov;
- 16 blocks of 16 KiB, one at the centre of each sixteenth of the bytes in between.
A file no larger than those 768 KiB is hashed whole, so every byte of it counts.

What it cannot see: a change that keeps the size and falls entirely in unsampled bytes
(between the blocks of the middle) gives the same key. Any change of size, and any change
in the head, the tail or a sampled block, gives another key. Two different recordings
differ in their headers (the sample tables) and almost everywhere in the middle; what
the key misses is an edit or corruption of a file's middle that keeps its size.

Why these sizes (benchmarks/dedupe_keys.py; benchmarks/results/dedupe_keys_cpu.*, 2 shared
cores, a virtual disk, figures noisy by about 2x between runs): cold, a 512 MB file's key
took 3.1 ms against 549 ms for its sha256 (178x; an earlier run 7.7 against 976 ms, 126x),
whose speed is the slower of the disk and of hashlib's sha256 (that run: 933 MB/s cold
against 981 in memory; the earlier: 525 against 1,766). The key costs about what
`video.media.probe`, which enqueue runs on every file anyway, costs a clip cold (3-5 ms).
A scheme of 160 KiB (64 KiB ends, 8 x 4 KiB) took 1.1 ms, one of 4 MiB (1 MiB ends,
32 x 64 KiB) 17 ms; none of the three confused any of 300 distinct clips, so the choice
weighs cost against what the ends hold: at 12-16 bytes of sample tables a frame, 256 KiB
holds the whole moov of about ten minutes at 30 fps (a dashcam segment is 1-3).
Readahead is off (POSIX_FADV_RANDOM): with it the storage fetched 1.5 MiB for the 768 KiB
asked. Middle blocks start on a page boundary: unaligned, each fetched a page more. On
files of 1-3 MB the key is no faster than the sha256 (18 small reads against one
stream); it pays from about 8 MB (3-4x), which fleet recordings (tens of MB to GB) exceed.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

_CHUNK = 1 << 20
_PAGE = 4096


@dataclass(frozen=True)
class Scheme:
    """Which bytes a fast key reads. `name` goes in the key: change it with any size here."""

    name: str
    head: int
    tail: int
    blocks: int
    block: int
    digest_bytes: int = 16

    @property
    def total(self) -> int:
        """The most bytes a key reads; a file this size or smaller is hashed whole."""
        return self.head + self.tail + self.blocks * self.block

    def spans(self, size: int) -> list[tuple[int, int]]:
        """The (offset, length) ranges a key reads from a file of `size` bytes, in order."""
        if size <= self.total:
            return [(0, size)] if size else []
        middle = size - self.head - self.tail  # > blocks * block: a block per stratum
        centres = [
            self.head + middle * (2 * i + 1) // (2 * self.blocks) for i in range(self.blocks)
        ]
        # whole pages: a block across a page boundary would fetch one page more from disk
        blocks = [((c - self.block // 2) & -_PAGE, self.block) for c in centres]
        return [(0, self.head), *blocks, (size - self.tail, self.tail)]

    def bytes_read(self, size: int) -> int:
        """How many bytes a key reads from a file of `size` bytes."""
        return min(size, self.total)


F1 = Scheme("f1", head=256 << 10, tail=256 << 10, blocks=16, block=16 << 10)
FAST_KEY_BYTES = F1.total  # 768 KiB: the most any file's fast key reads


def fast_key_bytes(size: int) -> int:
    """How many bytes `fast_key` reads from a file of `size` bytes."""
    return F1.bytes_read(size)


def sha256_file(path: str | os.PathLike) -> str:
    """The hex sha256 of the whole file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def fast_key(path: str | os.PathLike, size: int | None = None, *, scheme: Scheme = F1) -> str:
    """`"f1:<size>:<blake2b hex>"` of the file's sampled bytes (module docstring).

    `size` is the file's current size when the caller has just taken it (check_file);
    None reads it from the open file. OSError propagates, also when the file ends before
    `size` (it changed while being read).
    """
    digest = hashlib.blake2b(digest_size=scheme.digest_bytes)
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    try:
        if size is None:
            size = os.fstat(fd).st_size
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)  # read what is asked, no more
        for offset, length in scheme.spans(size):
            _hash_span(digest, fd, offset, length, size)
    finally:
        os.close(fd)
    return f"{scheme.name}:{size}:{digest.hexdigest()}"


def _hash_span(digest, fd: int, offset: int, length: int, size: int) -> None:
    end = offset + length
    while offset < end:
        chunk = os.pread(fd, end - offset, offset)
        if not chunk:
            raise OSError(f"file changed while being read: it ends at byte {offset}, not {size}")
        digest.update(chunk)
        offset += len(chunk)
