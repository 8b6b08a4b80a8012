"""Fused element-wise kernels for the text decoder's prefill (the phase before the first
answer token), opt-in (`FLEETSCRIBE_PREFILL=fused`) until the GPU machine has measured it.

The H100 profile of 2026-12-07 (`benchmarks/results/throughput_h100_17_profile_h100_profile.txt`)
put about 4 s of the text prefill's 7.3 s (128 videos) in memory-bound element-wise
kernels, more than its matrix products: RMSNorm in float32 (a cast, `pow`, `mean`,
`rsqrt`, two `mul`s and a cast back, each a pass over the activations), the rotary
embedding (`rotate_half`: two slices, a `neg`, a `cat`, then `mul`s and an `add`) and SiLU
times the up projection. Here each of the three is one function compiled by
`torch.compile` (Inductor fuses each into one kernel), with the same arithmetic as
transformers' Qwen3-VL text model:

- every text RMSNorm module's forward (`input_layernorm`, `post_attention_layernorm`,
  `q_norm`, `k_norm`, the final `norm`);
- the modeling module's `apply_rotary_pos_emb`, which the text attention calls by name;
- every text MLP's `act_fn(gate_proj(x)) * up_proj(x)` (the projections stay the model's:
  4-bit, with any LoRA adapter).

`FusedPrefill(model)` is a context manager put around the prefill only (models.decode_loop);
decode steps, captured as CUDA graphs, keep the eager ops. The vision tower is untouched.
Compiled kernels round differently from eager ones in the last bit, so greedy tokens may
differ from `generate`'s where two logits almost tie (`benchmarks/gpu_smoke.py` counts
how often). If the compiler fails, the reason is logged once and the eager ops run from
then on (models.errors.CompilerFallback); out of memory is the caller's, as in eager.
"""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable
from contextlib import contextmanager
from typing import Any

from models.errors import CompilerFallback

log = logging.getLogger(__name__)

BACKEND = "inductor"  # torch.compile's backend (the tests trace with aot_eager: no codegen)


def rms_norm(hidden, weight, eps: float):
    """Qwen3-VL's text RMSNorm: in float32, then scaled by the weight in the input's dtype."""
    import torch

    dtype = hidden.dtype
    hidden = hidden.to(torch.float32)
    variance = hidden.pow(2).mean(-1, keepdim=True)
    hidden = hidden * torch.rsqrt(variance + eps)
    return weight * hidden.to(dtype)


def rotary(q, k, cos, sin, unsqueeze_dim: int = 1):
    """transformers' `apply_rotary_pos_emb`: q * cos + rotate_half(q) * sin, and for k."""
    import torch

    cos = cos.unsqueeze(unsqueeze_dim)
    sin = sin.unsqueeze(unsqueeze_dim)

    def rotate_half(x):
        half = x.shape[-1] // 2
        return torch.cat((-x[..., half:], x[..., :half]), dim=-1)

    return (q * cos) + (rotate_half(q) * sin), (k * cos) + (rotate_half(k) * sin)


def silu_mul(gate, up):
    import torch

    return torch.nn.functional.silu(gate) * up


class FusedPrefill:
    """The text decoder's element-wise ops, compiled, swapped in while the context is open."""

    def __init__(self, model, *, backend: str | None = None):
        import torch

        decoder = model.get_decoder()
        text = model.config.get_text_config()
        self.fallback = CompilerFallback(log, "fused prefill")  # one for the three ops
        compile_ = functools.partial(
            torch.compile, dynamic=True, fullgraph=True, backend=backend or BACKEND
        )
        self._norm = self._guarded(compile_(rms_norm), rms_norm)
        self._rotary = self._guarded(compile_(rotary), rotary)
        self._silu_mul = self._guarded(compile_(silu_mul), silu_mul)
        self.norms = [m for m in decoder.modules() if type(m).__name__.endswith("TextRMSNorm")]
        self.mlps = []
        if text.hidden_act == "silu":
            self.mlps = [
                m
                for m in decoder.modules()
                if all(hasattr(m, name) for name in ("gate_proj", "up_proj", "down_proj"))
            ]
        attention = next(
            (m for m in decoder.modules() if type(m).__name__.endswith("TextAttention")), None
        )
        self.modeling = sys.modules[type(attention).__module__] if attention else None
        if self.modeling is not None and not hasattr(self.modeling, "apply_rotary_pos_emb"):
            self.modeling = None

    @property
    def failure(self) -> str | None:
        """Why the compiler failed, once it did (the eager ops run from then on)."""
        return self.fallback.failure

    def _guarded(self, compiled: Callable, eager: Callable) -> Callable:
        """`compiled` until the compiler fails once (logged, with the reason), then `eager`."""

        def call(*args, **kwargs):
            return self.fallback.run(
                lambda: compiled(*args, **kwargs), lambda: eager(*args, **kwargs)
            )

        return call

    @contextmanager
    def __call__(self):
        """While open, the text decoder's RMSNorms, rotary embedding and SiLU-times-up run
        fused; afterwards (also after an error) the model's own again."""
        undo: list[Callable[[], None]] = []
        try:
            for norm in self.norms:
                norm.forward = functools.partial(self._norm_forward, norm)
                undo.append(functools.partial(_restore_forward, norm))
            for mlp in self.mlps:
                mlp.forward = functools.partial(self._mlp_forward, mlp)
                undo.append(functools.partial(_restore_forward, mlp))
            if self.modeling is not None:
                name, eager = "apply_rotary_pos_emb", self.modeling.apply_rotary_pos_emb
                setattr(self.modeling, name, self._rotary)
                undo.append(functools.partial(setattr, self.modeling, name, eager))
            yield
        finally:
            for step in reversed(undo):
                step()

    def _norm_forward(self, norm, hidden):
        return self._norm(hidden, norm.weight, norm.variance_epsilon)

    def _mlp_forward(self, mlp, x):
        return mlp.down_proj(self._silu_mul(mlp.gate_proj(x), mlp.up_proj(x)))


def _restore_forward(module: Any) -> None:
    """Drop the instance's forward: the class's own is found again."""
    module.__dict__.pop("forward", None)
