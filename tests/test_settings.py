"""Settings: read from FLEETSCRIBE_* variables and validated at start-up."""

from __future__ import annotations

from pathlib import Path

import pytest

from config.settings import SAMPLING_MODES, Settings, SettingsError, load_settings
from video import media


@pytest.mark.parametrize(
    "value, roots",
    [
        ("/videos", [Path("/videos")]),
        ("/a:/b/c", [Path("/a"), Path("/b/c")]),
        ('["/a", "/b"]', [Path("/a"), Path("/b")]),
        ("", []),
    ],
)
def test_video_roots_from_the_environment(monkeypatch, value, roots):
    monkeypatch.setenv("FLEETSCRIBE_VIDEO_ROOTS", value)
    assert Settings().video_roots == roots


def test_defaults_are_the_embedded_mode(monkeypatch, tmp_path):
    for name in ("FLEETSCRIBE_BROKER_URL", "FLEETSCRIBE_DATABASE_URL", "FLEETSCRIBE_QUANT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("FLEETSCRIBE_HOME", str(tmp_path))
    settings = Settings()
    assert settings.embedded_broker
    assert settings.db_url == f"sqlite:///{tmp_path.resolve() / 'fleetscribe.db'}"
    assert settings.quant == "nf4" and settings.frames == 8
    assert settings.model == "Qwen/Qwen3-VL-4B-Instruct"


@pytest.mark.parametrize(
    "name, value, words",
    [
        ("FLEETSCRIBE_QUANT", "int3", "FLEETSCRIBE_QUANT"),
        ("FLEETSCRIBE_FRAMES", "65", "FLEETSCRIBE_FRAMES"),
        ("FLEETSCRIBE_HEARTBEAT_S", "0", "FLEETSCRIBE_HEARTBEAT_S"),
        ("FLEETSCRIBE_COMPILE", "max-speed", "FLEETSCRIBE_COMPILE"),
        ("FLEETSCRIBE_SAMPLING", "scenes", "FLEETSCRIBE_SAMPLING: Input should be 'uniform' or"),
    ],
)
def test_a_bad_value_is_named(monkeypatch, name, value, words):
    monkeypatch.setenv(name, value)
    with pytest.raises(SettingsError, match=words):
        load_settings()


@pytest.mark.parametrize(
    "value, mode",
    [("true", "reduce-overhead"), ("0", "off"), ("default", "default"), ("OFF", "off")],
)
def test_compile_takes_a_mode_or_a_flag(monkeypatch, value, mode):
    monkeypatch.setenv("FLEETSCRIBE_COMPILE", value)
    assert Settings().compile == mode


def test_sampling_is_a_mode_the_sampler_knows(monkeypatch):
    monkeypatch.delenv("FLEETSCRIBE_SAMPLING", raising=False)
    assert Settings().sampling == "events"
    monkeypatch.setenv("FLEETSCRIBE_SAMPLING", "uniform")
    assert Settings().sampling == "uniform"
    # the CLI's --sampling choices and the setting's values are the sampler's modes
    assert SAMPLING_MODES == media.SAMPLING_MODES
