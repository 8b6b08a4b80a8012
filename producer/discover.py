"""Turn command-line inputs (files, directories, globs, a manifest) into a list of paths."""

from __future__ import annotations

import glob
import os
from pathlib import Path

from producer.errors import NoInputs

# Inside a directory only these are taken (sidecar .json/.srt/.gpx files are common);
# a file named explicitly is always probed, and rejected with a reason if it is no video.
VIDEO_SUFFIXES = frozenset(
    {".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".ts", ".mts", ".m2ts", ".mpg", ".mpeg"}
    | {".3gp", ".flv", ".wmv", ".h264", ".h265", ".hevc"}
)
_GLOB_CHARS = set("*?[")


def read_manifest(manifest: str | os.PathLike) -> list[str]:
    """Paths from a manifest: one per line, '#' comments; relative to the manifest's folder."""
    path = Path(manifest)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise NoInputs(f"cannot read manifest {manifest}: {e.strerror or e}") from None
    out = []
    for line in lines:
        entry = os.path.expanduser(line.strip())
        if not entry or entry.startswith("#"):
            continue
        out.append(entry if os.path.isabs(entry) else str(path.parent / entry))
    return out


def discover(inputs: list[str], *, manifest: str | None = None) -> list[str]:
    """Absolute paths of every input, in order, each once.

    Directories are walked recursively (video suffixes only); globs are expanded
    (``**`` recurses); anything else is taken as a file path even if it does not exist,
    so that a typo is reported as a rejected input rather than silently dropped.
    """
    entries = list(inputs) + (read_manifest(manifest) if manifest else [])
    seen: set[str] = set()
    out: list[str] = []

    def add(p: str) -> None:
        absolute = os.path.abspath(p)
        if absolute not in seen:
            seen.add(absolute)
            out.append(absolute)

    for entry in entries:
        expanded = os.path.expanduser(entry)
        if os.path.isdir(expanded):
            for found in _walk(expanded):
                add(found)
        elif _GLOB_CHARS & set(entry) and not os.path.exists(expanded):
            matches = sorted(glob.glob(expanded, recursive=True))
            for match in matches:
                if os.path.isdir(match):
                    for found in _walk(match):
                        add(found)
                else:
                    add(match)
        else:
            add(expanded)
    if not out:
        raise NoInputs("no video files found in the given paths")
    return out


def _walk(directory: str) -> list[str]:
    found = []
    for root, dirs, files in os.walk(directory):
        dirs.sort()
        for name in sorted(files):
            if Path(name).suffix.lower() in VIDEO_SUFFIXES:
                found.append(os.path.join(root, name))
    return found


def missing_paths(paths: list[str]) -> list[str]:
    """The paths that do not exist (a typo, an unmounted drive, a dangling link), in order."""
    return [path for path in paths if not os.path.exists(path)]
