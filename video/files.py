"""Checks on a path before anything opens it: inside the allowed roots, a readable regular
file. No PyAV here: the producer runs these before hashing a file."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from video.errors import PathNotAllowed, VideoError


def check_allowed(path: str | os.PathLike, roots: list[Path]) -> Path:
    """The real path of `path`, refused if it lies outside every root (symlinks resolved)."""
    real = Path(os.path.realpath(path))
    if not roots:
        return real
    for root in roots:
        real_root = Path(os.path.realpath(root))
        if real == real_root or real.is_relative_to(real_root):
            return real
    raise PathNotAllowed(f"outside FLEETSCRIBE_VIDEO_ROOTS: {path}")


def check_file(path: str) -> int:
    """The size of a readable, non-empty regular file; VideoError says why not.

    A FIFO, device or socket is refused before anything opens it: reading one can block
    for ever."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise VideoError("no such file") from None
    except PermissionError:
        raise VideoError("cannot read: permission denied") from None
    except OSError as e:
        raise VideoError(f"cannot read: {os.strerror(e.errno or errno.EIO)}") from None
    if stat.S_ISDIR(st.st_mode):
        raise VideoError("is a directory, not a file")
    if not stat.S_ISREG(st.st_mode):
        raise VideoError("not a regular file (a FIFO, device or socket): refused unread")
    if st.st_size == 0:
        raise VideoError("empty file (0 bytes)")
    if not os.access(path, os.R_OK):
        raise VideoError("cannot read: permission denied")
    return st.st_size
