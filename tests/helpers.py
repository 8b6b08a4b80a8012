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
