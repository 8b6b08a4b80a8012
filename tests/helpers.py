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
