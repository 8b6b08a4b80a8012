"""Load the model (NF4 / fp16 / bf16 / fp32) with its processor and adapter.

The heavy imports live inside the functions: importing this module costs nothing.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from models.errors import ModelLoadError

log = logging.getLogger(__name__)


class Quant(StrEnum):
    """How the base model's weights are held on the device."""

    NF4 = "nf4"  # 4-bit NormalFloat + double quantisation (QLoRA); needs CUDA
    FP16 = "fp16"
    BF16 = "bf16"
    FP32 = "fp32"  # CPU runs and exactness tests


# Kept in 16-bit under NF4: the vision tower is small and quantising it costs accuracy,
# and lm_head is tied to the embeddings.
NF4_SKIP_MODULES = ["model.visual", "lm_head"]


@dataclass
class LoadedModel:
    model: Any
    processor: Any
    model_id: str
    adapter: str
    quant: Quant
    device: str
    compute_dtype: Any


def compute_dtype(quant: Quant, device: str, override: str | None = None):
    """The dtype the matmuls run in: bf16 where the GPU has it (not on a T4), else fp16."""
    import torch

    if override:  # e.g. "float16": T4 behaviour on a newer GPU (benchmarks)
        return getattr(torch, override)
    if quant == Quant.FP32 or device == "cpu":
        return torch.float32
    if quant == Quant.FP16:
        return torch.float16
    if quant == Quant.BF16:
        return torch.bfloat16
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def load_model(
    model: str,
    *,
    quant: Quant | str = Quant.NF4,
    adapter: str | None = None,
    adapter_name: str | None = None,
    device: str | None = None,
    compute: str | None = None,
) -> LoadedModel:
    """Load base model + processor (+ LoRA adapter) once; ModelLoadError says what is wrong.

    `adapter` is the adapter's folder (or hub id); `adapter_name` is what reports record
    (a registered adapter's name; default: `adapter` itself)."""
    import torch
    from transformers import AutoProcessor, Qwen3VLForConditionalGeneration
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    prefer_expandable_segments()  # CUDA first allocates below
    quant = Quant(quant)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if quant == Quant.NF4 and not device.startswith("cuda"):
        raise ModelLoadError(
            "FLEETSCRIBE_QUANT=nf4 needs a CUDA GPU (bitsandbytes 4-bit); "
            "set FLEETSCRIBE_QUANT=fp32 to run on the CPU"
        )
    check_source(model)
    dtype = compute_dtype(quant, device, compute)
    kwargs: dict[str, Any] = {"dtype": dtype}
    if quant == Quant.NF4:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
            llm_int8_skip_modules=NF4_SKIP_MODULES,
        )
        kwargs["device_map"] = {"": torch.device(device).index or 0}
    try:
        processor = AutoProcessor.from_pretrained(model)
        net = Qwen3VLForConditionalGeneration.from_pretrained(model, **kwargs)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot load model {model}: {_first_line(e)}") from e
    if quant != Quant.NF4:
        net.to(device)
    if adapter:
        net = _attach_adapter(net, adapter)
    net.eval()
    processor.tokenizer.padding_side = "left"
    log.info("loaded %s (%s, compute %s) on %s, adapter %s", model, quant, dtype, device, adapter)
    label = adapter_name or adapter or ""
    return LoadedModel(net, processor, model, label, quant, device, dtype)


def prefer_expandable_segments() -> None:
    """Batches of varying shape fragment the CUDA caching allocator; expandable segments let
    freed blocks merge. PyTorch reads this when CUDA starts, so a process that starts CUDA
    before loading the model (a memory cap, a device query) calls this first."""
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")


def vision_language_model(model):
    """The Qwen3-VL model inside the generation head (vision tower, text decoder, rope
    index), under a PEFT adapter too; None for a model without one."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(base, "model", None)


def check_source(model: str) -> None:
    looks_local = model.startswith(("/", ".", "~")) or os.sep in model.strip("/").replace(
        "/", os.sep, 1
    )
    path = Path(model).expanduser()
    if looks_local and not path.exists():
        raise ModelLoadError(f"model directory {model} does not exist")
    if path.is_dir() and not (path / "config.json").exists():
        raise ModelLoadError(f"{model} has no config.json: not a saved model directory")


def _attach_adapter(net, adapter: str):
    from peft import PeftModel

    if not Path(adapter).expanduser().exists() and os.environ.get("HF_HUB_OFFLINE") == "1":
        raise ModelLoadError(f"adapter {adapter} does not exist")
    try:
        return PeftModel.from_pretrained(net, adapter)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot load adapter {adapter}: {_first_line(e)}") from e


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else type(e).__name__
