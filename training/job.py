"""One QLoRA SFT job, in the shape of a recipe: setup, train, save, measure, clean up.

`run_job(spec, hooks)` knows no queue and no SQL: its caller (the `train` task,
training/tasks.py) gives it the run's stored recipe and a `Hooks` object that records
progress and checkpoints and says when to stop (a cancel, a shutdown, a lost lease). The
steps:

1. setup: the dataset through `datasets` (seed format normalised; the held-out split is
   deterministic by the recipe's seed, so a resume splits the same way), the base model
   through the describe worker's loader (`models.loader.load_model`: NF4 with double
   quantisation, the very BitsAndBytesConfig a describe worker builds, so a resume
   rebuilds the identical 4-bit base and the adapter is trained on what it will run on),
   then TRL's SFTTrainer with a PEFT LoRA config.
2. train: `Trainer.train`, resumed from the run's last checkpoint when there is one (the
   adapter, optimizer, scheduler, RNG states and the data position are in it); a
   checkpoint every `save_steps`, and at a stop.
3. save the adapter, and measure before/after: held-out loss, and validity and field
   agreement through the describe engine (training/evaluate.py).
"""

from __future__ import annotations

import functools
import logging
import os
import time
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, Protocol

from training.recipe import ALL_LINEAR, Recipe

log = logging.getLogger(__name__)


class Stop(StrEnum):
    """Why a job stops before its last step."""

    CANCEL = "cancel"  # `python -m training cancel`: kept at its last checkpoint
    SHUTDOWN = "shutdown"  # the worker is stopping: resumed by the next worker
    LEASE_LOST = "lease lost"  # another worker holds the run now: write nothing more


@dataclass
class Progress:
    step: int
    total_steps: int
    epoch: float
    loss: float
    learning_rate: float | None
    grad_norm: float | None
    samples_per_s: float | None
    eta_s: float | None


class Hooks(Protocol):
    """What the job tells its caller, and asks it."""

    def started(self, *, split: dict, skipped: list, quantization: dict | None) -> None: ...
    def step(self, progress: Progress) -> None: ...
    def checkpoint(self, path: str) -> None: ...
    def measured(self, stage: str, metrics: dict) -> None: ...
    def stop_reason(self) -> Stop | None: ...


@dataclass
class JobSpec:
    """A run as the job sees it: what to train, where, and from which checkpoint."""

    name: str
    base_model: str
    dataset: str
    recipe: Recipe
    run_dir: Path
    quant: str = "nf4"
    compute: str | None = None  # e.g. "float16": T4 arithmetic on a newer GPU
    memory_gib: float = 0.0
    resume_from: str | None = None
    before: dict | None = None  # metrics an earlier attempt measured before training
    constrained: bool = True
    runner_config: Any = None  # models.runner.RunnerConfig of the describe workers

    @property
    def checkpoints(self) -> Path:
        return self.run_dir / "checkpoints"

    @property
    def adapter_dir(self) -> Path:
        return self.run_dir / "adapter"


@dataclass
class Outcome:
    state: str  # done | cancelled | interrupted | lost
    step: int
    adapter_path: str | None = None
    metrics: dict[str, Any] = field(default_factory=dict)


def run_job(spec: JobSpec, hooks: Hooks) -> Outcome:
    """Train `spec` to its last step or until `hooks` says stop."""
    from models.loader import load_model
    from models.memory import apply_memory_cap
    from training.data import prepare_dataset

    recipe = spec.recipe
    log.info("run %s: recipe %s", spec.name, recipe.model_dump_json())
    data = prepare_dataset(spec.dataset, heldout_fraction=recipe.heldout_fraction, seed=recipe.seed)
    loaded = load_model(spec.base_model, quant=spec.quant, compute=spec.compute)
    hooks.started(split=data.split, skipped=data.skipped, quantization=quantization_of(loaded))
    apply_memory_cap(loaded.device, spec.memory_gib)
    progress = progress_callback(hooks, recipe.effective_batch)
    trainer = build_trainer(
        loaded, recipe, data.train, data.heldout, output_dir=spec.checkpoints, callbacks=[progress]
    )
    before = spec.before
    if before is None:  # a fresh LoRA (B = 0) is the bare base: its metrics are the base's
        before = measure(trainer, loaded, data.heldout, spec)
        hooks.measured("before", before)
    began = time.monotonic()
    result = trainer.train(resume_from_checkpoint=spec.resume_from)
    step = trainer.state.global_step
    if progress.stopped == Stop.LEASE_LOST:
        return Outcome("lost", step)
    if progress.stopped is not None:
        state = "cancelled" if progress.stopped == Stop.CANCEL else "interrupted"
        return Outcome(state, step)
    trainer.save_model(str(spec.adapter_dir))
    after = measure(trainer, loaded, data.heldout, spec)
    train_metrics = {
        "train_loss": round(float(result.training_loss), 6),
        "steps": step,
        "seconds_this_attempt": round(time.monotonic() - began, 1),
        "trainable_parameters": trainable_parameters(trainer.model),
    }
    metrics = {"before": before, "after": after, "train": train_metrics, "split": data.split}
    return Outcome("done", step, str(spec.adapter_dir), metrics)


def quantization_of(loaded) -> dict | None:
    """The base's quantisation config as stored (None for fp16/bf16/fp32 bases)."""
    config = getattr(loaded.model.config, "quantization_config", None)
    if config is None:
        return None
    as_dict = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    keep = ("quant_method", "load_in_4bit", "bnb_4bit_quant_type", "bnb_4bit_use_double_quant")
    out = {k: as_dict.get(k) for k in keep}
    out["bnb_4bit_compute_dtype"] = str(as_dict.get("bnb_4bit_compute_dtype"))
    out["llm_int8_skip_modules"] = as_dict.get("llm_int8_skip_modules")
    return out


def lora_config(recipe: Recipe):
    from peft import LoraConfig

    targets = recipe.target_modules
    return LoraConfig(
        r=recipe.lora_rank,
        lora_alpha=recipe.lora_alpha,
        lora_dropout=recipe.lora_dropout,
        target_modules=ALL_LINEAR if targets == ALL_LINEAR else list(targets),
        task_type="CAUSAL_LM",
    )


def sft_config(recipe: Recipe, output_dir: Path, *, dtype, device: str, loader_workers: int):
    """TRL's SFTConfig for a recipe. The collator builds every input itself, so TRL's own
    dataset preparation and its truncation (max_length, 1024 by default, which cuts
    multi-image prompts) are off."""
    import torch
    from trl import SFTConfig

    return SFTConfig(
        output_dir=str(output_dir),
        per_device_train_batch_size=recipe.micro_batch,
        per_device_eval_batch_size=recipe.micro_batch,
        gradient_accumulation_steps=recipe.grad_accum,
        num_train_epochs=recipe.epochs,
        max_steps=recipe.max_steps,
        learning_rate=recipe.learning_rate,
        lr_scheduler_type=recipe.lr_scheduler,
        warmup_steps=recipe.warmup_ratio,  # below 1: a fraction of the steps
        weight_decay=recipe.weight_decay,
        max_grad_norm=recipe.max_grad_norm,
        optim=recipe.optimizer,
        activation_checkpointing=recipe.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False},
        activation_offloading=recipe.activation_offloading,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        use_cpu=device == "cpu",
        seed=recipe.seed,
        data_seed=recipe.seed,
        logging_steps=recipe.logging_steps,
        save_strategy="steps",
        save_steps=recipe.save_steps,
        save_total_limit=2,  # the newest two: the one recorded in SQL survives a rotation
        eval_strategy="no",
        report_to=[],
        disable_tqdm=True,
        remove_unused_columns=False,
        dataset_kwargs={"skip_prepare_dataset": True},
        max_length=None,
        dataloader_num_workers=loader_workers,
        dataloader_persistent_workers=loader_workers > 0,
    )


def build_trainer(
    loaded, recipe: Recipe, train, heldout, *, output_dir: Path, callbacks=(), loader_workers=None
):
    """SFTTrainer + PEFT on a loaded base, fed by the describe-shaped collator."""
    import torch
    from trl import SFTTrainer

    from training.collate import ReportCollator

    if loader_workers is None:
        # Preprocessing runs in spawned loader processes beside the GPU (never forked after
        # CUDA is up: training/__main__.py sets the start method); on the CPU, inline.
        loader_workers = 0 if loaded.device == "cpu" else min(4, max(0, (os.cpu_count() or 1) - 2))
    args = sft_config(
        recipe,
        output_dir,
        dtype=loaded.compute_dtype,
        device=loaded.device,
        loader_workers=loader_workers,
    )
    trainer = SFTTrainer(
        model=loaded.model,
        args=args,
        train_dataset=train,
        eval_dataset=heldout if len(heldout) else None,
        data_collator=ReportCollator(loaded.processor, recipe.frame_max_side),
        processing_class=loaded.processor,
        peft_config=lora_config(recipe),
        callbacks=list(callbacks),
    )
    if loaded.compute_dtype == torch.float16:
        trainable_in_fp32(trainer.model)
    return trainer


def trainable_in_fp32(model) -> int:
    """Under fp16 (a T4 has no bf16) keep the trainable weights in fp32: TRL puts a
    quantised model's LoRA weights in bf16, and the fp16 gradient scaler refuses them
    (`_amp_foreach_non_finite_check_and_unscale_cuda not implemented for BFloat16`).
    Autocast still runs the matmuls in fp16. Returns how many tensors were cast."""
    import torch

    cast = 0
    for param in model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()
            cast += 1
    return cast


def trainable_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def measure(trainer, loaded, heldout, spec: JobSpec) -> dict[str, Any]:
    """Held-out loss, and validity and field agreement through the describe engine."""
    out: dict[str, Any] = {"heldout_rows": len(heldout)}
    if not len(heldout):
        return out
    out["heldout_loss"] = round(float(trainer.evaluate(heldout)["eval_loss"]), 6)
    recipe = spec.recipe
    if recipe.eval_generate and recipe.eval_max_rows:
        rows = heldout.select(range(min(len(heldout), recipe.eval_max_rows)))
        out.update(_describe(trainer, loaded, rows, spec))
    return out


def _describe(trainer, loaded, rows, spec: JobSpec) -> dict[str, Any]:
    from models.loader import LoadedModel
    from models.runner import ModelRunner, RunnerConfig, report_grammar
    from training.evaluate import describe_metrics

    model = trainer.model
    was_training = model.training
    model.eval()
    try:
        current = LoadedModel(
            model,
            loaded.processor,
            loaded.model_id,
            spec.name,
            loaded.quant,
            loaded.device,
            loaded.compute_dtype,
        )
        config = spec.runner_config or RunnerConfig()
        grammar = report_grammar(current) if spec.constrained else None
        runner = ModelRunner(current, config, grammar=grammar)
        return describe_metrics(runner, rows, frame_max_side=spec.recipe.frame_max_side)
    finally:
        model.train(was_training)


def progress_callback(hooks: Hooks, samples_per_step: int):
    """A TrainerCallback that reports each optimizer step and checkpoint to `hooks` and
    stops training when they say so (at the step's end, saving a checkpoint first)."""
    return _progress_class()(hooks, samples_per_step)


@functools.cache
def _progress_class():
    # Defined on first use: importing this module must not import transformers.
    from transformers import TrainerCallback

    class _Progress(TrainerCallback):
        """Reports each optimizer step and checkpoint to the hooks, and stops when told."""

        def __init__(self, hooks: Hooks, samples_per_step: int):
            self.hooks = hooks
            self.samples_per_step = samples_per_step
            self.stopped: Stop | None = None
            self._last: float | None = None
            self._step_s: list[float] = []

        def on_train_begin(self, args, state, control, **kwargs):
            self._last = time.monotonic()

        def on_step_end(self, args, state, control, **kwargs):
            now = time.monotonic()
            if self._last is not None:
                self._step_s.append(now - self._last)
            self._last = now
            reason = self.hooks.stop_reason()
            if reason is not None and self.stopped is None:
                self.stopped = reason
                # Another worker owns the run's folder after a lost lease: write nothing.
                control.should_save = reason != Stop.LEASE_LOST
                control.should_training_stop = True
            return control

        def on_log(self, args, state, control, logs=None, **kwargs):
            logs = logs or {}
            if "loss" not in logs:
                return
            recent = self._step_s[-20:]
            step_s = sum(recent) / len(recent) if recent else None
            left = max(0, state.max_steps - state.global_step)
            self.hooks.step(
                Progress(
                    step=state.global_step,
                    total_steps=state.max_steps,
                    epoch=float(state.epoch or 0.0),
                    loss=float(logs["loss"]),
                    learning_rate=_maybe_float(logs.get("learning_rate")),
                    grad_norm=_maybe_float(logs.get("grad_norm")),
                    samples_per_s=round(self.samples_per_step / step_s, 4) if step_s else None,
                    eta_s=round(left * step_s, 1) if step_s else None,
                )
            )

        def on_save(self, args, state, control, **kwargs):
            if self.stopped != Stop.LEASE_LOST:
                self.hooks.checkpoint(
                    str(Path(args.output_dir) / f"checkpoint-{state.global_step}")
                )

    return _Progress


def _maybe_float(value) -> float | None:
    return None if value is None else float(value)
