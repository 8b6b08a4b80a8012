"""The engine's own decode loop (models.decode_loop) on the tiny model in float32: for every
video of a varied batch it chooses the same greedy tokens as HF `generate`, constrained and
unconstrained, with an adapter, with rows stopping at different lengths (compaction), and
when CUDA graph capture fails (here: there is no CUDA) it says so once and falls back."""

from __future__ import annotations

import json
import logging
from unittest import mock

import pytest
from helpers import make_runner

from models import schema
from models.decode_loop import DecodeLoop, buckets_for


@pytest.fixture(scope="module")
def videos(random_videos):
    return random_videos(7, seed=11)


def _tokens(answers):
    return [(a.text, a.tokens_out, a.tokens_in, a.finished) for a in answers]


def test_buckets_are_powers_of_two_below_the_batch_and_the_batch_itself():
    assert buckets_for(1) == [1]
    assert buckets_for(7) == [1, 2, 4, 7]
    assert buckets_for(128) == [1, 2, 4, 8, 16, 32, 64, 128]
    assert buckets_for(100) == [1, 2, 4, 8, 16, 32, 64, 100]


def test_loop_chooses_generates_tokens_for_every_video_unconstrained(tiny_loaded, videos):
    knobs = dict(max_new_tokens=24, batch_size=7, constrained=False)
    reference = make_runner(tiny_loaded, generation="generate", **knobs).answer(videos)
    loop = make_runner(tiny_loaded, generation="loop", **knobs)
    answers = loop.answer(videos)
    assert _tokens(answers) == _tokens(reference)
    assert {a.tokens_out for a in answers} == {24}  # the random model never stops by itself
    timing = loop.timings[-1]
    assert (timing.path, timing.rows, timing.steps) == ("loop", 7, 23)
    assert 0 < timing.first_token_s < timing.seconds


def test_loop_chooses_generates_tokens_under_the_grammar_and_continues_long_answers(
    tiny_loaded, random_videos
):
    batch = random_videos(4, seed=5)
    # generate: one pass with room for the grammar's longest answer. The loop: room for 40
    # tokens first, then the rows still writing continue where they stopped.
    reference = make_runner(tiny_loaded, batch_size=4, first_pass_tokens=0, generation="generate")
    loop = make_runner(tiny_loaded, batch_size=4, first_pass_tokens=40, generation="loop")
    expected, answers = reference.answer(batch), loop.answer(batch)
    assert _tokens(answers) == _tokens(expected)
    for answer, video in zip(answers, batch, strict=True):
        report = schema.Report.model_validate(json.loads(answer.text))
        assert all(h.frame < len(video.timestamps) for h in report.hazards)
    assert all(a.finished for a in answers) and min(a.tokens_out for a in answers) > 40
    timing = loop.timings[-1]
    assert len(timing.buckets) >= 2, timing  # grown past the first room, and/or compacted
    assert timing.steps == max(a.tokens_out for a in answers) - 1


def test_rows_that_stop_early_are_compacted_away_with_the_same_tokens(tiny_loaded, videos):
    knobs = dict(max_new_tokens=30, min_new_tokens=30, batch_size=7, constrained=False)
    lengths = [30, 3, 9, 2, 17, 5, 1]
    results = {}
    for path in ("generate", "loop"):
        runner = make_runner(tiny_loaded, generation=path, **knobs)
        prepared = [runner.prepare(v) for v in videos]
        runner.answer_lengths = {id(p): n for p, n in zip(prepared, lengths, strict=True)}
        results[path] = (runner.generate(prepared), runner.timings[-1])
    (expected, _), (answers, timing) = results["generate"], results["loop"]
    assert [a.tokens_out for a in answers] == lengths
    assert _tokens(answers) == _tokens(expected)
    # 7 rows, then 4 once 3 have stopped (by token 5), then 2, then 1 (after token 17).
    assert timing.buckets == [7, 4, 2, 1]
    assert timing.steps == 29


def test_loop_with_an_adapter_chooses_generates_tokens(tiny_model, videos, tmp_path):
    import torch
    from peft import LoraConfig, get_peft_model

    from models.loader import load_model

    base = load_model(str(tiny_model), quant="fp32").model
    torch.manual_seed(0)
    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(base, config).save_pretrained(tmp_path / "adapter")
    loaded = load_model(str(tiny_model), quant="fp32", adapter=str(tmp_path / "adapter"))
    knobs = dict(max_new_tokens=12, batch_size=7, constrained=False)
    reference = make_runner(loaded, generation="generate", **knobs).answer(videos)
    assert _tokens(make_runner(loaded, generation="loop", **knobs).answer(videos)) == _tokens(
        reference
    )
    plain = make_runner(load_model(str(tiny_model), quant="fp32"), generation="loop", **knobs)
    assert [a.text for a in plain.answer(videos)] != [a.text for a in reference]


def test_chunked_prefill_attends_only_the_slots_written_so_far(tiny_loaded, videos):
    from models import decode_loop

    knobs = dict(max_new_tokens=6, batch_size=7, constrained=False, prefill_chunk=32)
    reference = make_runner(tiny_loaded, generation="generate", **knobs).answer(videos)
    runner = make_runner(tiny_loaded, generation="loop", **knobs)
    layer = decode_loop._filled_layer()
    seen = []  # the first layer's updates: (prefilling, keys handed to attention, slots)
    update = layer.update

    def spied(self, *args, **kwargs):
        keys, values = update(self, *args, **kwargs)
        if self is runner._loop.state.cache.layers[0]:
            seen.append((self.prefilling, keys.shape[-2], self.max_cache_len))
        return keys, values

    with mock.patch.object(layer, "update", spied):
        answers = runner.answer(videos)
    assert _tokens(answers) == _tokens(reference)
    prefill = [keys for prefilling, keys, _ in seen if prefilling]
    slots = seen[0][2]
    assert len(prefill) >= 3, seen  # the prompts went in in chunks of 32
    # Each chunk attended over the chunks before it and itself, never the whole cache.
    assert prefill == [min(32 * (i + 1), prefill[-1]) for i in range(len(prefill))]
    assert max(a.tokens_in for a in answers) <= prefill[-1] < slots
    # The decode steps see every slot (fixed shapes, as the captured graphs need).
    assert {(keys, n) for prefilling, keys, n in seen if not prefilling} == {(slots, slots)}


def test_a_failed_capture_is_logged_once_and_later_batches_take_generate(
    tiny_loaded, videos, caplog
):
    knobs = dict(max_new_tokens=8, batch_size=7, constrained=False)
    reference = make_runner(tiny_loaded, generation="generate", **knobs).answer(videos)
    runner = make_runner(tiny_loaded, generation="loop", **knobs)
    # As on a GPU whose capture fails: here torch.cuda.CUDAGraph itself cannot be made.
    stop = [tiny_loaded.model.generation_config.eos_token_id]
    pad = tiny_loaded.processor.tokenizer.pad_token_id
    runner._loop = DecodeLoop(tiny_loaded.model, stop_ids=stop, pad_id=pad, graphs=True)
    runner.generation = "graph"
    with caplog.at_level(logging.WARNING, logger="models.decode_loop"):
        first = runner.answer(videos)
        second = runner.answer(videos)
    assert _tokens(first) == _tokens(second) == _tokens(reference)
    failures = [r for r in caplog.records if "capture" in r.getMessage()]
    assert len(failures) == 1 and "failed" in failures[0].getMessage()
    assert [t.path for t in runner.timings] == ["loop", "generate"]
    assert runner.generation == "generate"


def test_prepared_positions_are_the_ones_generate_computes(tiny_loaded, videos):
    import torch

    runner = make_runner(tiny_loaded, generation="loop", constrained=False)
    collated = runner.collate([runner.prepare(v) for v in videos])
    model = tiny_loaded.model
    ids, mask = collated["input_ids"], collated["attention_mask"]
    expected = model._prepare_position_ids_for_generation(
        ids,
        {
            "attention_mask": mask,
            "mm_token_type_ids": collated["mm_token_type_ids"],
            "image_grid_thw": collated["image_grid_thw"],
        },
    )
    real = mask.bool()
    got = collated["position_ids"]
    assert got.shape == expected.shape == (4, len(videos), ids.shape[1])
    # Padding positions are never attended to; every real token's 4 positions agree.
    assert torch.equal(got[:, real], expected[:, real])


def test_vision_runs_attention_gives_the_per_frame_features(tiny_model, random_videos):
    import torch

    from models.loader import load_model
    from models.vision_attention import NAME, frame_runs, use_runs_attention

    assert frame_runs([0, 4, 8, 12, 15, 18, 22]) == [(0, 3, 4), (12, 2, 3), (18, 1, 4)]
    loaded = load_model(str(tiny_model), quant="fp32")
    runner = make_runner(loaded, generation="loop", constrained=False)
    batch = runner.collate([runner.prepare(v) for v in random_videos(5, seed=3)])
    visual = loaded.model.model.visual
    with torch.inference_mode():
        before = visual(batch["pixel_values"], grid_thw=batch["image_grid_thw"])
        assert use_runs_attention(loaded.model)
        with mock.patch("models.vision_attention.frame_runs", wraps=frame_runs) as runs:
            after = visual(batch["pixel_values"], grid_thw=batch["image_grid_thw"])
    assert runs.call_count == len(visual.blocks)  # one call per block, not one per frame
    assert visual.config._attn_implementation == NAME
    assert loaded.model.config.get_text_config()._attn_implementation == "sdpa"
    torch.testing.assert_close(after.pooler_output, before.pooler_output, rtol=1e-4, atol=1e-5)
    for a, b in zip(after.deepstack_features, before.deepstack_features, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def _spy_encodes(runner, prepared):
    """Records each run of the vision tower: the videos (indices into `prepared`) and
    whether a batch was decoding then (encoded ahead) or not (with its own batch)."""
    runs = []
    encode = runner.encoder._encode

    def spied(videos):
        decoding = runner._loop is not None and runner._loop.state is not None
        runs.append(([prepared.index(v) for v in videos], decoding))
        return encode(videos)

    return runs, mock.patch.object(runner.encoder, "_encode", side_effect=spied)


def _spied_loop(tiny_loaded, videos, max_new_tokens: int):
    """`generate`'s answers for `videos` (the reference), and the engine's loop in batches of
    4 with the videos prepared and its vision tower's runs recorded (`_spy_encodes`)."""
    knobs = dict(max_new_tokens=max_new_tokens, batch_size=4, constrained=False)
    reference = make_runner(tiny_loaded, generation="generate", **knobs).answer(videos)
    runner = make_runner(tiny_loaded, generation="loop", **knobs)
    prepared = [runner.prepare(v) for v in videos]
    runs, spy = _spy_encodes(runner, prepared)
    return reference, runner, prepared, runs, spy


def test_the_next_batch_is_encoded_while_this_one_decodes(tiny_loaded, videos):
    reference, runner, prepared, runs, spy = _spied_loop(tiny_loaded, videos, 12)
    with spy:
        first = runner.generate(prepared[:4], upcoming=lambda: prepared[4:])
        assert all(p.encoded is not None for p in prepared[4:])  # ready for their batch
        assert all(p.encoded is None for p in prepared[:4])  # in the cache now: dropped
        held = runner.encoder.held_bytes()  # what sizing the next batch counts as its own
        assert held == runner.encoder.feature_bytes(prepared[4:]) > 0
        second = runner.generate(prepared[4:])
        assert runner.encoder.held_bytes() == 0
    assert runs == [([0, 1, 2, 3], False), ([4, 5, 6], True)]  # never encoded twice
    assert _tokens(first + second) == _tokens(reference)
    assert all(p.encoded is None for p in prepared)


def test_videos_queued_later_wait_for_a_group_then_go_ahead_anyway(tiny_loaded, videos):
    from models import vision_encoder

    knobs = dict(max_new_tokens=24, batch_size=7, constrained=False)
    runner = make_runner(tiny_loaded, generation="loop", **knobs)
    prepared = [runner.prepare(v) for v in videos]
    queued = []  # what the batcher holds: grows while the first batch decodes
    steps = []  # the decode step of each look at the queue

    def upcoming():
        steps.append(len(steps))
        if len(steps) == 4:  # two arrive at the fourth step
            queued.extend(prepared[5:])
        return queued

    runs = []  # each run of the tower: its videos, and the looks at the queue before it
    encode = runner.encoder._encode

    def spied(batch):
        runs.append(([prepared.index(v) for v in batch], len(steps)))
        return encode(batch)

    with (
        mock.patch.object(runner.encoder, "_encode", side_effect=spied),
        mock.patch.object(vision_encoder, "GROUP", 4),
    ):
        runner.generate(prepared[:5], upcoming=upcoming)
    # The batch's own videos before it decodes; the two queued later, fewer than a group,
    # after waiting _GATHER_STEPS steps for more.
    assert runs == [([0, 1, 2, 3, 4], 0), ([5, 6], 4 + vision_encoder._GATHER_STEPS)]
    assert prepared[5].encoded is not None and prepared[6].encoded is not None


def test_the_batcher_hands_the_runner_the_videos_queued_behind_a_batch(tiny_loaded, videos):
    from worker.batcher import Batcher

    reference, runner, prepared, runs, spy = _spied_loop(tiny_loaded, videos, 16)
    with spy:
        batcher = Batcher(runner, wait_s=0.5)
        futures = [batcher.submit(p) for p in prepared]
        answers = [f.result(timeout=120) for f in futures]
        batcher.close()
    assert batcher.stats.sizes == [4, 3]
    assert runs == [([0, 1, 2, 3], False), ([4, 5, 6], True)]
    assert _tokens(answers) == _tokens(reference)


def test_the_encoders_features_are_the_models_own(tiny_loaded, videos):
    """The tower run per video from inputs computed on the CPU gives what the model's own
    `get_image_features` gives for the whole batch."""
    import torch

    from models.loader import vision_language_model

    runner = make_runner(tiny_loaded, generation="loop", constrained=False)
    prepared = [runner.prepare(v) for v in videos[:3]]
    runner.encoder.encode(prepared[:1])
    runner.encoder.encode(prepared)  # the first is not encoded again
    ours = runner.encoder.outputs(prepared)
    pixels = torch.cat([p.tensors["pixel_values"] for p in prepared])
    grid = torch.cat([p.tensors["image_grid_thw"] for p in prepared])
    with torch.inference_mode():
        theirs = vision_language_model(tiny_loaded.model).get_image_features(
            pixels, grid, return_dict=True
        )
    assert len(ours.pooler_output) == len(theirs.pooler_output) == sum(p.frames for p in prepared)
    for a, b in zip(ours.pooler_output, theirs.pooler_output, strict=True):
        torch.testing.assert_close(a, b)
    for mine, model in zip(ours.deepstack_features, theirs.deepstack_features, strict=True):
        for a, b in zip(mine, model, strict=True):
            torch.testing.assert_close(a, b)


def test_only_as_many_videos_go_ahead_as_the_spare_memory_holds(tiny_loaded, videos):
    from models import vision_encoder

    knobs = dict(max_new_tokens=12, batch_size=7, constrained=False)
    runner = make_runner(tiny_loaded, generation="loop", **knobs)
    prepared = [runner.prepare(v) for v in videos]
    encoder = runner.encoder
    two = encoder.bytes_needed(prepared[3:5])
    assert encoder.bytes_needed(prepared[3:4]) < two < encoder.bytes_needed(prepared[3:6])
    runs, spy = _spy_encodes(runner, prepared)
    # As on a GPU with room beside the decoding batch for the tower over two videos, and
    # none once their features are held.
    spare = mock.patch.object(runner.memory, "spare", side_effect=[two] + [0] * 100)
    with spy, spare, mock.patch.object(vision_encoder, "_GATHER_STEPS", 0):
        runner.generate(prepared[:3], upcoming=lambda: prepared[3:])
    assert runs[1:] == [([3, 4], True)]  # the two that fitted; no more that batch
    assert [p.encoded is not None for p in prepared[3:]] == [True, True, False, False]


def test_features_encoded_ahead_count_as_their_own_batchs_memory(tiny_loaded):
    """Sizing a batch: the features already made for its rows are part of each row's cost
    (learnt from batches that made them inside), so they are not taken from the budget
    twice; a batch that came with its features counts them in what it took."""
    import torch

    from models.memory import HEADROOM, GpuMemory

    gib = 2**30
    memory = GpuMemory(tiny_loaded)
    memory.on_cuda = True
    memory.bytes_per_token = float(2**20)  # 1 MiB a token

    def cuda(**returns):
        return mock.patch.multiple(
            torch.cuda, **{k: mock.Mock(return_value=v) for k, v in returns.items()}
        )

    with cuda(mem_get_info=(10 * gib, 80 * gib), memory_reserved=0, memory_allocated=3 * gib):
        plain = memory.rows(1024)
        held = memory.rows(1024, held=gib)
    assert plain == int((10 * gib * HEADROOM - 3 * gib) // gib)
    assert held == int((10 * gib * HEADROOM - 2 * gib) // gib)
    peaks = cuda(reset_peak_memory_stats=None, memory_allocated=gib, max_memory_allocated=3 * gib)
    with peaks, memory.measured(rows=2, row_tokens=512, held=gib):
        pass
    assert memory.bytes_per_token == 3 * gib / 1024  # 2 GiB above the base, plus 1 held


def test_the_spare_memory_counts_the_cap_and_the_allocators_cache_as_taken(tiny_loaded):
    import torch

    from models.memory import HEADROOM, GpuMemory

    gib = 2**30
    assert GpuMemory(tiny_loaded).spare() is None  # off CUDA
    memory = GpuMemory(tiny_loaded, cap=10 * gib)
    memory.on_cuda = True  # as on a card with 20 GiB free, 4 GiB held by the allocator
    with (
        mock.patch.object(torch.cuda, "mem_get_info", return_value=(20 * gib, 80 * gib)),
        mock.patch.object(torch.cuda, "memory_reserved", return_value=4 * gib),
    ):
        assert memory.spare() == int(6 * gib * HEADROOM)  # the cap less what is reserved
        memory.cap = 0
        assert memory.spare() == int(20 * gib * HEADROOM)  # the card's free memory


def test_a_queued_video_the_tower_cannot_take_fails_alone_with_its_batch(
    tiny_loaded, videos, caplog
):
    from models import vision_encoder
    from worker.batcher import Batcher

    knobs = dict(max_new_tokens=8, batch_size=4, constrained=False)
    reference = make_runner(tiny_loaded, generation="generate", **knobs).answer(videos)
    runner = make_runner(tiny_loaded, generation="loop", **knobs)
    prepared = [runner.prepare(v) for v in videos]
    broken = prepared[5]  # queued behind the first batch; its pixels lost half their rows
    broken.tensors["pixel_values"] = broken.tensors["pixel_values"][:5]
    with (
        caplog.at_level(logging.WARNING, logger="models.vision_encoder"),
        mock.patch.object(vision_encoder, "_GATHER_STEPS", 0),
    ):
        batcher = Batcher(runner, wait_s=0.5)
        futures = [batcher.submit(p) for p in prepared]
        with pytest.raises(Exception) as caught:
            futures[5].result(timeout=120)
        answers = [f.result(timeout=120) for i, f in enumerate(futures) if i != 5]
        batcher.close()
    assert not isinstance(caught.value, TimeoutError)
    # The batch decoding while it failed ahead, and its own batch-mates, are answered.
    assert _tokens(answers) == _tokens([a for i, a in enumerate(reference) if i != 5])
    ahead = [r.getMessage() for r in caplog.records if r.name == "models.vision_encoder"]
    assert len(ahead) == 1 and "encoding 3 videos ahead failed" in ahead[0], ahead


def _gives_sdpas_output(attention) -> None:
    """`attention` gives SDPA's output for one query per row (8 heads over 2 key/value
    heads) over a cache of 40 slots, some masked, the mask bool or additive."""
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    torch.manual_seed(0)
    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal, module.training = 4, True, False
    query = torch.randn(5, 8, 1, 16)
    key, value = torch.randn(5, 2, 40, 16), torch.randn(5, 2, 40, 16)
    mask = torch.rand(5, 1, 1, 40) > 0.3
    mask[:, :, :, -1] = True  # every row attends to its own slot
    for m in (mask, torch.zeros(5, 1, 1, 40).masked_fill(~mask, float("-inf"))):
        ours, _ = attention(module, query, key, value, m, scaling=0.25)
        theirs, _ = sdpa_attention_forward(module, query, key, value, m, scaling=0.25)
        torch.testing.assert_close(ours, theirs)


def test_matmul_decode_attention_gives_sdpas_output(tiny_loaded, videos):
    """The opt-in decode-step attention: the same attention output as SDPA's for one query
    per row over a masked cache, and through the engine's loop the same tokens."""

    from models import decode_attention
    from models.decode_attention import matmul_decode_attention, use_decode_attention

    _gives_sdpas_output(matmul_decode_attention)
    knobs = dict(max_new_tokens=10, batch_size=7, constrained=False)
    reference = make_runner(tiny_loaded, generation="loop", **knobs).answer(videos)
    text = tiny_loaded.model.config.get_text_config()
    spy = mock.patch.object(
        decode_attention, "matmul_decode_attention", wraps=matmul_decode_attention
    )
    try:
        with spy as called:
            use_decode_attention(tiny_loaded.model, "matmul")
            answers = make_runner(tiny_loaded, generation="loop", **knobs).answer(videos)
    finally:
        use_decode_attention(tiny_loaded.model, "sdpa")
    assert text._attn_implementation == "sdpa"
    assert _tokens(answers) == _tokens(reference)
    steps = [c for c in called.call_args_list if c.args[1].shape[2] == 1]
    assert len(steps) == 9 * text.num_hidden_layers  # 9 decode steps after the prefill


def test_the_fused_prefills_ops_are_the_models_own(tiny_loaded):
    """The three functions models.fused_prefill compiles compute what the text model's
    RMSNorm, rotary embedding and SiLU-times-up compute."""
    import torch

    from models.fused_prefill import FusedPrefill, rms_norm, rotary, silu_mul

    fused = FusedPrefill(tiny_loaded.model, backend="eager")
    text = tiny_loaded.model.config.get_text_config()
    assert len(fused.norms) == 4 * text.num_hidden_layers + 1  # 4 a layer, and the last
    assert len(fused.mlps) == text.num_hidden_layers
    torch.manual_seed(0)
    norm = fused.norms[0]
    for dtype in (torch.float32, torch.bfloat16):
        hidden = torch.randn(3, 5, norm.weight.shape[0], dtype=dtype)
        with torch.no_grad():
            weight = norm.weight.to(dtype)
            ours = rms_norm(hidden, weight, norm.variance_epsilon)
            with mock.patch.object(norm, "weight", torch.nn.Parameter(weight)):
                assert torch.equal(ours, norm(hidden))
    q, k = torch.randn(2, 4, 6, 16), torch.randn(2, 2, 6, 16)
    cos, sin = torch.randn(2, 6, 16), torch.randn(2, 6, 16)
    theirs = fused.modeling.apply_rotary_pos_emb(q, k, cos, sin)
    for ours, expected in zip(rotary(q, k, cos, sin), theirs, strict=True):
        assert torch.equal(ours, expected)
    mlp = fused.mlps[0]
    x = torch.randn(2, 3, text.hidden_size)
    with torch.no_grad():
        assert torch.equal(mlp.down_proj(silu_mul(mlp.gate_proj(x), mlp.up_proj(x))), mlp(x))


def _counting_fused(calls: dict, widths: list):
    """FusedPrefill, each of its ops counted (by the eager function's name) with the
    sequence width it was called on."""
    from models.fused_prefill import FusedPrefill

    real = FusedPrefill._guarded

    def guarded(self, compiled, eager):
        inner = real(self, compiled, eager)

        def call(*args, **kwargs):
            calls[eager.__name__] = calls.get(eager.__name__, 0) + 1
            widths.append(args[0].shape[2 if eager.__name__ == "rotary" else 1])
            return inner(*args, **kwargs)

        return call

    return mock.patch.object(FusedPrefill, "_guarded", guarded)


def test_the_fused_prefill_runs_in_the_prefill_only_with_generates_tokens(tiny_loaded, videos):
    """PREFILL=fused: the compiled ops (traced by torch.compile; aot_eager here, no CPU
    codegen) replace the model's during the prefill only; the tokens stay generate's and
    the model is its own again after the batch."""
    import sys

    from models import fused_prefill

    knobs = dict(max_new_tokens=10, batch_size=7, constrained=False, prefill_chunk=64)
    reference = make_runner(tiny_loaded, generation="generate", **knobs).answer(videos)
    layers = tiny_loaded.model.config.get_text_config().num_hidden_layers
    calls: dict[str, int] = {}
    widths: list[int] = []
    with mock.patch.object(fused_prefill, "BACKEND", "aot_eager"), _counting_fused(calls, widths):
        runner = make_runner(tiny_loaded, generation="loop", prefill="fused", **knobs)
        answers = runner.answer(videos)
    assert _tokens(answers) == _tokens(reference)
    assert runner._loop.prefill.failure is None
    chunks = calls["silu_mul"] // layers
    assert chunks >= 2 and calls["silu_mul"] == chunks * layers  # every layer, every chunk
    assert calls["rotary"] == chunks * layers
    assert calls["rms_norm"] == chunks * (4 * layers + 1)
    # the prefill's chunks (64 tokens, the last one less) only, never a decode step (1)
    assert max(widths) == 64 and min(widths) > 1
    for module in tiny_loaded.model.modules():
        assert "forward" not in vars(module)  # the model's own forwards again
    modeling = sys.modules[type(tiny_loaded.model).__module__]
    assert modeling.apply_rotary_pos_emb.__name__ == "apply_rotary_pos_emb"


def test_a_fused_prefill_whose_compiler_fails_says_so_once_and_runs_eager(
    tiny_loaded, videos, caplog
):
    from models import fused_prefill

    def broken(graph, example_inputs):
        raise RuntimeError("no Triton here\nsecond line")

    knobs = dict(max_new_tokens=6, batch_size=7, constrained=False)
    reference = make_runner(tiny_loaded, generation="loop", **knobs).answer(videos)
    with (
        mock.patch.object(fused_prefill, "BACKEND", broken),
        caplog.at_level(logging.WARNING, logger="models.fused_prefill"),
    ):
        runner = make_runner(tiny_loaded, generation="loop", prefill="fused", **knobs)
        first = runner.answer(videos)
        second = runner.answer(videos)
    assert _tokens(first) == _tokens(reference) == _tokens(second)
    fused = runner._loop.prefill
    assert fused.failure is not None and "no Triton here" in fused.failure
    assert "second line" not in fused.failure
    warnings = [r for r in caplog.records if "fused prefill failed" in r.getMessage()]
    assert len(warnings) == 1


def test_flex_decode_attention_gives_sdpas_output_through_one_compilation(tiny_loaded, videos):
    """The second opt-in decode-step attention (FlexAttention's decoding kernel, compiled
    with dynamic shapes): SDPA's output for one query per row over a masked cache, bool or
    additive; through the engine's loop (rows compacted into smaller buckets) the same
    tokens, with no more compilations than the first bucket's."""
    from models import decode_attention

    # Traced by torch.compile as on the GPU; aot_eager: Inductor's CPU code for FlexAttention
    # with dynamic shapes does not build (the GPU's is Triton's).
    patches = (
        mock.patch.object(decode_attention, "BACKEND", "aot_eager"),
        mock.patch.object(decode_attention, "_compiled_flex", None),
    )
    with patches[0], patches[1]:
        _flex_against_sdpa(tiny_loaded, videos)


def _flex_against_sdpa(tiny_loaded, videos):
    import torch

    from models import decode_attention
    from models.decode_attention import flex_decode_attention, use_decode_attention

    _gives_sdpas_output(flex_decode_attention)
    knobs = dict(max_new_tokens=12, min_new_tokens=12, batch_size=7, constrained=False)
    lengths = [12, 3, 9, 2, 7, 5, 1]
    results = {}
    for choice in ("sdpa", "flex"):
        runner = make_runner(tiny_loaded, generation="loop", **knobs)
        prepared = [runner.prepare(v) for v in videos]
        runner.answer_lengths = {id(p): n for p, n in zip(prepared, lengths, strict=True)}
        try:
            use_decode_attention(tiny_loaded.model, choice)
            torch._dynamo.utils.counters.clear()
            results[choice] = (runner.generate(prepared), runner.timings[-1])
            compiled = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        finally:
            use_decode_attention(tiny_loaded.model, "sdpa")
    (expected, _), (answers, timing) = results["sdpa"], results["flex"]
    assert _tokens(answers) == _tokens(expected)
    assert timing.buckets == [7, 4, 2, 1]  # four batch shapes went through it
    assert decode_attention._compiled_flex is not None
    assert 1 <= compiled <= 2  # dynamic shapes: not one compilation per bucket


@pytest.mark.parametrize("choice", ["matmul", "flex"])
def test_a_worker_takes_the_decode_attention_its_settings_name(tiny_model, tmp_path, choice):
    from config.settings import Settings
    from models import decode_attention
    from models.runner import build_runner

    settings = Settings(home=tmp_path, model=str(tiny_model), quant="fp32", decode_attention=choice)
    runner = build_runner(settings)
    text = runner.loaded.model.config.get_text_config()
    names = {"matmul": decode_attention.NAME, "flex": decode_attention.FLEX_NAME}
    assert text._attn_implementation == names[choice]
    plain = build_runner(Settings(home=tmp_path, model=str(tiny_model), quant="fp32"))
    assert plain.loaded.model.config.get_text_config()._attn_implementation == "sdpa"
