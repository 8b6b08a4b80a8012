"""Training rows -> model inputs, exactly as the describe worker builds them.

A canonical training row (training/data.py) holds a video's sampled frames, their
timestamps and its schema-v1 report. The prompt is the describe worker's own
(`models.prompt.build_messages` through the processor's chat template, as
`ModelRunner.prepare` does), the frames are resized as the worker's sampler resizes them,
and the answer is the report written as the decoding grammar shapes it
(`models.grammar.answer_text`), then the stop token. So training and inference see the
same inputs, and the model learns the answers the grammar lets it write.

Loss is on the answer tokens only (labels -100 on the prompt and padding). Rows are padded
on the right to the batch's longest; `mm_token_type_ids` (Qwen3-VL's forward needs it
beside `input_ids`) travels with them. Nothing is ever truncated: a cut multi-image prompt
fails with "Image features and image tokens do not match".
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from models.grammar import answer_text
from models.prompt import build_messages
from video.media import scaled_size

IGNORE = -100
_TOKEN_KEYS = ("input_ids", "attention_mask", "mm_token_type_ids")


@dataclass
class ReportCollator:
    """Batches canonical rows for the model (the Trainer's `data_collator`)."""

    processor: Any
    frame_max_side: int = 640

    def encode(self, row: dict[str, Any]) -> dict[str, Any]:
        """One row's tensors of shape (1, n), with `labels`."""
        import torch

        frames = [fit_frame(image, self.frame_max_side) for image in row["images"]]
        timestamps = [float(t) for t in row["timestamps"]]
        prompt = self.processor.apply_chat_template(
            build_messages(timestamps), tokenize=False, add_generation_prompt=True
        )
        inputs = dict(self.processor(text=[prompt], images=frames, return_tensors="pt"))
        tokenizer = self.processor.tokenizer
        answer = answer_text(json.loads(row["report"]), len(frames)) + self._stop
        answer_ids = tokenizer(answer, add_special_tokens=False, return_tensors="pt")["input_ids"]
        prompt_len = inputs["input_ids"].shape[1]
        inputs["input_ids"] = torch.cat([inputs["input_ids"], answer_ids], dim=1)
        ones = torch.ones_like(answer_ids)
        inputs["attention_mask"] = torch.cat([inputs["attention_mask"], ones], dim=1)
        if "mm_token_type_ids" in inputs:
            zeros = torch.zeros_like(answer_ids)
            inputs["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], zeros], dim=1)
        labels = inputs["input_ids"].clone()
        labels[:, :prompt_len] = IGNORE
        inputs["labels"] = labels
        return inputs

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        return self.pad([self.encode(row) for row in rows])

    def pad(self, encoded: list[dict[str, Any]]) -> dict[str, Any]:
        """Right-pad token tensors to the longest row; concatenate the pixel tensors."""
        import torch

        pad_id = self.processor.tokenizer.pad_token_id
        width = max(e["input_ids"].shape[1] for e in encoded)
        out: dict[str, Any] = {}
        for key in encoded[0]:
            parts = [e[key] for e in encoded]
            if key in (*_TOKEN_KEYS, "labels"):
                fill = {"input_ids": pad_id, "labels": IGNORE}.get(key, 0)
                out[key] = torch.cat(
                    [torch.nn.functional.pad(t, (0, width - t.shape[1]), value=fill) for t in parts]
                )
            else:
                out[key] = torch.cat(parts)
        return out

    @property
    def _stop(self) -> str:
        # What ends an answer at inference: the chat template's end of turn (Qwen: <|im_end|>).
        tokenizer = self.processor.tokenizer
        return getattr(tokenizer, "eos_token", None) or "<|im_end|>"


def fit_frame(image, max_side: int):
    """A PIL image (or RGB array) at the size the describe worker's sampler gives."""
    from PIL import Image

    if not isinstance(image, Image.Image):
        image = Image.fromarray(image)
    image = image.convert("RGB")
    size = scaled_size(image.width, image.height, max_side)
    return image if size == image.size else image.resize(size, Image.Resampling.BICUBIC)
