"""A tiny random Qwen3-VL, built offline, saved like the real one so it loads the same way.

The tokenizer is a byte-level BPE trained here on the prompt and schema vocabulary, with
the Qwen3-VL special tokens; the chat template is written here and renders the same
shape of prompt as the real model's.
"""

from __future__ import annotations

from pathlib import Path

# Written for fleetscribe: Qwen's <|im_start|> turn format, an image as
# <|vision_start|><|image_pad|><|vision_end|>; the processor expands <|image_pad|>.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{%- elif part['type'] == 'text' -%}{{ part['text'] }}"
    "{%- endif -%}{%- endfor -%}{%- endif -%}"
    "{{ '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)

SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]


def _corpus() -> list[str]:
    from models import prompt, schema

    text = [prompt.SYSTEM, prompt.instruction(8)]
    text += [f'"{k}": ' for k in schema.DrivingParameters.model_fields]
    text += ["true", "false", "null", "[]", "{}", '", "', '": "', "0123456789"]
    text += [
        "A car ahead brakes at the intersection while a pedestrian crosses on the right. "
        "Wet road, light rain, heavy traffic; the ego vehicle should slow down and keep distance."
    ] * 4
    return text


def made_up_tokens(seed: int = 0):
    """Tokens shaped like a large byte-level BPE's, made up here (no download), endlessly:
    words with and without a leading space, digit runs, runs of spaces and newlines, CJK
    characters; some may repeat."""
    import random

    rng = random.Random(seed)
    letters = "etaoinshrdlcumwfgypbvkjxqz"
    weights = [12, 9, 8, 8, 7, 7, 6, 6, 6, 4, 4, 3, 3, 2, 2, 2, 2, 2, 2, 1, 1, 1, 1, 1, 1, 1]
    while True:
        kind = rng.random()
        if kind < 0.75:
            word = "".join(rng.choices(letters, weights, k=rng.randint(2, 10)))
            word = word.capitalize() if rng.random() < 0.15 else word
            yield " " + word if rng.random() < 0.6 else word
        elif kind < 0.8:
            yield "".join(rng.choices("0123456789", k=rng.randint(1, 3)))
        elif kind < 0.85:
            yield " " * rng.randint(2, 16) if rng.random() < 0.5 else "\n" * rng.randint(1, 3)
        else:
            yield "".join(chr(rng.randint(0x4E00, 0x9FFF)) for _ in range(rng.randint(1, 2)))


def synthetic_vocab(size: int, seed: int = 0) -> list[bytes]:
    """`size` distinct tokens as bytes: every byte, JSON punctuation, then made-up ones."""
    punctuation = ['",', '":', '{"', '"}', '":"', '","', "],", "},", ": ", ", ", ". ", " (", ") "]
    vocab = [bytes([b]) for b in range(256)] + [p.encode() for p in punctuation]
    seen = set(vocab)
    tokens = made_up_tokens(seed)
    while len(vocab) < size:
        token = next(tokens).encode()
        if token not in seen:
            seen.add(token)
            vocab.append(token)
    return vocab[:size]


# Qwen3's tokenizer holds this many tokens before its added special ones (the model's
# embedding, 151,936 rows, is larger still).
QWEN3_TOKENS = 151_643


def build_tokenizer(vocab_size: int = 1024, filled_to: int = 0):
    """Byte-level BPE with Qwen's pre-tokenizer and special tokens, as a Qwen2Tokenizer.

    `filled_to`: made-up tokens (`made_up_tokens`) are added to the trained ones until the
    vocabulary, before the special tokens, holds this many, e.g. Qwen3's 151,643, so that a
    grammar's masks cost what they cost for the real tokenizer. They come with no merges:
    text encodes exactly as with the trained vocabulary alone, and every token decodes.
    """
    import json

    from tokenizers import AddedToken, Regex, Tokenizer, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"), byte_level]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_corpus(), trainer=trainer)
    state = json.loads(bpe.to_str())["model"]
    vocab = state["vocab"]
    tokens = made_up_tokens()
    while len(vocab) < filled_to:
        # the token as the byte-level BPE writes it (each byte one printable character)
        (piece, _), *_ = byte_level.pre_tokenize_str(next(tokens))
        vocab.setdefault(piece, len(vocab))
    tok = Qwen2Tokenizer(
        vocab=vocab,
        merges=[tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in state["merges"]],
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
    )
    tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tok.padding_side = "left"
    tok.model_max_length = 32768
    return tok


def build_tiny(
    out_dir: str | Path,
    *,
    hidden_size: int = 64,
    intermediate_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    head_dim: int = 16,
    vision_depth: int = 2,
    vision_hidden: int = 64,
    vision_heads: int = 4,
    patch_size: int = 16,
    merge_size: int = 2,
    max_frame_pixels: int = 128 * 128,
    vocab_size: int = 1024,
    tokenizer_filled_to: int = 0,
    model_vocab_size: int | None = None,
    vision_intermediate: int | None = None,
    deepstack_indexes: list[int] | None = None,
    num_position_embeddings: int = 256,
    mrope_section: list[int] | None = None,
    seed: int = 0,
    dtype: str = "float32",
    device: str = "cpu",
) -> Path:
    """Write a randomly initialised Qwen3-VL + processor to `out_dir`; return the path.

    The tokenizer has `vocab_size` trained entries, filled with made-up ones to
    `tokenizer_filled_to` where that is larger (`build_tokenizer`); the model's embedding may
    be larger (`model_vocab_size`, e.g. the real model's 151,936) so its cost is the real one.
    """
    import torch
    from transformers import (
        GenerationConfig,
        Qwen2VLImageProcessor,
        Qwen3VLConfig,
        Qwen3VLForConditionalGeneration,
        Qwen3VLProcessor,
        Qwen3VLVideoProcessor,
    )
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(vocab_size, filled_to=tokenizer_filled_to)
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    unit = patch_size * merge_size
    image_processor = Qwen2VLImageProcessor(
        size={"shortest_edge": unit * unit, "longest_edge": max_frame_pixels},
        patch_size=patch_size,
        temporal_patch_size=2,
        merge_size=merge_size,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    video_processor = Qwen3VLVideoProcessor(
        size={"shortest_edge": unit * unit, "longest_edge": max_frame_pixels * 4},
        patch_size=patch_size,
        temporal_patch_size=2,
        merge_size=merge_size,
    )
    processor = Qwen3VLProcessor(
        image_processor=image_processor,
        tokenizer=tok,
        video_processor=video_processor,
        chat_template=CHAT_TEMPLATE,
    )
    processor.save_pretrained(out)

    half = head_dim // 2
    section = mrope_section or [half - 2 * (half // 4), half // 4, half // 4]
    config = Qwen3VLConfig(
        text_config={
            "hidden_size": hidden_size,
            "intermediate_size": intermediate_size,
            "num_hidden_layers": num_layers,
            "num_attention_heads": num_heads,
            "num_key_value_heads": num_kv_heads,
            "head_dim": head_dim,
            "vocab_size": model_vocab_size or len(tok),
            "max_position_embeddings": 32768,
            "tie_word_embeddings": True,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 5_000_000,
                "mrope_section": section,
                "mrope_interleaved": True,
            },
            "bos_token_id": None,
            "eos_token_id": ids["<|im_end|>"],
            "pad_token_id": ids["<|endoftext|>"],
        },
        vision_config={
            "depth": vision_depth,
            "hidden_size": vision_hidden,
            "intermediate_size": vision_intermediate or vision_hidden * 2,
            "num_heads": vision_heads,
            "out_hidden_size": hidden_size,
            "deepstack_visual_indexes": deepstack_indexes or [vision_depth - 1],
            "patch_size": patch_size,
            "spatial_merge_size": merge_size,
            "temporal_patch_size": 2,
            "num_position_embeddings": num_position_embeddings,
        },
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    with torch.device(device):  # a full-size model is initialised on the GPU in seconds
        model = Qwen3VLForConditionalGeneration._from_config(config, dtype=getattr(torch, dtype))
    model.generation_config = GenerationConfig(
        eos_token_id=[ids["<|im_end|>"], ids["<|endoftext|>"]],
        pad_token_id=ids["<|endoftext|>"],
        do_sample=False,
    )
    model.save_pretrained(out)
    return out


def build_from_shape(
    out_dir: str | Path, shape_file: str | Path, *, dtype: str = "bfloat16", device: str = "cpu"
) -> Path:
    """A random model with a published shape (e.g. Qwen3-VL-4B's), with real frame sizes.

    The tokenizer is the tiny one (no download) filled with made-up tokens to Qwen3's size,
    so a grammar's masks cost what they cost for the real one; the model's vocabulary,
    layers, vision tower and image preprocessing (16 px patches, 2x2 merge, up to 16 Mpx)
    are full size.
    """
    import json

    shape = json.loads(Path(shape_file).read_text())
    text, vision = shape["text_config"], shape["vision_config"]
    return build_tiny(
        out_dir,
        hidden_size=text["hidden_size"],
        intermediate_size=text["intermediate_size"],
        num_layers=text["num_hidden_layers"],
        num_heads=text["num_attention_heads"],
        num_kv_heads=text["num_key_value_heads"],
        head_dim=text["head_dim"],
        tokenizer_filled_to=QWEN3_TOKENS,
        model_vocab_size=text["vocab_size"],
        mrope_section=text["rope_parameters"]["mrope_section"],
        vision_depth=vision["depth"],
        vision_hidden=vision["hidden_size"],
        vision_intermediate=vision["intermediate_size"],
        vision_heads=vision["num_heads"],
        deepstack_indexes=vision["deepstack_visual_indexes"],
        num_position_embeddings=vision.get("num_position_embeddings", 2304),
        patch_size=vision["patch_size"],
        merge_size=vision["spatial_merge_size"],
        max_frame_pixels=16_777_216,
        dtype=dtype,
        device=device,
    )
