"""How a describe worker finds FLEETSCRIBE_ADAPTER, and how a resume refuses a base that
would not be the one its run started on. The end-to-end path (train, register, describe
with it) is tests/test_training_job.py."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from config.settings import Settings
from db import training as runs
from db.session import session_scope
from models.errors import ModelLoadError
from training.tasks import RunHooks, RunMismatch
from worker.lifecycle import adapter_path


def _settings(tmp_path: Path, **values) -> Settings:
    return Settings(_env_file=None, home=tmp_path / "home", **values)


def _register(sessions, *, name: str, path: str, base: str) -> int:
    with session_scope(sessions) as session:
        run = runs.create_run(session=session, name=name, base_model=base, dataset="d", config={})
        runs.register_adapter(
            session=session, name=name, path=path, base_model=base, run_id=run.id, metrics={}
        )
        return run.id


def test_a_registered_name_resolves_to_its_folder(migrated, tmp_path):
    _engine, sessions = migrated
    _register(sessions, name="night-rain", path="/adapters/night-rain", base="base-a")
    settings = _settings(tmp_path, model="base-a", adapter="night-rain")
    assert adapter_path(settings, sessions) == "/adapters/night-rain"


def test_an_adapter_trained_on_another_base_is_refused_in_one_line(migrated, tmp_path):
    _engine, sessions = migrated
    _register(sessions, name="night-rain", path="/adapters/night-rain", base="base-a")
    settings = _settings(tmp_path, model="base-b", adapter="night-rain")
    with pytest.raises(ModelLoadError) as caught:
        adapter_path(settings, sessions)
    assert str(caught.value) == (
        "adapter night-rain was trained on base-a, but this worker loads base-b (FLEETSCRIBE_MODEL)"
    )


def test_an_unregistered_value_is_used_as_a_path(migrated, tmp_path):
    _engine, sessions = migrated
    folder = tmp_path / "my-adapter"
    folder.mkdir()
    assert adapter_path(_settings(tmp_path, adapter=str(folder)), sessions) == str(folder)
    assert adapter_path(_settings(tmp_path), sessions) is None


def test_without_a_store_an_existing_embedded_store_is_asked(tmp_path):
    """`worker describe` has no store of its own: the embedded one is asked when it
    exists, and none is made when it does not."""
    from db.migrate import upgrade
    from db.session import make_engine, make_sessionmaker

    settings = _settings(tmp_path, model="base-a", adapter="night-rain")
    assert adapter_path(settings, None) == "night-rain"  # no store: the value as given
    assert not (tmp_path / "home" / "fleetscribe.db").exists()
    (tmp_path / "home").mkdir()
    engine = make_engine(settings.db_url)
    upgrade(engine)
    _register(make_sessionmaker(engine), name="night-rain", path="/adapters/x", base="base-a")
    engine.dispose()
    assert adapter_path(settings, None) == "/adapters/x"


def test_a_resume_refuses_a_base_quantised_otherwise(migrated):
    """The first attempt records the base's quantisation config; a resume that would
    load it otherwise fails with why, before it trains a step."""
    _engine, sessions = migrated
    with session_scope(sessions) as session:
        run_id = runs.create_run(
            session=session, name="r", base_model="m", dataset="d", config={}
        ).id
    rt = SimpleNamespace(sessions=sessions, host="w1")
    nf4 = {"quant_method": "bitsandbytes", "bnb_4bit_quant_type": "nf4"}
    first = RunHooks(None, rt, run_id, {})
    first.started(split={"train": 3}, skipped=[], quantization=nf4)
    with session_scope(sessions) as session:
        stored = runs.get_run(session=session, run_id=run_id).config
    assert stored["quantization"] == nf4
    RunHooks(None, rt, run_id, dict(stored)).started(split={}, skipped=[], quantization=nf4)
    fp4 = {**nf4, "bnb_4bit_quant_type": "fp4"}
    with pytest.raises(RunMismatch) as caught:
        RunHooks(None, rt, run_id, dict(stored)).started(split={}, skipped=[], quantization=fp4)
    assert "a resume must rebuild the identical 4-bit base" in str(caught.value)
    assert "\n" not in str(caught.value)
