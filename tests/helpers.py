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


def start_enqueue(env: dict, *inputs):
    """`python -m producer enqueue INPUTS...` started in the background (output dropped),
    for tests that kill it midway."""
    import subprocess
    import sys
    from pathlib import Path

    return subprocess.Popen(
        [sys.executable, "-m", "producer", "enqueue", *map(str, inputs)],
        cwd=Path(__file__).resolve().parents[1],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
