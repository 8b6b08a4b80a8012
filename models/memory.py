"""GPU memory for batching: how many videos a batch may hold, learned from the batches run.

Before the first batch the cost of a token is estimated from the model's shape (KV cache
plus prefill activations); after each batch the peak it really took, per token, is kept
(the largest seen), so the next batches are sized from measurement. The cap
(`FLEETSCRIBE_GPU_MEMORY_GIB`) is a process-wide step of its own, `apply_memory_cap`.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from models.loader import LoadedModel

log = logging.getLogger(__name__)

# Memory kept free for the allocator's fragmentation and CUDA's own needs.
HEADROOM = 0.85


class GpuMemory:
    """One device's memory as the runner sees it: a budget in rows, and the peak."""

    def __init__(self, loaded: LoadedModel, *, cap: int = 0):
        self.loaded = loaded
        self.device = loaded.device
        self.on_cuda = loaded.device.startswith("cuda")
        self.cap = cap  # bytes (apply_memory_cap); 0: the whole card
        self.bytes_per_token: float | None = None  # measured after each batch
        # The most GPU memory any batch has used (weights included), since the last reset.
        self.peak = 0

    def rows(self, row_tokens: int, held: int = 0) -> int | None:
        """How many rows of `row_tokens` (prompt + answer room) fit now; None off CUDA.
        `held`: bytes already allocated for the coming rows themselves (their vision
        features, encoded ahead), which the per-token cost already counts."""
        if not self.on_cuda:
            return None
        import torch

        free, _ = torch.cuda.mem_get_info(self.device)
        usable = free + torch.cuda.memory_reserved(self.device)  # the cache is reusable
        if self.cap:
            usable = min(usable, self.cap)
        budget = usable * HEADROOM - torch.cuda.memory_allocated(self.device) + held
        per_token = self.bytes_per_token or estimated_bytes_per_token(self.loaded)
        return int(budget // (per_token * row_tokens))

    def spare(self) -> int | None:
        """Bytes this process may still allocate now (within the cap, with headroom; the
        allocator's cache counts as taken, since another stream cannot reuse it); None
        off CUDA."""
        if not self.on_cuda:
            return None
        import torch

        free, _ = torch.cuda.mem_get_info(self.device)
        reserved = torch.cuda.memory_reserved(self.device)
        if self.cap:
            free = min(free, self.cap - reserved)
        return max(0, int(free * HEADROOM))

    @contextmanager
    def measured(self, rows: int, row_tokens: int, held: int = 0):
        """Around one batch: learn the peak bytes it took per token, to size the next.
        `held`: bytes the batch came with already allocated for itself (its vision
        features, encoded ahead), counted as its own, as when it makes them inside."""
        if not self.on_cuda:
            yield
            return
        import torch

        torch.cuda.reset_peak_memory_stats(self.device)
        base = torch.cuda.memory_allocated(self.device)
        yield
        total = torch.cuda.max_memory_allocated(self.device)
        self.peak = max(self.peak, total)
        above = total - base + held
        self.bytes_per_token = max(above / (rows * row_tokens), self.bytes_per_token or 0.0)
        log.info(
            "batch of %d: peak %.2f GiB, %.2f above the weights",
            rows,
            total / 2**30,
            above / 2**30,
        )

    def in_use(self) -> dict[str, int] | None:
        """This process's memory on the device now: in_use (allocated), reserved (the
        allocator's cache) and peak (the most any batch took); None off CUDA. Read on a
        metrics scrape (metrics.collectors.GpuMemoryCollector)."""
        memory = cuda_memory(self.device) if self.on_cuda else None
        if memory is not None:  # the peak of batches, not since the last per-batch reset
            memory["peak"] = max(self.peak, memory["in_use"])
        return memory

    def release(self) -> None:
        """After an out-of-memory error: hand the allocator's cache back before a retry."""
        if self.on_cuda:
            import torch

            torch.cuda.empty_cache()


def estimated_bytes_per_token(loaded: LoadedModel) -> float:
    """Before the first batch is measured: KV cache plus prefill activations, per token."""
    import torch

    text = loaded.model.config.get_text_config()
    size = torch.finfo(loaded.compute_dtype).bits // 8
    head_dim = getattr(text, "head_dim", text.hidden_size // text.num_attention_heads)
    kv = 2 * text.num_hidden_layers * text.num_key_value_heads * head_dim * size
    activations = 2 * (3 * text.intermediate_size + 8 * text.hidden_size) * size
    return float(kv + activations)


def apply_memory_cap(device: str, memory_gib: float) -> int:
    """Cap this process's CUDA allocations (FLEETSCRIBE_GPU_MEMORY_GIB), process-wide;
    returns the cap in bytes, 0 for none (the whole card, or not on CUDA)."""
    if not memory_gib or not device.startswith("cuda"):
        return 0
    import torch

    index = torch.device(device).index
    index = torch.cuda.current_device() if index is None else index
    total = torch.cuda.get_device_properties(index).total_memory
    cap = int(memory_gib * 2**30)
    torch.cuda.set_per_process_memory_fraction(min(1.0, cap / total), index)
    return min(cap, total)


def cuda_memory(device: str | None = None) -> dict[str, int] | None:
    """in_use (allocated), reserved and peak bytes of this process on `device` (the current
    one when None); None while this process has not started CUDA (or has no torch loaded:
    a scrape never imports torch for this)."""
    import sys

    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_initialized():
        return None
    return {
        "in_use": torch.cuda.memory_allocated(device),
        "reserved": torch.cuda.memory_reserved(device),
        "peak": torch.cuda.max_memory_allocated(device),
    }
