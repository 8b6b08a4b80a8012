"""Compatibility patches for the libraries under the model, each explicit and documented.

Nothing here runs at import time: a patch is applied by calling its function, once, from
`models.runner.build_runner`, and only when the setting that needs it is on. Each says
which library behaviour it works around and when it can go.
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)


def allow_compiling_nf4(model) -> bool:
    """Let `generate` compile the decode step of a bitsandbytes 4-bit model; True if the
    model's quantizer was patched.

    bitsandbytes (0.46 on, torch 2.8 on) registers its 4-bit matmul as torch custom ops, so
    `Linear4bit` compiles without graph breaks (bitsandbytes PR #1616); transformers' bnb
    quantizer still answers `is_compileable = False`, which makes `generate` run every
    decode step eagerly. This gives this one model's quantizer a subclass that answers
    True; the class itself, and every other model, are left alone. Remove it once
    transformers' bnb 4-bit quantizer reports itself compileable."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is None or quantizer.is_compileable:
        return False
    base = type(quantizer)
    model.hf_quantizer.__class__ = type(base.__name__, (base,), {"is_compileable": True})
    log.info("compiling the decode step of the 4-bit model")
    return True
