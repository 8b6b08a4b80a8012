"""A training run's recipe: one typed object, resolved from a named preset plus overrides.

The resolved recipe is logged and stored with the run when it is submitted, and read back
(never rebuilt from defaults) when a run resumes, so a resume trains with what the run
started with. Two presets ship:

- `fleetscribe` (default): SEED.md's stated method. LoRA rank 16 on the language model's
  attention projections (the vision tower stays frozen), AdamW with a cosine schedule and
  warmup, effective batch 16, loss on the answer tokens only, gradient checkpointing.
- `seed-notebook`: what the seed's notebook actually runs: rank 32, alpha 32 on all linear
  projections (the vision tower's included), lr 2e-4, 8-bit AdamW, batch 2 x 8.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from config.errors import ExpectedError

# The language model's attention projections. The vision tower's are named `qkv` and
# `proj` in Qwen3-VL, so this leaves it frozen.
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
# PEFT's own shorthand: every linear layer except the output head (vision tower included).
ALL_LINEAR = "all-linear"


class BadRecipe(ExpectedError):
    """A preset name or an override that is not a valid recipe."""


class Recipe(BaseModel):
    """Everything that decides what a run trains, and how."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    preset: str
    # LoRA
    lora_rank: int = Field(16, ge=1, le=1024)
    lora_alpha: int = Field(32, ge=1)
    lora_dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] | Literal["all-linear"] = Field(default_factory=lambda: ATTENTION)
    # optimisation
    learning_rate: float = Field(2e-4, gt=0, le=1)
    lr_scheduler: Literal["cosine", "linear", "constant_with_warmup"] = "cosine"
    warmup_ratio: float = Field(0.03, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    optimizer: Literal["adamw_torch", "adamw_torch_fused", "adamw_8bit", "paged_adamw_8bit"] = (
        "adamw_torch"
    )
    epochs: float = Field(1.0, gt=0)
    max_steps: int = Field(-1, ge=-1)  # > 0 overrides epochs
    # 8 x 2: the same effective batch as the seed's 2 x 8 in a quarter of the passes. At
    # T4 settings (15 GiB, fp16, 8 frames of 640x360, ~256 answer tokens) it peaks at
    # 12.2 GiB and trains 2.8x the seed's samples/s (benchmarks/results/train_h200.txt).
    micro_batch: int = Field(8, ge=1, le=256)
    grad_accum: int = Field(2, ge=1, le=1024)
    gradient_checkpointing: bool = True
    # Checkpointed activations wait in pinned CPU memory (TRL's activation offloading):
    # room on the GPU for a larger micro-batch, paid in PCIe traffic.
    activation_offloading: bool = False
    seed: int = 0
    # durability and evaluation
    save_steps: int = Field(50, ge=1)  # a checkpoint every this many optimizer steps
    logging_steps: int = Field(1, ge=1)
    heldout_fraction: float = Field(0.1, ge=0, lt=1)
    # Held-out metrics through the describe engine (validity, field agreement) before and
    # after training: slow on a large held-out split, so it can be capped or turned off.
    eval_generate: bool = True
    eval_max_rows: int = Field(64, ge=0)
    # inputs: frames are resized as the describe worker's sampler resizes them
    frame_max_side: int = Field(640, ge=32, le=4096)

    @model_validator(mode="after")
    def _targets_named(self) -> Recipe:
        if isinstance(self.target_modules, list) and not self.target_modules:
            raise ValueError("target_modules is empty: name the modules LoRA adapts")
        return self

    @property
    def effective_batch(self) -> int:
        return self.micro_batch * self.grad_accum


PRESETS: dict[str, dict[str, Any]] = {
    "fleetscribe": {},
    "seed-notebook": {
        "lora_rank": 32,
        "lora_alpha": 32,
        "target_modules": ALL_LINEAR,
        "learning_rate": 2e-4,
        "optimizer": "adamw_8bit",
        "micro_batch": 2,
        "grad_accum": 8,
    },
}
DEFAULT_PRESET = "fleetscribe"


def resolve(preset: str = DEFAULT_PRESET, **overrides: Any) -> Recipe:
    """The recipe of `preset` with `overrides` (None values are ignored); BadRecipe says
    what is wrong in one line."""
    if preset not in PRESETS:
        raise BadRecipe(f"unknown preset {preset!r}; presets: {', '.join(PRESETS)}")
    fields = {**PRESETS[preset], **{k: v for k, v in overrides.items() if v is not None}}
    try:
        return Recipe(preset=preset, **fields)
    except ValidationError as e:
        raise BadRecipe(_one_line(e)) from None


def from_stored(config: dict[str, Any]) -> Recipe:
    """The recipe a run was submitted with (its stored `config["recipe"]`)."""
    recipe = config.get("recipe") if isinstance(config, dict) else None
    if not isinstance(recipe, dict):
        raise BadRecipe("the run's stored recipe is not readable: its config holds no recipe")
    try:
        return Recipe(**recipe)
    except ValidationError as e:
        raise BadRecipe(f"the run's stored recipe is not readable: {_one_line(e)}") from None


def _one_line(e: ValidationError) -> str:
    first = e.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "recipe"
    return f"{where}: {first['msg']}"
