"""Helpers the tests import (fixtures live in conftest.py)."""

from __future__ import annotations


def make_runner(loaded, cls=None, *, constrained: bool = True, **kwargs):
    """A ModelRunner (or the subclass `cls`) on `loaded`: RunnerConfig's knobs from
    `kwargs`, the rest to the class; under the report grammar unless `constrained=False`."""
    from dataclasses import fields

    from models.runner import ModelRunner, RunnerConfig, report_grammar

    knobs = {f.name for f in fields(RunnerConfig)}
    config = RunnerConfig(**{k: v for k, v in kwargs.items() if k in knobs})
    extra = {k: v for k, v in kwargs.items() if k not in knobs}
    grammar = report_grammar(loaded) if constrained else None
    return (cls or ModelRunner)(loaded, config, grammar=grammar, **extra)


def upgrade_url(url: str) -> None:
    """Bring the database at `url` to the newest revision (as `python -m db upgrade`)."""
    from db.migrate import upgrade
    from db.session import make_engine

    engine = make_engine(url)
    try:
        upgrade(engine)
    finally:
        engine.dispose()


def distinct_clips(folder, count: int, *, variants: int = 16, per_folder: int = 100, **clip):
    """`count` small MP4 clips under `folder` (`per_folder` a subfolder, named vNNNN.mp4),
    every one a real decodable video with bytes of its own, written far faster than
    `count` encodes: `variants` clips are encoded by `producer.clips.make_video` (seeds 0..:
    different cars and motion, `clip` its keywords), and file i is variant i % `variants`
    with an ISO BMFF 'free' box carrying i appended after its boxes. Readers skip 'free'
    boxes, so the file probes and decodes as its variant does, but its sha256 is its own:
    the producer, which dedupes by content, records `count` distinct videos."""
    import struct
    import tempfile
    from pathlib import Path

    from producer.clips import make_video

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


def torch_threads(count: int):
    """A context manager: torch's intra-op threads at `count` inside, as before after.

    The tiny model's ops take microseconds, so with one thread per core (torch's default)
    each op is an OpenMP fork and join that waits for the other core. On this 2-core
    machine, idle, two threads gain little (nothing on a batch, ~10% on a single row); busy
    with other work, they lose badly: one 8-video constrained batch took 128 s with two
    threads and 8 s with one, beside the same other work.
    """
    from contextlib import contextmanager

    import torch

    @contextmanager
    def pinned():
        before = torch.get_num_threads()
        torch.set_num_threads(count)
        try:
            yield
        finally:
            torch.set_num_threads(before)

    return pinned()


def system_tool(name: str, package: str) -> str:
    """The path of a command the test needs (a Debian package .ci/run installs): skipped
    with the reason off CI, a failure on CI (CI set), where a missing tool is a bug."""
    import os
    import shutil

    import pytest

    path = shutil.which(name)
    if path is None:
        message = f"{name} is not installed (Debian package {package}; .ci/run installs it)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message + "; on CI (CI set) this fails instead")
    return path
