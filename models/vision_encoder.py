"""The vision tower, run by the engine's loop itself: per video, and ahead of its batch.

HF `generate` runs the vision tower inside the prefill, on the GPU thread, with the GPU's
decode work stopped, and in a form full of host synchronisations: the tower's rotary
positions, interpolation taps and frame boundaries come from `grid_thw` on the device
(a Python loop over the batch's 1,024 frames, `.tolist()` and `.item()` calls), and so
does the split of its output per frame. The engine's loop (`generation` graph or loop)
instead:

- computes those inputs per video on the feeders' threads, from the grid on the CPU
  (`vision_inputs`, called by `ModelRunner.prepare`), so the tower runs with no host
  synchronisation and no per-frame loop;
- runs the tower itself (`VisionEncoder.encode`) and hands the prefill its features
  (`mm_encoder_outputs`, which transformers' Qwen3-VL takes instead of pixels);
- and, while one batch decodes, encodes the videos already queued for the next batch a
  group at a time between two decode steps, on a side CUDA stream (`VisionEncoder.ahead`):
  the tower is bound by arithmetic and a decode step by memory reads, so the GPU does
  both at once, and the next batch starts its prefill with its features ready.

Each video's features stay on its `Prepared` (`encoded`), so a video encoded ahead is
never encoded twice, whichever batch it lands in. Knows no queue: the caller says which
videos are coming (`models.runner` gets them from the worker's batcher).
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from models.errors import one_line
from models.loader import vision_language_model
from models.vision_attention import NAME as RUNS_ATTENTION

log = logging.getLogger(__name__)

# Videos a step of `ahead` encodes at most: big enough for full GEMMs (8 frames each: 128
# frames, about 110,000 patches at 640x360), small enough that the tower's activations
# beside a decoding batch stay a few GiB.
GROUP = 16
# With fewer videos than a group queued, a step of `ahead` waits for more, for at most this
# many decode steps (the feeders are still preparing the next batch).
_GATHER_STEPS = 8
# The tower's activations at their peak, per patch, in 16-bit units of its hidden and MLP
# widths (the input, q/k/v and the attention's output; the MLP's intermediate in float32).
_PEAK_HIDDEN, _PEAK_MLP = 8, 4


@dataclass
class VisionFeatures:
    """One video's vision features on the device, per image: the merged tokens the prompt's
    placeholders take, and the DeepStack features added in the text decoder's first layers."""

    pooled: list[Any]
    deepstack: list[list[Any]]  # per DeepStack layer, per image
    ready: Any = None  # CUDA event recorded after they were written on a side stream

    def tensors(self) -> list[Any]:
        return [*self.pooled, *(t for layer in self.deepstack for t in layer)]


def vision_inputs(model, grid) -> dict[str, Any]:
    """The vision tower's per-patch inputs for one video's frames (`grid`: image_grid_thw
    on the CPU), computed here on the CPU by transformers' own helpers: rotary position
    ids, the taps and weights resampling the learned position table, each frame's patch
    count (the attention's segments) and each image's merged token count."""
    from transformers.vision_utils import (
        get_vision_interpolation_indices_and_weights,
        get_vision_position_ids,
    )

    visual = vision_language_model(model).visual
    indices, weights = get_vision_interpolation_indices_and_weights(
        grid,
        num_grid_per_side=visual.num_grid_per_side,
        mode=visual.interpolation_mode,
        align_corners=visual.interpolation_align_corners,
        spatial_merge_size=visual.spatial_merge_size,
    )
    return {
        "position_ids": get_vision_position_ids(grid, visual.spatial_merge_size),
        "interp_indices": indices,
        "interp_weights": weights,
        "segments": [h * w for t, h, w in grid.tolist() for _ in range(t)],
        "tokens": [t * h * w // visual.spatial_merge_size**2 for t, h, w in grid.tolist()],
    }


class VisionEncoder:
    """Runs the vision tower over prepared videos (`Prepared` with `pixel_values`,
    `image_grid_thw` and `vision`, see `vision_inputs`); stores each one's features on it."""

    def __init__(self, model, device: str, dtype, memory=None):
        self.vlm = vision_language_model(model)
        self.device = device
        self.dtype = dtype
        self.on_cuda = device.startswith("cuda")
        self.memory = memory  # models.memory.GpuMemory: how much a group may take
        self.ahead_groups = 0  # groups encoded ahead during the batch now decoding
        self._ahead: weakref.WeakSet = weakref.WeakSet()  # videos encoded ahead, while alive
        self._stream = None
        self._output_type = None  # the tower's own output class (with DeepStack features)
        self.failure: str | None = None  # why encoding ahead last stopped: out of memory|error

    def encode(self, videos: Sequence[Any]) -> None:
        """Features for every video of `videos` that has none yet, on the current stream."""
        todo = [v for v in videos if v.encoded is None]
        if todo:
            self._encode(todo)

    def ahead(self, upcoming: Callable[[], list[Any]], limit: int) -> Callable[[], None]:
        """A step to call between two decode steps: each call encodes at most one group of
        the videos `upcoming()` lists (queued for later batches), on a side stream, up to
        `limit` videos in all, and only as many as the memory left beside the decoding
        batch holds. Off CUDA the groups run on the calling thread (tests). Call
        `finish_ahead` once the batch is done."""
        self.ahead_groups = 0
        steps = self._encode_ahead(upcoming, limit)
        return lambda: next(steps, None)

    def finish_ahead(self) -> None:
        """After a batch that encoded ahead: the side stream's cached blocks go back to the
        device, so the next batch's prefill (on the main stream) can have them."""
        if self.ahead_groups and self.on_cuda:
            import torch

            torch.cuda.empty_cache()
        self.ahead_groups = 0

    def bytes_needed(self, videos: Sequence[Any]) -> int:
        """About the most memory the tower takes for `videos` at once, features included."""
        config = self.vlm.visual.config
        width = _PEAK_HIDDEN * config.hidden_size + _PEAK_MLP * config.intermediate_size
        patches = sum(sum(v.vision["segments"]) for v in videos)
        return patches * width * 2  # 16-bit

    def _fitting(self, todo: list[Any]) -> list[Any]:
        """The longest head of `todo` whose encoding fits the memory spare now (after the
        allocator's cache was handed back once for this batch: the side stream cannot
        reuse the main stream's cached blocks)."""
        if self.memory is None:
            return todo
        if self.ahead_groups == 0 and self.on_cuda:
            import torch

            torch.cuda.empty_cache()
        spare = self.memory.spare()
        if spare is None:  # off CUDA
            return todo
        while todo and self.bytes_needed(todo) > spare:
            todo = todo[:-1]
        return todo

    def held_bytes(self) -> int:
        """Device memory held by features encoded ahead and not yet taken by a prefill."""
        return self.feature_bytes([v for v in self._ahead if v.encoded is not None])

    @staticmethod
    def feature_bytes(videos: Sequence[Any]) -> int:
        """Device memory of these videos' features (those encoded)."""
        total = 0
        for video in videos:
            if video.encoded is not None:
                total += sum(t.numel() * t.element_size() for t in video.encoded.tensors())
        return total

    def _encode_ahead(self, upcoming: Callable[[], list[Any]], limit: int) -> Iterator[None]:
        import torch

        done, waited = 0, 0
        while done < limit:
            want = min(GROUP, limit - done)
            todo = [v for v in upcoming() if v.encoded is None][:want]
            if not todo:
                yield
                continue
            if len(todo) < want and waited < _GATHER_STEPS:
                waited += 1
                yield
                continue
            waited = 0
            todo = self._fitting(todo)
            if not todo:  # nothing more fits beside this batch: the rest go with theirs
                return
            try:
                if self.on_cuda:
                    if self._stream is None:
                        self._stream = torch.cuda.Stream()
                    with torch.cuda.stream(self._stream):
                        self._encode(todo)
                        event = torch.cuda.Event()
                        event.record(self._stream)
                    for video in todo:
                        video.encoded.ready = event
                else:
                    self._encode(todo)
            except Exception as e:
                # The batch decoding comes first: out of memory, or a video the tower
                # cannot take, these videos are encoded with their own batch instead (where
                # a bad one fails alone, with its reason), and nothing more goes ahead
                # during this batch. Said once per kind of failure.
                for video in todo:
                    video.encoded = None
                kind = "out of memory" if isinstance(e, torch.OutOfMemoryError) else "error"
                if self.failure != kind:
                    log.warning(
                        "encoding %d videos ahead failed (%s); they are encoded with their "
                        "batch instead",
                        len(todo),
                        one_line(e),
                    )
                self.failure = kind
                return
            done += len(todo)
            self.ahead_groups += 1
            self._ahead.update(todo)
            yield

    def outputs(self, videos: Sequence[Any]):
        """The features of `videos` (all encoded) in the form the prefill takes as
        `mm_encoder_outputs["image"]`: per frame, in the batch's order. Waits (on the
        device) for those encoded ahead, whose memory the current stream now uses too."""
        import torch

        pooled: list[Any] = []
        layers = len(videos[0].encoded.deepstack)
        deepstack: list[list[Any]] = [[] for _ in range(layers)]
        waited: set[int] = set()
        for video in videos:
            features = video.encoded
            if features.ready is not None:
                stream = torch.cuda.current_stream()
                if id(features.ready) not in waited:
                    stream.wait_event(features.ready)
                    waited.add(id(features.ready))
                for t in features.tensors():
                    t.record_stream(stream)
                features.ready = None
            pooled += features.pooled
            for layer, frames in zip(deepstack, features.deepstack, strict=True):
                layer += frames
        return self._output_type(
            pooler_output=tuple(pooled), deepstack_features=[tuple(x) for x in deepstack]
        )

    def _encode(self, videos: Sequence[Any]) -> None:
        """The tower over `videos`' frames at once; no host synchronisation."""
        import torch

        visual = self.vlm.visual

        def joined(key: str):
            parts = [v.tensors[key] if key == "pixel_values" else v.vision[key] for v in videos]
            return torch.cat([p.to(self.device, non_blocking=True) for p in parts])

        segments = [n for v in videos for n in v.vision["segments"]]
        bounds = torch.tensor([0, *segments], dtype=torch.int32).cumsum(0, dtype=torch.int32)
        if visual.config._attn_implementation not in _HOST_SEGMENTS:
            bounds = bounds.to(self.device, non_blocking=True)  # a real flash kernel's
        out = visual(
            joined("pixel_values").to(visual.dtype),
            grid_thw=torch.cat([v.tensors["image_grid_thw"] for v in videos]),
            position_ids=joined("position_ids"),
            interp_indices=joined("interp_indices"),
            interp_weights=joined("interp_weights"),
            cu_seqlens=bounds,
            max_seqlen=max(segments),
            return_dict=True,
        )
        self._output_type = type(out)
        sizes = [n for v in videos for n in v.vision["tokens"]]  # merged tokens per image
        pooled = torch.split(out.pooler_output.to(self.dtype), sizes)
        layers = [torch.split(f.to(self.dtype), sizes) for f in out.deepstack_features]
        start = 0
        for video in videos:
            n = len(video.vision["tokens"])
            video.encoded = VisionFeatures(
                pooled=list(pooled[start : start + n]),
                deepstack=[list(layer[start : start + n]) for layer in layers],
            )
            start += n


# Attention implementations of the vision blocks that read the frames' boundaries on the
# host (the runs of models.vision_attention, and SDPA/eager's per-frame split).
_HOST_SEGMENTS = (RUNS_ATTENTION, "sdpa", "eager", None)
