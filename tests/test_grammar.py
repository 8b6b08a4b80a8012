"""Constrained decoding: the tiny random model, which otherwise writes noise, writes only
valid reports, batched or not."""

from __future__ import annotations

import json
import logging

import pytest
import xgrammar as xgr
from helpers import make_runner, torch_threads

from models import grammar
from models.decoding import ReportGrammar
from models.schema import parse_report


@pytest.fixture(scope="module")
def loaded(tiny_loaded):
    # One intra-op thread while this module decodes (helpers.torch_threads): on a busy
    # 2-core machine, several times faster; the assertions compare runs made alike
    with torch_threads(1):
        yield tiny_loaded


@pytest.fixture(scope="module")
def report_grammar(loaded):
    return ReportGrammar(
        loaded.processor.tokenizer, loaded.model.config.get_text_config().vocab_size
    )


def _longest(frames: int) -> dict:
    return {
        "schema_version": 1,
        "scene_description": "s" * (grammar.SCENE_CHARS + grammar.MARGIN_CHARS),
        "driving_parameters": {
            "road_type": "intersection",
            "lane_count": 12,
            "ego_lane_position": "unknown",
            "traffic_light_state": "unknown",
            "pedestrian_on_road": False,
            "closest_vehicle_distance": "medium",
            "ego_vehicle_speed": "moderate",
            "road_curvature": "straight",
            "weather": "unknown",
            "visibility": "moderate",
            "time_of_day": "dawn_dusk",
            "traffic_density": "moderate",
            "risk_factor": "critical",
        },
        "hazards": [
            {
                "kind": "pedestrian",
                "description": "h" * (grammar.HAZARD_CHARS + grammar.MARGIN_CHARS),
                "frame": frames - 1,
            }
        ]
        * grammar.HAZARDS,
        "risk_assessment": "r" * (grammar.RISK_CHARS + grammar.MARGIN_CHARS),
    }


def _accepts(report_grammar, frames: int, text: str) -> bool:
    matcher = xgr.GrammarMatcher(report_grammar.compiled(frames))
    return (
        matcher.accept_string(text)
        and matcher.is_terminated() is False
        and (matcher.accept_token(matcher.stop_token_ids[0]) and matcher.is_terminated())
    )


def _compact(report: dict) -> str:
    return json.dumps(report, separators=(",", ":"))


def test_the_longest_report_is_accepted_valid_and_as_long_as_the_worst_case(report_grammar):
    # Each text at its bound (its target and the margin past it): the longest answer.
    text = _compact(_longest(8))
    assert _accepts(report_grammar, 8, text)
    assert parse_report(text, frames=8).valid
    assert len(text) == grammar.worst_case_tokens(8)


@pytest.mark.parametrize(
    "change",
    [
        lambda r: r.update(scene_description=r["scene_description"] + "s"),
        lambda r: r["hazards"][0].update(description=r["hazards"][0]["description"] + "h"),
        lambda r: r.update(risk_assessment=r["risk_assessment"] + "r"),
        lambda r: r.update(scene_description=""),
        lambda r: r.update(scene_description='say "hi"'),
        lambda r: r["driving_parameters"].update(weather="sunny"),
        lambda r: r["driving_parameters"].update(lane_count=13),
        lambda r: r["hazards"].append(dict(r["hazards"][0])),  # one hazard too many
        lambda r: r["hazards"][0].update(frame=8),  # only 8 frames were sampled
        lambda r: r.update(extra="no"),
    ],
    ids=[
        "long",
        "long-hazard",
        "long-risk",
        "empty",
        "quote",
        "enum",
        "lanes",
        "hazards",
        "frame",
        "extra-key",
    ],
)
def test_the_grammar_refuses_what_the_schema_or_the_video_forbids(report_grammar, change):
    report = _longest(8)
    report["hazards"] = list(report["hazards"])
    change(report)
    assert not _accepts(report_grammar, 8, _compact(report))


def test_no_special_token_is_text_and_every_stop_token_ends_only_a_whole_report(loaded):
    """xgrammar takes a token for text unless it decodes to nothing, so by default a
    special token such as `<|endoftext|>` (printable ASCII) could sit inside a text; the
    engine stops a row at any of the model's stop tokens (generation_config: `<|im_end|>`
    and `<|endoftext|>` for Qwen3-VL), which would cut the report short. The grammar holds
    every stop token to the report's end and no other special token anywhere."""
    from models.runner import report_grammar as grammar_of

    tokenizer = loaded.processor.tokenizer
    stops = set(loaded.model.generation_config.eos_token_id)
    special = {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    assert len(stops) == 2 and stops < special and len(special - stops) >= 5
    compiled = grammar_of(loaded).compiled(8)
    report = _compact(_longest(8))
    opened = report.index('"scene_description":"') + len('"scene_description":"')
    for token in sorted(special):
        matcher = xgr.GrammarMatcher(compiled)
        assert matcher.accept_string(report[: opened + 3])
        assert not matcher.accept_token(token), tokenizer.convert_ids_to_tokens(token)
    for token in sorted(stops):
        matcher = xgr.GrammarMatcher(compiled)
        assert matcher.accept_string(report)
        assert matcher.accept_token(token) and matcher.is_terminated()


@pytest.mark.parametrize("generation", ["generate", "loop"])
def test_weights_that_favour_special_tokens_still_write_whole_reports(
    loaded, random_videos, generation
):
    """End to end, both decoding paths: special tokens' logits lifted far above the rest
    (a forward hook on the LM head), `<|endoftext|>` (a stop token to the engine, not the
    tokenizer's end of sequence) most, so the model would write it as soon as a text opens,
    or else another special token. Under the grammar it writes whole, valid reports and
    stops only after them."""
    import torch

    tokenizer = loaded.processor.tokenizer
    stops = set(loaded.model.generation_config.eos_token_id)
    endoftext = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert stops == {tokenizer.eos_token_id, endoftext}
    special = [i for i, t in tokenizer.added_tokens_decoder.items() if t.special]
    others = torch.tensor([i for i in special if i not in stops])

    def favour(module, inputs, logits):
        logits[..., others] += 500.0
        logits[..., endoftext] += 1000.0
        return logits

    videos = random_videos(2, seed=5, max_frames=4)
    hook = loaded.model.lm_head.register_forward_hook(favour)
    try:
        answers = make_runner(loaded, batch_size=2, generation=generation).answer(videos)
    finally:
        hook.remove()
    for answer, video in zip(answers, videos, strict=True):
        assert parse_report(answer.text, frames=len(video.timestamps)).valid, answer.text[-200:]
        assert answer.finished


def test_a_hundred_varied_videos_all_get_valid_reports(loaded, random_videos):
    # What a valid report depends on: the frame count (one grammar each, the hazards' frame
    # index bounded by it), the batch (each row its own matcher, beside rows of other frame
    # counts and prompt lengths, left-padded, stopping while others go on) and the answer's
    # length (here from ~500 tokens up to the grammar's text bounds). 100 videos in 4
    # batches of 25 cover each frame count 1-8 9 to 18 times, every batch mixing 6 to 8 of
    # them; more videos add draws of the same kinds at ~1,000 decode steps each (the 200
    # this test ran before, these 100 first, took twice as long and were all valid too).
    videos = random_videos(100, seed=11, max_frames=8)
    assert {len(v.timestamps) for v in videos} == set(range(1, 9))
    runner = make_runner(loaded, max_new_tokens=16, batch_size=25)
    answers = runner.answer(videos)
    errors = [
        parse_report(a.text, frames=len(v.timestamps)).error
        for a, v in zip(answers, videos, strict=True)
    ]
    assert errors == [None] * len(videos)
    # The constraint, not luck: the same model unconstrained writes no valid report.
    free = make_runner(loaded, max_new_tokens=64, batch_size=25, constrained=False)
    free_answers = free.answer(videos[:25])
    assert not any(parse_report(a.text, frames=8).valid for a in free_answers)


def test_constrained_batched_output_equals_one_at_a_time(loaded, random_videos, caplog):
    # Four videos are enough to hold a batch to one-at-a-time: seed 22 gives four frame
    # counts (7, 5, 4, 8: four grammars in one batch), four prompt lengths (three rows
    # left-padded) and answers of four lengths (514 to 945 tokens: rows stop while the
    # others go on). Each video costs its whole answer again alone, ~1,000 decode steps.
    videos = random_videos(4, seed=22, max_frames=8)
    assert len({len(v.timestamps) for v in videos}) == len(videos)
    runner = make_runner(loaded, max_new_tokens=16, batch_size=8)
    batched = runner.answer(videos)
    single = [runner.answer([v])[0] for v in videos]
    assert [a.text for a in batched] == [a.text for a in single]
    assert all(
        parse_report(a.text, frames=len(v.timestamps)).valid
        for a, v in zip(batched, videos, strict=True)
    )
    assert (
        len({a.tokens_in for a in batched}) == len({a.tokens_out for a in batched}) == len(videos)
    )

    # Two passes: the batch first has room for the shorter half of the answers only; the
    # longer half (two, in one batch again) is described again with room for the whole
    # bound: same answers.
    lengths = sorted(a.tokens_out for a in batched)
    first_pass = lengths[len(lengths) // 2 - 1]
    two_pass = make_runner(loaded, max_new_tokens=16, batch_size=8, first_pass_tokens=first_pass)
    with caplog.at_level(logging.INFO, logger="models.runner"):
        again = two_pass.answer(videos)
    assert [a.text for a in again] == [a.text for a in batched]
    longer = sum(n > first_pass for n in lengths)
    assert longer == 2
    assert f"{longer} of {len(videos)} answers still going at {first_pass} tokens" in caplog.text


def test_the_masks_know_which_rows_ended_without_asking_each_matcher(loaded, report_grammar):
    """GrammarMasks keeps which rows have ended (so it need not call into xgrammar for each
    row each step); it must agree with the matchers, also after `keep` reorders the rows."""
    import torch

    quote = loaded.processor.tokenizer.convert_tokens_to_ids('"')
    masks = report_grammar.masks([8, 3, 1])
    generator = torch.Generator().manual_seed(0)
    masks(None, torch.zeros(3, masks.bitmask.shape[1] * 32))
    steps = 0
    while not all(masks.ended):
        logits = torch.rand(3, masks.bitmask.shape[1] * 32, generator=generator)
        masks(None, logits)
        # A quote wherever one is allowed: texts close at once, so the answers end soon.
        tokens = torch.where(logits[:, quote] > float("-inf"), quote, logits.argmax(-1))
        masks.accept(tokens.tolist(), fill_now=steps % 2 == 0)
        assert masks.ended == [m.is_terminated() for m in masks.matchers]
        steps += 1
        if steps == 20:
            masks.keep([2, 0, 1])
        assert steps < 3000
    assert steps > 20


def test_the_benchmarks_random_model_ends_its_texts_by_their_targets(loaded):
    """benchmarks/throughput.py's grammar rows (benchmarks/text_ends.py): the random model,
    which left alone writes every text to the grammar's bound, ends each text at a length
    drawn between SHORT x its target and the target, so the masks cost what a trained
    model's do; the answers stay valid reports, also after `keep` reorders the rows."""
    import torch

    from benchmarks.text_ends import SHORT, TEXT_KEYS, EndingMasks
    from models.runner import report_grammar as grammar_of

    tokenizer = loaded.processor.tokenizer
    vocab = loaded.model.config.get_text_config().vocab_size
    ending = grammar_of(loaded)
    ending.masks_type = EndingMasks
    masks = ending.masks([8, 3, 1])
    generator = torch.Generator().manual_seed(1)
    written: list[list[int]] = [[], [], []]
    order = [0, 1, 2]  # which row each buffer position holds
    masks(None, torch.zeros(3, vocab))  # logits as wide as the model's vocabulary
    steps = 0
    while not all(masks.ended):
        logits = masks(None, torch.rand(len(order), vocab, generator=generator))
        tokens = logits.argmax(-1).tolist()
        for position, row in enumerate(order):
            if not masks.ended[position]:
                written[row].append(tokens[position])
        masks.accept(tokens)
        steps += 1
        if steps == 50:
            order = [order[i] for i in (2, 0, 1)]
            masks.keep([2, 0, 1])
        assert steps < 3000
    longest = max(len(t) for t in tokenizer.convert_ids_to_tokens(range(len(tokenizer))))
    lengths = []
    for row, frames in zip(written, (8, 3, 1), strict=True):
        text = tokenizer.decode(row, skip_special_tokens=True)
        assert parse_report(text, frames=frames).valid, text
        report = json.loads(text)
        texts = [("scene", report["scene_description"], grammar.SCENE_CHARS)]
        texts += [("risk", report["risk_assessment"], grammar.RISK_CHARS)]
        texts += [("hazard", h["description"], grammar.HAZARD_CHARS) for h in report["hazards"]]
        for name, value, target in texts:
            assert SHORT * target <= len(value) < target + longest, (name, len(value), target)
            lengths.append(len(value) / target)
    assert len(TEXT_KEYS) == 3 and len(lengths) >= 6
    assert len({round(x, 2) for x in lengths}) > len(lengths) // 2  # drawn, not one length
