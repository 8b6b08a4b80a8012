"""An alternative attention for the text decoder's decode steps, to measure against SDPA.

The H100 profile of 2026-12-07 (`benchmarks/results/throughput_h100_17_profile_h100_profile.txt`)
put 24 ms of a ~35 ms decode step at 128 rows in PyTorch SDPA's cuDNN kernel: one query
token per row (4 per key/value head once transformers packs the grouped heads) against a
static cache of ~2,300 slots, at about half the card's memory bandwidth. Here a decode
step's attention is two batched matrix products over the key/value heads (the scores of
the 4 query heads of each group against the cached keys, then the weighted values), with
the softmax in float32 between them: each cached key and value is read once, by cuBLAS.

`use_matmul_decode_attention(model)` registers it with transformers' AttentionInterface
(and its mask with AttentionMaskInterface: SDPA's) under `NAME`, for the text decoder only;
a prefill (several query tokens) goes to transformers' own SDPA unchanged. Only the
throughput benchmark turns it on (`--decode-attention sdpa,matmul`, rows side by side)
until the GPU machine has measured it; the tests hold it to SDPA's output.
"""

from __future__ import annotations

NAME = "fleetscribe_matmul_decode"
CHOICES = ("sdpa", "matmul")


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


def use_decode_attention(model, choice: str) -> None:
    """Set the text decoder's attention: `sdpa` (transformers' own, the default) or
    `matmul` (this module's for decode steps); process-wide, like the vision tower's."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    if choice not in CHOICES:
        raise ValueError(f"decode attention must be one of {', '.join(CHOICES)}")
    text = model.config.get_text_config()
    if choice == "sdpa":
        if text._attn_implementation == NAME:
            text._attn_implementation = "sdpa"
        return
    AttentionInterface.register(NAME, matmul_decode_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)
    text._attn_implementation = NAME
