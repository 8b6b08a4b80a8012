"""Training sees what inference sees: the collator's prompt is the describe runner's, token
for token and pixel for pixel; its answer is what the grammar admits; its batches run
through the tiny Qwen3-VL; and truncation, TRL's default, breaks multi-image prompts."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from conftest import Frames
from helpers import make_runner
from PIL import Image
from test_seed_format import seed_answer, valid_report

from models.grammar import answer_text
from training.collate import IGNORE, ReportCollator, fit_frame
from video.media import scaled_size

TOKEN_KEYS = ("input_ids", "attention_mask", "mm_token_type_ids", "labels")
MISMATCH = "Image features and image tokens do not match"


def pattern(i: int, width: int = 96, height: int = 64) -> Image.Image:
    """A small RGB frame with a pattern of its own (so frames and crops differ)."""
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([(x * 3 + i * 40) % 256, (y * 5 + i * 20) % 256, ((x + y) * 2) % 256], -1)
    return Image.fromarray(rgb.astype(np.uint8))


def report() -> dict:
    """A valid schema-v1 report with text the grammar cleans up (curly quotes, a dash)."""
    return {
        **valid_report(),
        "scene_description": "A white van \u2019s ahead \u2014 a pedestrian waits at the crossing.",
        "hazards": [{"kind": "pedestrian", "description": "at the kerb", "frame": 3}],
    }


def row(frames: int = 4, *, size: tuple[int, int] = (96, 64), **extra) -> dict:
    return {
        "images": [pattern(i, *size) for i in range(frames)],
        "timestamps": [round(0.4 + 1.5 * i, 2) for i in range(frames)],
        "report": json.dumps(report()),
        "source": "test",
        **extra,
    }


@pytest.fixture(scope="module")
def collator(tiny_loaded):
    return ReportCollator(tiny_loaded.processor, frame_max_side=640)


@pytest.fixture(scope="module")
def runner(tiny_loaded):
    return make_runner(tiny_loaded, constrained=False)


def prompt_of(encoded: dict) -> torch.Tensor:
    return encoded["labels"][0] == IGNORE


# -- one row ------------------------------------------------------------------------------


def test_the_prompt_is_exactly_the_describe_runners(collator, runner):
    example = row(4)
    encoded = collator.encode(example)
    frames = [np.array(image.convert("RGB")) for image in example["images"]]
    prepared = runner.prepare(Frames(frames, example["timestamps"])).tensors

    prompt = prompt_of(encoded)
    n = prepared["input_ids"].shape[1]
    # the prompt is a prefix: the first n positions, and only those
    assert prompt.sum().item() == n and prompt[:n].all()
    assert torch.equal(encoded["input_ids"][:, :n], prepared["input_ids"])
    assert torch.equal(encoded["attention_mask"][:, :n], prepared["attention_mask"])
    assert torch.equal(encoded["pixel_values"], prepared["pixel_values"])
    assert torch.equal(encoded["image_grid_thw"], prepared["image_grid_thw"])
    assert "mm_token_type_ids" in encoded
    assert torch.equal(encoded["mm_token_type_ids"][:, :n], prepared["mm_token_type_ids"])
    assert encoded["mm_token_type_ids"][:, :n].any()  # the images are marked
    assert not encoded["mm_token_type_ids"][:, n:].any()
    assert encoded["attention_mask"].all()
    assert all(encoded[k].shape == encoded["input_ids"].shape for k in TOKEN_KEYS)


def test_the_labelled_part_is_the_grammars_answer_then_the_stop_token(collator, tiny_loaded):
    tokenizer = tiny_loaded.processor.tokenizer
    example = row(2)  # the hazard's frame 3 is held below 2 frames
    encoded = collator.encode(example)
    labels = encoded["labels"][0]
    answer = labels[labels != IGNORE]
    expected = answer_text(report(), 2)
    assert expected != json.dumps(report(), separators=(",", ":"))  # cleaned up, not copied
    assert '"frame":1' in expected
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.decode(answer) == expected + "<|im_end|>"
    # labels are the input ids themselves on the answer
    assert torch.equal(answer, encoded["input_ids"][0][labels != IGNORE])


def test_large_frames_are_resized_as_the_describe_sampler_resizes_them(tiny_loaded, tmp_path):
    from producer.clips import make_video
    from video.media import sample_frames

    clip = make_video(tmp_path / "clip.mp4", width=320, height=180, seconds=1.0)
    full = sample_frames(clip, 2, max_side=4096)
    sampled = sample_frames(clip, 2, max_side=100)  # what a describe worker would see
    assert full.frames[0].shape == (180, 320, 3)
    collator = ReportCollator(tiny_loaded.processor, frame_max_side=100)
    for big, small in zip(full.frames, sampled.frames, strict=True):
        image = fit_frame(big, collator.frame_max_side)
        assert (image.height, image.width, 3) == small.shape == (56, 100, 3)
        assert image.size == scaled_size(320, 180, 100)
        # the same picture: only the two scalers' rounding differs
        assert np.abs(np.asarray(image, dtype=int) - small.astype(int)).mean() < 8

    # through encode: the pixels the processor gets are the sampler-sized frames'
    example = {
        "images": list(full.frames),
        "timestamps": full.timestamps,
        "report": json.dumps(report()),
    }
    resized = [np.array(fit_frame(frame, collator.frame_max_side)) for frame in full.frames]
    prepared = make_runner(tiny_loaded, constrained=False).prepare(Frames(resized, full.timestamps))
    encoded = collator.encode(example)
    assert torch.equal(encoded["image_grid_thw"], prepared.tensors["image_grid_thw"])
    assert torch.equal(encoded["pixel_values"], prepared.tensors["pixel_values"])
    unresized = ReportCollator(tiny_loaded.processor, frame_max_side=4096).encode(example)
    assert not torch.equal(unresized["image_grid_thw"], encoded["image_grid_thw"])


def test_small_frames_are_left_as_they_are(collator):
    for image in (pattern(0), pattern(1, 40, 30)):
        out = fit_frame(image, collator.frame_max_side)
        assert out.size == image.size
        assert np.array_equal(np.asarray(out), np.asarray(image))
    array = np.asarray(pattern(2))
    assert np.array_equal(np.asarray(fit_frame(array, collator.frame_max_side)), array)


# -- batches ------------------------------------------------------------------------------


def test_rows_of_different_lengths_are_right_padded(collator, tiny_loaded):
    rows = [row(2), row(4, size=(64, 64)), row(1)]
    encoded = [collator.encode(r) for r in rows]
    batch = collator(rows)
    pad_id = tiny_loaded.processor.tokenizer.pad_token_id
    lengths = [e["input_ids"].shape[1] for e in encoded]
    assert len(set(lengths)) == 3
    width = max(lengths)
    assert all(batch[k].shape == (3, width) for k in TOKEN_KEYS)
    fills = {"input_ids": pad_id, "labels": IGNORE, "attention_mask": 0, "mm_token_type_ids": 0}
    for i, (e, n) in enumerate(zip(encoded, lengths, strict=True)):
        for key, fill in fills.items():
            assert torch.equal(batch[key][i, :n], e[key][0]), key
            assert (batch[key][i, n:] == fill).all(), key
        assert batch["attention_mask"][i, :n].all()
    assert torch.equal(batch["pixel_values"], torch.cat([e["pixel_values"] for e in encoded]))
    assert torch.equal(batch["image_grid_thw"], torch.cat([e["image_grid_thw"] for e in encoded]))


def test_a_collated_batch_trains_as_its_rows_do(collator, tiny_loaded):
    model = tiny_loaded.model
    rows = [row(2), row(4)]
    batch = collator(rows)
    with torch.no_grad():
        loss = model(**batch).loss
        assert torch.isfinite(loss)
        # the batch's loss is its rows' (per answer token): padding changes nothing
        weighted, tokens = 0.0, 0
        for r in rows:
            e = collator.encode(r)
            n = int((e["labels"][:, 1:] != IGNORE).sum())
            weighted += model(**e).loss.item() * n
            tokens += n
        assert loss.item() == pytest.approx(weighted / tokens, rel=1e-4)
        # Qwen3-VL's forward needs mm_token_type_ids beside input_ids: the collator keeps it
        without = {k: v for k, v in batch.items() if k != "mm_token_type_ids"}
        with pytest.raises(ValueError, match="`mm_token_type_ids` is missing"):
            model(**without)


# -- the TRL trap: truncation ---------------------------------------------------------------


def truncated(batch: dict, max_length: int) -> dict:
    """What TRL's DataCollatorForVisionLanguageModeling does with max_length."""
    return {k: v[:, :max_length] if k in TOKEN_KEYS else v for k, v in batch.items()}


def image_span(batch: dict, image_token_id: int) -> tuple[int, int]:
    where = (batch["input_ids"][0] == image_token_id).nonzero().flatten()
    return int(where.min()), int(where.max())


# Enough frames that the image tokens reach past half the sequence, as 8 frames at
# 640x360 reach past TRL's 1024 tokens on the real model.
MANY_FRAMES = 24


def test_a_truncated_multi_image_prompt_fails_and_ours_is_never_cut(collator, tiny_loaded):
    model = tiny_loaded.model
    batch = collator([row(MANY_FRAMES, size=(128, 128))])
    length = batch["input_ids"].shape[1]
    max_length = length // 2
    first, last = image_span(batch, model.config.image_token_id)
    assert first < max_length <= last  # the cut falls among the image tokens
    with torch.no_grad():
        assert torch.isfinite(model(**batch).loss)
        with pytest.raises(ValueError, match=f"^{MISMATCH}, tokens: "):
            model(**truncated(batch, max_length))


def seed_row(frames: int) -> dict:
    """A row in the seed's format (prompt / completion messages), as TRL reads it."""
    images = [pattern(i, 128, 128) for i in range(frames)]
    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": "Describe."}]
    return {
        "images": images,
        "prompt": [{"role": "user", "content": content}],
        "completion": [{"role": "assistant", "content": [{"type": "text", "text": seed_answer()}]}],
    }


def test_trls_own_collator_with_a_max_length_breaks_the_same_way(tiny_loaded):
    from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling

    model = tiny_loaded.model
    processor = tiny_loaded.processor
    example = seed_row(MANY_FRAMES)

    def collate(max_length):
        trl = DataCollatorForVisionLanguageModeling(
            processor, max_length=max_length, completion_only_loss=True
        )
        return trl([copy.deepcopy(example)])

    whole = collate(None)
    length = whole["input_ids"].shape[1]
    first, last = image_span(whole, model.config.image_token_id)
    assert first < length // 2 <= last
    cut = collate(length // 2)
    assert cut["input_ids"].shape[1] == length // 2
    assert torch.equal(cut["pixel_values"], whole["pixel_values"])  # every frame still there
    with torch.no_grad():
        assert torch.isfinite(model(**whole).loss)
        with pytest.raises(ValueError, match=f"^{MISMATCH}, tokens: "):
            model(**cut)
