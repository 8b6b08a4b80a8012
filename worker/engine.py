"""The describe engine: sampled videos in, model answers out, batched on one device.

One Engine per worker process, made after any fork (see worker/app.py), never per task.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from models.loader import LoadedModel, load_describer
from models.prompt import PROMPT_VERSION, build_messages
from worker.settings import Settings

if TYPE_CHECKING:  # PyAV is not needed to run the model
    from worker.video import SampledVideo

log = logging.getLogger(__name__)


@dataclass
class Answer:
    """The model's answer for one video."""

    text: str
    tokens_in: int
    tokens_out: int
    latency_s: float


class Engine:
    """Holds the loaded model; `describe` runs a list of videos in batches."""

    def __init__(self, loaded: LoadedModel, *, max_new_tokens: int, batch_size: int):
        self.loaded = loaded
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self.prompt_version = PROMPT_VERSION
        self._lock = threading.Lock()  # one generate at a time on the device

    @property
    def model_id(self) -> str:
        return self.loaded.model_id

    @property
    def adapter(self) -> str:
        return self.loaded.adapter

    @classmethod
    def from_settings(cls, settings: Settings) -> Engine:
        loaded = load_describer(settings.model, quant=settings.quant, adapter=settings.adapter)
        return cls(loaded, max_new_tokens=settings.max_new_tokens, batch_size=settings.batch_size)

    def describe(self, videos: list[SampledVideo]) -> list[Answer]:
        """One answer per video, in order."""
        answers: list[Answer] = []
        for start in range(0, len(videos), self.batch_size):
            answers += self._generate(videos[start : start + self.batch_size])
        return answers

    def _generate(self, videos: list[SampledVideo]) -> list[Answer]:
        import torch

        processor = self.loaded.processor
        began = time.perf_counter()
        texts = [
            processor.apply_chat_template(
                build_messages(v.timestamps), tokenize=False, add_generation_prompt=True
            )
            for v in videos
        ]
        images = [frame for v in videos for frame in v.frames]
        inputs = processor(text=texts, images=images, padding=True, return_tensors="pt")
        inputs = inputs.to(self.loaded.device)
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.loaded.compute_dtype)
        prompt_len = inputs["input_ids"].shape[1]
        with self._lock, torch.inference_mode():
            out = self.loaded.model.generate(
                **inputs, max_new_tokens=self.max_new_tokens, do_sample=False
            )
        new = out[:, prompt_len:].cpu()
        stop_ids = set(_as_list(self.loaded.model.generation_config.eos_token_id))
        pad_id = processor.tokenizer.pad_token_id
        elapsed = time.perf_counter() - began
        answers = []
        for row, mask in zip(new.tolist(), inputs["attention_mask"].cpu(), strict=True):
            kept = []
            for token in row:
                if token in stop_ids:
                    break
                kept.append(token)
            tokens_out = len(kept) + (1 if len(kept) < len(row) and row[len(kept)] != pad_id else 0)
            text = processor.tokenizer.decode(kept, skip_special_tokens=True)
            answers.append(Answer(text, int(mask.sum()), tokens_out, elapsed))
        return answers


def _as_list(value) -> list[int]:
    if value is None:
        return []
    return list(value) if isinstance(value, list | tuple) else [value]


_engine: Engine | None = None
_engine_lock = threading.Lock()


def get_engine(settings: Settings) -> Engine:
    """This process's engine, loaded on first use."""
    global _engine
    with _engine_lock:
        if _engine is None:
            _engine = Engine.from_settings(settings)
        return _engine
