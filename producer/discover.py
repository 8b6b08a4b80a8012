"""Turn command-line inputs (files, directories, globs, a manifest) into a list of paths."""

from __future__ import annotations

import glob
import os
from collections.abc import Iterator
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
    return list(iter_manifest(manifest))


def iter_manifest(manifest: str | os.PathLike) -> Iterator[str]:
    """The manifest's paths, read a line at a time (a million-line manifest is never held
    whole). An unreadable manifest raises NoInputs before the first path."""
    path = Path(manifest)
    try:
        f = path.open(encoding="utf-8")
    except OSError as e:
        raise NoInputs(f"cannot read manifest {manifest}: {e.strerror or e}") from None
    return _manifest_lines(f, path.parent)


def _manifest_lines(f, folder: Path) -> Iterator[str]:
    with f:
        try:
            for line in f:
                entry = os.path.expanduser(line.strip())
                if not entry or entry.startswith("#"):
                    continue
                yield entry if os.path.isabs(entry) else str(folder / entry)
        except (OSError, UnicodeDecodeError) as e:
            raise NoInputs(f"cannot read manifest {f.name}: {e}") from None


def discover(inputs: list[str], *, manifest: str | None = None) -> list[str]:
    """Absolute paths of every input, in order, each once (a list: for small inputs; the
    producer streams them with `iter_inputs`).

    Directories are walked recursively (video suffixes only); globs are expanded
    (``**`` recurses); anything else is taken as a file path even if it does not exist,
    so that a typo is reported as a rejected input rather than silently dropped.
    """
    seen: set[str] = set()
    out = [p for p in iter_inputs(inputs, manifest=manifest) if not (p in seen or seen.add(p))]
    if not out:
        raise NoInputs("no video files found in the given paths")
    return out


def iter_inputs(inputs: list[str], *, manifest: str | None = None) -> Iterator[str]:
    """The absolute path of every input, in a stable order, one at a time: folders are
    walked as they are read, a manifest a line at a time. A path named twice may come
    twice (the producer's store knows which it already recorded)."""
    entries = _entries(inputs, manifest)
    for entry in entries:
        expanded = os.path.expanduser(entry)
        if os.path.isdir(expanded):
            yield from _walk(expanded)
        elif _GLOB_CHARS & set(entry) and not os.path.exists(expanded):
            for match in sorted(glob.iglob(expanded, recursive=True)):
                if os.path.isdir(match):
                    yield from _walk(match)
                else:
                    yield os.path.abspath(match)
        else:
            yield os.path.abspath(expanded)


def any_input_exists(inputs: list[str], *, manifest: str | None = None) -> bool:
    """Whether at least one input names something that exists (a file, a folder, a glob
    with a match); stops at the first that does, so it is cheap on a large manifest."""
    for entry in _entries(inputs, manifest):
        expanded = os.path.expanduser(entry)
        if os.path.exists(expanded):
            return True
        if _GLOB_CHARS & set(entry) and next(glob.iglob(expanded, recursive=True), None):
            return True
    return False


def _entries(inputs: list[str], manifest: str | None) -> Iterator[str]:
    yield from inputs
    if manifest:
        yield from iter_manifest(manifest)


def _walk(directory: str) -> Iterator[str]:
    """Video files under `directory`, depth first, names sorted, read one folder at a time."""
    try:
        with os.scandir(directory) as it:
            entries = sorted(it, key=lambda e: e.name)
    except OSError:
        return  # unreadable folder: nothing found in it
    folders = []
    for entry in entries:
        try:
            is_dir = entry.is_dir()
            linked = is_dir and entry.is_symlink()
        except OSError:
            continue
        if linked:
            continue  # as os.walk: a link to a folder is not followed (no loops)
        if is_dir:
            folders.append(entry.path)
        elif Path(entry.name).suffix.lower() in VIDEO_SUFFIXES:
            yield os.path.abspath(entry.path)
    for folder in folders:
        yield from _walk(folder)
