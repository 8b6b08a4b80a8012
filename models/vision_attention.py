"""The vision tower's attention over whole runs of same-sized frames, not frame by frame.

Qwen3-VL's vision blocks attend within each frame. Under PyTorch's SDPA, transformers
does that in a Python loop: one `scaled_dot_product_attention` call per frame per block,
i.e. 1,024 frames x 24 blocks = 24,576 calls for a batch of 128 videos of 8 frames, most of
them tiny, with the GPU waiting on the launches. Frames of one size form a run; each run
is one batched call here, (frames x heads x patches x dim), the same arithmetic.

It is registered with transformers' AttentionInterface (the library's extension point)
under a name that takes the vision blocks' variable-length path (the one flash attention
uses: the frames' boundaries `cu_seqlens` come in, no mask), and set on the vision tower
only; the text decoder keeps its own attention. `models.runner.build_runner` applies it,
a process-wide step, for the engine's graph loop (CUDA, `FLEETSCRIBE_GENERATION=auto|graph`).
"""

from __future__ import annotations

import itertools

NAME = "flash_varlen_by_sdpa_runs"  # "flash" routes the vision blocks to the varlen path
# Off CUDA (or in float32) SDPA may fall back to its math kernel, which holds the whole
# (frames x heads x patches x patches) score tensor: bound it per call.
_SCORE_BYTES = 2**28


def frame_runs(cu_seqlens: list[int]) -> list[tuple[int, int, int]]:
    """(start, frames, patches) of each run of consecutive equal-length segments."""
    runs: list[tuple[int, int, int]] = []
    for a, b in itertools.pairwise(cu_seqlens):
        length = b - a
        if runs and runs[-1][2] == length:
            start, count, _ = runs[-1]
            runs[-1] = (start, count + 1, length)
        else:
            runs.append((a, 1, length))
    return runs


def runs_attention(module, query, key, value, attention_mask=None, **kwargs):
    """query/key/value (1, heads, patches, dim); returns ((1, patches, heads, dim), None)."""
    import torch

    scaling = kwargs.get("scaling")
    bounds = kwargs["cu_seq_lens_q"].tolist()
    _, heads, _, dim = query.shape
    exact = query.device.type != "cuda" or query.dtype == torch.float32
    parts = []
    for start, count, length in frame_runs(bounds):
        step = count
        if exact:
            step = max(1, _SCORE_BYTES // (heads * length * length * query.element_size()))
        for first in range(0, count, step):
            n = min(step, count - first)
            a = start + first * length
            b = a + n * length

            def frames(t, a=a, b=b, n=n, length=length):
                return t[0, :, a:b].reshape(heads, n, length, dim).transpose(0, 1)

            out = torch.nn.functional.scaled_dot_product_attention(
                frames(query), frames(key), frames(value), scale=scaling
            )
            parts.append(out.transpose(1, 2).reshape(n * length, heads, dim))
    return torch.cat(parts).unsqueeze(0), None


def use_runs_attention(model) -> bool:
    """Set it on the vision tower of `model` (a Qwen3-VL, under an adapter too); False if
    the model has no such tower or already uses a flash attention of its own."""
    from transformers import AttentionInterface

    from models.loader import vision_language_model

    visual = getattr(vision_language_model(model), "visual", None)
    if visual is None:
        return False
    current = visual.config._attn_implementation
    if current == NAME:
        return True
    if current not in (None, "sdpa", "eager"):
        return False  # a real flash attention: already one call per block
    AttentionInterface.register(NAME, runs_attention)
    visual.config._attn_implementation = NAME
    return True
