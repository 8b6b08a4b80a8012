"""The training recipe: every shipped preset resolves and validates, bad values fail in one
line, a stored recipe reads back, and the recipe reaches PEFT and TRL as it says (LoRA on
the tiny Qwen3-VL adapts exactly the modules the preset names)."""

from __future__ import annotations

import pytest
import torch

from config.errors import ExpectedError
from training.job import lora_config, sft_config, trainable_in_fp32
from training.recipe import ALL_LINEAR, ATTENTION, PRESETS, BadRecipe, Recipe, from_stored, resolve

# -- presets ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_shipped_preset_resolves_and_validates(name):
    recipe = resolve(name)
    assert isinstance(recipe, Recipe)
    assert recipe.preset == name
    # Validated, not just built: the same fields pass a fresh validation.
    assert Recipe.model_validate(recipe.model_dump()) == recipe
    for field, value in PRESETS[name].items():
        assert getattr(recipe, field) == value, field


def test_seed_notebook_is_exactly_the_seed_notebooks_recipe():
    recipe = resolve("seed-notebook")
    assert (recipe.lora_rank, recipe.lora_alpha) == (32, 32)
    assert recipe.target_modules == "all-linear" == ALL_LINEAR
    assert recipe.learning_rate == 2e-4
    assert recipe.optimizer == "adamw_8bit"
    assert (recipe.micro_batch, recipe.grad_accum) == (2, 8)
    assert recipe.effective_batch == 16


def test_fleetscribe_is_the_stated_method():
    recipe = resolve("fleetscribe")
    assert resolve() == recipe  # the default preset
    assert recipe.lora_rank == 16
    assert recipe.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj"] == ATTENTION
    assert recipe.lr_scheduler == "cosine"
    assert 0 < recipe.warmup_ratio < 1
    assert recipe.effective_batch == 16
    assert recipe.gradient_checkpointing is True


# -- overrides and refusals ---------------------------------------------------------------


def test_overrides_apply_over_the_preset_and_none_is_ignored():
    recipe = resolve("seed-notebook", lora_rank=8, learning_rate=1e-4, seed=7)
    assert (recipe.lora_rank, recipe.learning_rate, recipe.seed) == (8, 1e-4, 7)
    # the preset's other values stay
    assert (recipe.lora_alpha, recipe.optimizer, recipe.micro_batch) == (32, "adamw_8bit", 2)
    assert resolve("seed-notebook", lora_rank=None, optimizer=None) == resolve("seed-notebook")
    assert resolve(target_modules=["q_proj"]).target_modules == ["q_proj"]


@pytest.mark.parametrize(
    ("preset", "overrides", "message"),
    [
        ("nope", {}, "unknown preset 'nope'; presets: fleetscribe, seed-notebook"),
        ("fleetscribe", {"lora_rank": 0}, "lora_rank: Input should be greater than or equal to 1"),
        (
            "fleetscribe",
            {"learning_rate": 2},
            "learning_rate: Input should be less than or equal to 1",
        ),
        (
            "seed-notebook",
            {"optimizer": "sgd"},
            "optimizer: Input should be 'adamw_torch', 'adamw_torch_fused', 'adamw_8bit' "
            "or 'paged_adamw_8bit'",
        ),
        (
            "fleetscribe",
            {"target_modules": []},
            "recipe: Value error, target_modules is empty: name the modules LoRA adapts",
        ),
        ("fleetscribe", {"bogus": 1}, "bogus: Extra inputs are not permitted"),
    ],
)
def test_a_bad_preset_or_value_fails_with_one_line(preset, overrides, message):
    with pytest.raises(BadRecipe) as caught:
        resolve(preset, **overrides)
    assert str(caught.value) == message
    assert isinstance(caught.value, ExpectedError)
    assert "\n" not in str(caught.value)
    # no pydantic error chained on for the user to read
    assert caught.value.__cause__ is None
    assert caught.value.__context__ is None or caught.value.__suppress_context__


def test_an_unknown_field_is_refused_also_on_the_model_itself():
    with pytest.raises(BadRecipe, match=r"^lora_ranc: Extra inputs are not permitted$"):
        resolve(lora_ranc=8)
    with pytest.raises(ValueError, match="Extra inputs are not permitted"):
        Recipe(preset="fleetscribe", lora_ranc=8)


# -- a run's stored recipe ----------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_from_stored_round_trips_the_stored_json(name):
    recipe = resolve(name, lora_rank=4, max_steps=3, frame_max_side=320)
    stored = {"recipe": recipe.model_dump(mode="json"), "other": "ignored"}
    again = from_stored(stored)
    assert again == recipe
    assert again.effective_batch == recipe.effective_batch


@pytest.mark.parametrize(
    "config",
    [
        {},
        None,
        {"recipe": "fleetscribe"},
        {"recipe": None},
        {"recipe": {"preset": "fleetscribe", "lora_rank": "many"}},
        {"recipe": {"preset": "fleetscribe", "unheard_of": 1}},
        {"recipe": {"lora_rank": 16}},  # no preset
    ],
)
def test_from_stored_refuses_garbage_with_bad_recipe(config):
    with pytest.raises(BadRecipe) as caught:
        from_stored(config)
    assert str(caught.value).startswith("the run's stored recipe is not readable: ")
    assert "\n" not in str(caught.value)


# -- the recipe in PEFT -------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_lora_config_carries_the_recipe(name):
    from peft import LoraConfig

    recipe = resolve(name)
    config = lora_config(recipe)
    assert isinstance(config, LoraConfig)
    assert (config.r, config.lora_alpha, config.lora_dropout) == (
        recipe.lora_rank,
        recipe.lora_alpha,
        recipe.lora_dropout,
    )
    assert config.task_type == "CAUSAL_LM"
    if recipe.target_modules == ALL_LINEAR:
        assert config.target_modules == ALL_LINEAR
    else:
        assert config.target_modules == set(recipe.target_modules)


def _fresh_base(tiny_model):
    """A model of its own: get_peft_model changes the model it is given."""
    from models.loader import load_model

    return load_model(str(tiny_model), quant="fp32").model


def _adapted(peft_model) -> set[str]:
    """The names of the modules that got a LoRA layer, as in the base model."""
    prefix = "base_model.model."
    names = {n.rsplit(".lora_", 1)[0] for n, _ in peft_model.named_modules() if ".lora_" in n}
    return {n.removeprefix(prefix) for n in names}


def test_fleetscribe_adapts_only_the_language_models_attention(tiny_model):
    from peft import get_peft_model

    base = _fresh_base(tiny_model)
    layers = base.config.text_config.num_hidden_layers
    model = get_peft_model(base, lora_config(resolve("fleetscribe")))
    adapted = _adapted(model)
    expected = {
        f"model.language_model.layers.{i}.self_attn.{proj}"
        for i in range(layers)
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj")
    }
    assert adapted == expected
    assert not [n for n, _ in model.named_modules() if ".visual." in n and "lora_" in n]
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)


def test_seed_notebooks_all_linear_adapts_the_vision_tower_too(tiny_model):
    from peft import get_peft_model

    base = _fresh_base(tiny_model)
    vision_linear = {
        n
        for n, m in base.named_modules()
        if n.startswith("model.visual.") and isinstance(m, torch.nn.Linear)
    }
    model = get_peft_model(base, lora_config(resolve("seed-notebook")))
    adapted = _adapted(model)
    in_vision = {n for n in adapted if n.startswith("model.visual.")}
    # every linear layer of the vision tower (attention, MLPs, mergers), by name
    assert in_vision == vision_linear
    assert len(in_vision) >= 8
    assert {"model.visual.blocks.0.attn.qkv", "model.visual.blocks.0.attn.proj"} <= in_vision
    # and the language model's MLPs besides its attention; never the output head
    assert "model.language_model.layers.0.mlp.down_proj" in adapted
    assert "lm_head" not in adapted


# -- the recipe in TRL --------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_sft_config_lets_the_collator_build_every_input(name, tmp_path):
    recipe = resolve(name)
    args = sft_config(recipe, tmp_path, dtype=torch.float32, device="cpu", loader_workers=0)
    # TRL's truncation (1024 by default) would cut multi-image prompts
    assert args.max_length is None
    assert args.dataset_kwargs == {"skip_prepare_dataset": True}
    assert args.remove_unused_columns is False
    assert args.per_device_train_batch_size == recipe.micro_batch
    assert args.gradient_accumulation_steps == recipe.grad_accum
    assert args.per_device_train_batch_size * args.gradient_accumulation_steps == 16
    assert args.save_total_limit == 2
    assert args.output_dir == str(tmp_path)
    assert args.optim == recipe.optimizer
    assert args.learning_rate == recipe.learning_rate
    assert args.lr_scheduler_type == recipe.lr_scheduler
    assert args.gradient_checkpointing is recipe.gradient_checkpointing
    assert (args.bf16, args.fp16, args.use_cpu) == (False, False, True)
    # warmup_steps below 1 is a fraction of the steps: 3 % of 100 steps
    assert args.get_warmup_steps(100) == 3


def test_trainable_in_fp32_casts_only_the_trainable_weights(tiny_model):
    from peft import get_peft_model

    model = get_peft_model(_fresh_base(tiny_model), lora_config(resolve("fleetscribe")))
    # A bf16 base with bf16 LoRA weights, as TRL leaves a quantised model's adapter.
    model.to(torch.bfloat16)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    frozen = {
        n: (p.data_ptr(), p.dtype) for n, p in model.named_parameters() if not p.requires_grad
    }
    assert trainable and all(p.dtype == torch.bfloat16 for p in trainable.values())
    assert {dtype for _, dtype in frozen.values()} == {torch.bfloat16}

    assert trainable_in_fp32(model) == len(trainable)

    after = dict(model.named_parameters())
    assert all(after[n].dtype == torch.float32 and after[n].requires_grad for n in trainable)
    assert all((after[n].data_ptr(), after[n].dtype) == frozen[n] for n in frozen)
    assert trainable_in_fp32(model) == 0  # nothing left to cast
