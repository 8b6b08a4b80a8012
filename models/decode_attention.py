"""An alternative attention for the text decoder's decode steps, to measure against SDPA.

The H100 profile of 2026-12-07 (`benchmarks/results/throughput_h100_17_profile_h100_profile.txt`)
put 24 ms of a ~35 ms decode step at 128 rows in PyTorch SDPA's cuDNN kernel: one query
token per row (4 per key/value head once transformers packs the grouped heads) against a
static cache of ~2,300 slots, at about half the card's memory bandwidth. Here a decode
step's attention is two batched matrix products over the key/value heads (the scores of
the 4 query heads of each group against the cached keys, then the weighted values), with
the softmax in float32 between them: each cached key and value is read once, by cuBLAS.

A second candidate, `flex`, is PyTorch's FlexAttention compiled by `torch.compile`: for
one query token it takes the FlexDecoding kernel, which splits the cache's slots across
thread blocks (flash decoding) and reads the grouped heads' keys and values once
(`enable_gqa`); the mask is a `score_mod` over the batch's bool mask. It compiles on the
first decode step of a bucket (the loop's eager warm-up step, before capture), with
dynamic shapes, so the buckets and cache widths of later batches reuse it.

`use_decode_attention(model, choice)` registers the chosen one with transformers'
AttentionInterface (and its mask with AttentionMaskInterface: SDPA's) under its name, for
the text decoder only; a prefill (several query tokens) goes to transformers' own SDPA
unchanged. A worker takes one with `FLEETSCRIBE_DECODE_ATTENTION` (models.runner.build_runner);
the default stays SDPA until the GPU machine has measured them (`throughput.py
--decode-attention sdpa,matmul,flex`, rows side by side); the tests hold both to SDPA's
output.
"""

from __future__ import annotations

import logging

from models.errors import CompilerFallback

log = logging.getLogger(__name__)

NAME = "fleetscribe_matmul_decode"
FLEX_NAME = "fleetscribe_flex_decode"
CHOICES = ("sdpa", "matmul", "flex")
_compiled_flex = None  # torch.compile(flex_attention), made on first use (the GPU thread)
BACKEND = "inductor"  # its backend (the tests trace with aot_eager: no CPU codegen)
# Why it failed, once (`flex_fallback.failure`): SDPA from then on.
flex_fallback = CompilerFallback(log, "FlexAttention decode", instead="SDPA")


def matmul_decode_attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
    """query (rows, heads, q, dim), key/value (rows, kv_heads, slots, dim); the mask SDPA
    would get (bool: True attends; or additive float). Returns ((rows, q, heads, dim), None)."""
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    rows, heads, q_len, dim = query.shape
    if q_len != 1:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, scaling=scaling, **kwargs
        )
    kv_heads = key.shape[1]
    group = heads // kv_heads
    scale = dim**-0.5 if scaling is None else scaling
    q = query.reshape(rows, kv_heads, group, dim)
    scores = torch.matmul(q, key.transpose(-1, -2)).float() * scale  # (rows, kv, group, slots)
    if attention_mask is not None:
        mask = attention_mask[:, :, -1:, :]  # (rows or 1, 1, 1, slots): this query's row
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, float("-inf"))
        else:
            scores = scores + mask.float()
    weights = torch.softmax(scores, dim=-1).to(value.dtype)
    out = torch.matmul(weights, value)  # (rows, kv, group, dim)
    return out.reshape(rows, heads, 1, dim).transpose(1, 2), None


def flex_decode_attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
    """As `matmul_decode_attention`, through FlexAttention's decoding kernel, compiled."""
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    global _compiled_flex
    rows, _, q_len, dim = query.shape

    def sdpa():
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, scaling=scaling, **kwargs
        )

    if q_len != 1 or flex_fallback.failure is not None:
        return sdpa()
    if _compiled_flex is None:
        from torch.nn.attention.flex_attention import flex_attention

        _compiled_flex = torch.compile(flex_attention, dynamic=True, backend=BACKEND)
    score_mod = None
    if attention_mask is not None:
        mask = attention_mask[:, 0, -1, : key.shape[2]].expand(rows, -1)  # (rows, slots)
        if mask.dtype == torch.bool:

            def score_mod(score, b, h, q_idx, kv_idx):
                return torch.where(mask[b, kv_idx], score, float("-inf"))

        else:

            def score_mod(score, b, h, q_idx, kv_idx):
                return score + mask[b, kv_idx].to(score.dtype)

    scale = dim**-0.5 if scaling is None else scaling

    def flex():
        out = _compiled_flex(query, key, value, score_mod=score_mod, scale=scale, enable_gqa=True)
        return out.transpose(1, 2), None

    return flex_fallback.run(flex, sdpa)


def use_decode_attention(model, choice: str) -> None:
    """Set the text decoder's attention: `sdpa` (transformers' own, the default) or
    `matmul` (this module's for decode steps); process-wide, like the vision tower's."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    if choice not in CHOICES:
        raise ValueError(f"decode attention must be one of {', '.join(CHOICES)}")
    text = model.config.get_text_config()
    if choice == "sdpa":
        if text._attn_implementation in (NAME, FLEX_NAME):
            text._attn_implementation = "sdpa"
        return
    name, function = {
        "matmul": (NAME, matmul_decode_attention),
        "flex": (FLEX_NAME, flex_decode_attention),
    }[choice]
    AttentionInterface.register(name, function)
    ALL_MASK_ATTENTION_FUNCTIONS.register(name, sdpa_mask)
    text._attn_implementation = name
