"""The tiny offline model loads through the real from_pretrained path and the runner runs it."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import make_runner

from models.errors import ModelLoadError
from models.loader import Quant, load_model
from models.prompt import PROMPT_VERSION, build_messages
from models.runner import ModelRunner
from models.schema import SCHEMA_VERSION, parse_report
from producer.clips import make_video
from video.media import sample_frames

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def runner(tiny_model) -> ModelRunner:
    loaded = load_model(str(tiny_model), quant=Quant.FP32, device="cpu")
    return make_runner(loaded, max_new_tokens=12, batch_size=4)


@pytest.fixture(scope="module")
def sampled(tmp_path_factory):
    folder = tmp_path_factory.mktemp("videos")
    videos = [
        make_video(folder / "a.mp4", seed=1, seconds=2.0),
        make_video(folder / "b.webm", codec="libvpx-vp9", seed=2, seconds=1.0, width=128),
        make_video(folder / "c.mkv", seed=3, seconds=3.0, night=True),
    ]
    # different frame counts give different prompt lengths: batching must pad them
    return [sample_frames(v, k, max_side=160) for v, k in zip(videos, (4, 3, 2), strict=True)]


def test_build_tiny_cli_writes_a_loadable_model(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "models", "build-tiny", str(tmp_path / "m")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["model_type"] == "qwen3_vl"
    assert "rope_parameters" in config["text_config"]
    for name in ("tokenizer.json", "processor_config.json", "model.safetensors"):
        assert (tmp_path / "m" / name).exists(), name


def test_processor_keeps_the_qwen_special_tokens(tiny_model):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_model)
    tok = processor.tokenizer
    for token in ("<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|image_pad|>"):
        ids = tok.encode(token, add_special_tokens=False)
        assert len(ids) == 1, token
    text = processor.apply_chat_template(
        build_messages([0.0, 1.0]), tokenize=False, add_generation_prompt=True
    )
    assert text.count("<|image_pad|>") == 2
    assert text.endswith("<|im_start|>assistant\n")


@pytest.fixture(scope="module")
def batched(runner, sampled):
    """The three videos' answers from one batch, decoded once for the tests that read them."""
    return runner.answer(sampled)


def test_engine_answers_each_video(runner, sampled, batched):
    answers = batched
    assert len(answers) == len(sampled)
    for answer in answers:
        assert answer.tokens_in > 0
        assert 1 <= answer.tokens_out <= runner.answer_tokens
        assert isinstance(answer.text, str)


def test_batched_greedy_equals_one_at_a_time(runner, sampled, batched):
    """Left padding and per-row stopping must not change any video's answer (float32)."""
    single = [runner.answer([v])[0].text for v in sampled]
    assert [a.text for a in batched] == single


def test_nf4_without_cuda_is_a_clear_error(tiny_model):
    with pytest.raises(ModelLoadError, match="needs a CUDA GPU"):
        load_model(str(tiny_model), quant=Quant.NF4, device="cpu")


def test_missing_model_directory_is_a_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(str(tmp_path / "nope"), quant=Quant.FP32, device="cpu")


# What `python -m worker describe --json` prints for a described file: the stored report's
# fields (db/store.py NewReport, less video_id), with path, status and valid.
DESCRIBE_FIELDS = {
    "path",
    "status",
    "valid",
    "model",
    "adapter",
    "prompt_version",
    "schema_version",
    "raw_text",
    "report",
    "error",
    "frame_timestamps",
    "tokens_in",
    "tokens_out",
    "latency_s",
    "worker_host",
    "hazards",
    "sampling",
    "sampling_note",
    "frames",
    "event_frames",
}


def test_worker_describe_cli_prints_json(tiny_model, tmp_path):
    video = make_video(tmp_path / "clip.mp4", seed=7)
    (tmp_path / "bad.mp4").write_text("nope")
    env = {
        "FLEETSCRIBE_MODEL": str(tiny_model),
        "FLEETSCRIBE_QUANT": "fp32",
        "FLEETSCRIBE_MAX_NEW_TOKENS": "8",
        "FLEETSCRIBE_FRAMES": "3",
        "FLEETSCRIBE_HOME": str(tmp_path / "home"),
        "HF_HUB_OFFLINE": "1",
        "PATH": "/usr/bin:/bin",
    }
    args = ["describe", str(video), str(tmp_path / "bad.mp4"), "--json"]
    out = subprocess.run(
        [sys.executable, "-m", "worker", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 1, out.stderr  # one input failed
    results = [json.loads(line) for line in out.stdout.splitlines()]
    assert [(r["path"], r["status"]) for r in results] == [
        (str(video), "done"),
        (str(tmp_path / "bad.mp4"), "failed"),
    ]
    done, failed = results
    assert set(done) == DESCRIBE_FIELDS
    # FLEETSCRIBE_CONSTRAINED is unset, so the report grammar holds decoding: every answer
    # of even a random model is a valid report.
    assert done["valid"] is True and done["error"] is None
    frames = done["frame_timestamps"]
    assert len(frames) == 3 and frames == sorted(frames) and frames[0] >= 0 and frames[-1] < 2.0
    reparsed = parse_report(done["raw_text"], frames=len(frames))
    assert reparsed.error is None and reparsed.report == done["report"]
    # each hazard as its row stores it: the report's, with the time and reason of its frame
    plain = [{k: h[k] for k in ("kind", "description", "frame")} for h in done["hazards"]]
    assert plain == done["report"]["hazards"]
    assert all(0 <= h["frame"] < len(frames) for h in done["hazards"])
    chosen = done["frames"]
    assert all(
        (h["timestamp_s"], h["frame_reason"], h["frame_score"])
        == (frames[h["frame"]], chosen[h["frame"]]["reason"], chosen[h["frame"]]["score"])
        for h in done["hazards"]
    )
    # the default mode, events: a 2 s clip without an event gets its uniform frames
    assert (done["sampling"], done["event_frames"]) == ("events", 0)
    assert [(f["t"], f["reason"]) for f in chosen] == [(t, "uniform") for t in frames]
    assert (done["model"], done["adapter"]) == (str(tiny_model), "")
    assert (done["prompt_version"], done["schema_version"]) == (PROMPT_VERSION, SCHEMA_VERSION)
    assert done["tokens_in"] > 0 and done["tokens_out"] > 0 and done["latency_s"] > 0
    assert done["worker_host"].startswith(f"{socket.gethostname()}:")
    assert failed == {
        "path": str(tmp_path / "bad.mp4"),
        "status": "failed",
        "reason": "not a video: ffmpeg found no known container format",
    }


def test_nf4_keeps_the_vision_tower_and_lm_head_in_16_bit(tiny_model):
    """The skip list matches real module names: vision and lm_head stay, text layers go 4-bit."""
    import torch
    from transformers import Qwen3VLForConditionalGeneration
    from transformers.quantizers.quantizers_utils import should_convert_module

    from models.loader import NF4_SKIP_MODULES

    model = Qwen3VLForConditionalGeneration.from_pretrained(tiny_model)
    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    converted = {n for n in linears if should_convert_module(n, NF4_SKIP_MODULES)}
    assert converted, "no text layer would be quantised"
    assert all(".language_model." in n for n in converted)
    assert "lm_head" not in converted
    assert any(".visual." in n for n in linears) and not any(".visual." in n for n in converted)


def test_a_tokenizer_filled_to_size_encodes_as_the_trained_one_and_decodes_every_token():
    """The benchmarks' 4B-shaped model has a tokenizer of Qwen3's size (models.tiny): the
    made-up tokens come without merges, so text encodes exactly as before, and each
    decodes to its own text."""
    from models.prompt import SYSTEM, instruction
    from models.tiny import SPECIAL_TOKENS, build_tokenizer

    trained = build_tokenizer(1024)
    filled = build_tokenizer(1024, filled_to=5000)
    assert len(filled) == 5000 + len(SPECIAL_TOKENS) > len(trained)
    text = SYSTEM + instruction(8) + '{"scene_description":"A van, 3 lanes, rain."}'
    assert filled.encode(text) == trained.encode(text)
    made_up = range(len(trained) - len(SPECIAL_TOKENS), 5000)
    pieces = [filled.decode([i]) for i in made_up]
    assert len(set(pieces)) == len(pieces) and all(pieces)
    # unreachable by encoding: no merge makes them
    assert all(filled.encode(p) != [i] for p, i in zip(pieces[:200], made_up, strict=False))
