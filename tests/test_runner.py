"""The batched runner on the tiny model in float32: batching never changes an answer."""

from __future__ import annotations

import sys
import threading

import pytest
import torch
from helpers import make_runner

from models.errors import GenerationError
from models.prompt import build_messages
from models.runner import Answer, ModelRunner, Prepared
from worker.batcher import Batcher


@pytest.fixture(scope="module")
def loaded(tiny_loaded):
    return tiny_loaded


@pytest.fixture(scope="module")
def videos(random_videos):
    return random_videos(20, seed=7)


@pytest.fixture(scope="module")
def single(loaded, videos):
    """Each video's answer when it runs alone: the reference every batched run must match."""
    runner = make_runner(loaded, max_new_tokens=10, batch_size=1, constrained=False)
    return [runner.answer([v])[0] for v in videos]


def _same(answers, reference) -> None:
    assert [a.text for a in answers] == [r.text for r in reference]
    assert [a.tokens_out for a in answers] == [r.tokens_out for r in reference]
    assert [a.tokens_in for a in answers] == [r.tokens_in for r in reference]


@pytest.mark.parametrize("batch_size", [3, 8, 20])
def test_batched_greedy_equals_one_at_a_time_for_every_video(loaded, videos, single, batch_size):
    runner = make_runner(loaded, max_new_tokens=10, batch_size=batch_size, constrained=False)
    answers = runner.answer(videos)
    _same(answers, single)
    assert max(a.batch_size for a in answers) == batch_size


def test_static_cache_and_padded_prompts_change_nothing(loaded, videos, single):
    # The GPU path: one static KV cache and prompts padded up to a multiple of 64 tokens.
    runner = make_runner(
        loaded, max_new_tokens=10, batch_size=6, static_cache=True, constrained=False
    )
    _same(runner.answer(videos), single)


def test_collate_builds_what_the_processor_builds_for_the_batch(loaded, videos):
    runner = make_runner(loaded, max_new_tokens=4, batch_size=8, constrained=False)
    batch = videos[:5]
    collated = runner.collate([runner.prepare(v) for v in batch])
    processor = loaded.processor
    texts = [
        processor.apply_chat_template(
            build_messages(v.timestamps), tokenize=False, add_generation_prompt=True
        )
        for v in batch
    ]
    images = [frame for v in batch for frame in v.frames]
    expected = processor(text=texts, images=images, padding=True, return_tensors="pt")
    assert set(collated) == set(expected)
    assert "mm_token_type_ids" in collated
    for key, value in expected.items():
        assert torch.equal(collated[key], value), key


class OutOfMemoryAbove(ModelRunner):
    """An runner whose device 'runs out of memory' for batches larger than `fits`."""

    def __init__(self, *args, fits: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.fits = fits
        self.tried: list[int] = []

    def _generate(self, batch, answer_tokens, upcoming=None):
        # A retry inside the except block would keep the failed batch's memory alive.
        assert sys.exc_info()[0] is None, "retried while the OOM exception was alive"
        self.tried.append(len(batch))
        if len(batch) > self.fits:
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return super()._generate(batch, answer_tokens, upcoming)


def test_out_of_memory_splits_the_batch_and_keeps_every_answer(loaded, videos, single):
    runner = make_runner(
        loaded, OutOfMemoryAbove, max_new_tokens=10, batch_size=8, fits=3, constrained=False
    )
    answers = runner.answer(videos)
    _same(answers, single)
    # Three quarters each time until it fits: 3 rows, where halving would stop at 2.
    assert runner.tried[:4] == [8, 6, 4, 3]
    # The rest, and later batches, run at the size that fitted rather than failing again.
    assert max(runner.tried[4:]) == 3
    assert runner.batch_limit(100) == 3


def test_a_single_video_that_does_not_fit_is_a_clear_error(loaded, videos):
    runner = make_runner(
        loaded, OutOfMemoryAbove, max_new_tokens=4, batch_size=4, fits=0, constrained=False
    )
    with pytest.raises(GenerationError, match="out of GPU memory for a single video"):
        runner.answer(videos[:2])


def test_batcher_gathers_many_threads_into_batches(loaded, videos, single):
    runner = make_runner(loaded, max_new_tokens=10, batch_size=8, constrained=False)
    batcher = Batcher(runner, wait_s=0.5)
    results: dict[int, object] = {}
    start = threading.Barrier(len(videos))

    def task(i: int) -> None:
        prepared = runner.prepare(videos[i])
        start.wait()
        results[i] = batcher.answer(prepared, timeout=120)

    threads = [threading.Thread(target=task, args=(i,)) for i in range(len(videos))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    batcher.close()
    _same([results[i] for i in range(len(videos))], single)
    assert batcher.stats.videos == len(videos)
    assert max(batcher.stats.sizes) == 8  # it batched across threads, up to the limit
    assert batcher.stats.batches < len(videos)


def test_one_broken_input_fails_alone_and_the_batcher_lives_on(loaded, videos, single):
    runner = make_runner(loaded, max_new_tokens=10, batch_size=4, constrained=False)
    batcher = Batcher(runner, wait_s=0.5)
    good = [runner.prepare(v) for v in videos[:3]]
    broken = Prepared(dict(good[0].tensors))
    broken.tensors["pixel_values"] = broken.tensors["pixel_values"][:5]  # not its grid's size
    futures = [batcher.submit(p) for p in [good[0], broken, good[1], good[2]]]
    with pytest.raises(Exception) as caught:
        futures[1].result(timeout=120)
    assert not isinstance(caught.value, TimeoutError)
    _same([futures[i].result(timeout=120) for i in (0, 2, 3)], single[:3])
    # The GPU thread survived: a later video is still answered.
    _same([batcher.answer(runner.prepare(videos[3]), timeout=120)], [single[3]])
    batcher.close()


class TwoPasses(ModelRunner):
    """No model: the first pass finishes rows 0 and 2 of a batch; the second pass (the
    whole bound, for rows 1 and 3) waits until the test lets it go."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.second_pass = threading.Event()
        self.go_on = threading.Event()

    def _in_batches(self, prepared, answer_tokens, upcoming=None):
        if answer_tokens == self.first_pass_tokens:
            return [Answer("first", 1, answer_tokens, 0.1, finished=i % 2 == 0) for i in range(4)]
        self.second_pass.set()
        assert self.go_on.wait(30)
        return [Answer("second", 1, 9, 0.2) for _ in prepared]


def test_finished_answers_are_handed_out_before_the_second_pass(loaded):
    runner = make_runner(loaded, TwoPasses, max_new_tokens=10, batch_size=4, first_pass_tokens=8)
    assert runner.first_pass_tokens == 8 < runner.answer_tokens
    batcher = Batcher(runner, wait_s=0.5)
    futures = [batcher.submit(Prepared({"input_ids": torch.zeros(1, 5)})) for _ in range(4)]
    assert runner.second_pass.wait(30)
    # while the long answers are described again, the finished ones are already out
    assert [f.done() for f in futures] == [True, False, True, False]
    assert [futures[i].result().text for i in (0, 2)] == ["first", "first"]
    runner.go_on.set()
    again = [futures[i].result(timeout=30) for i in (1, 3)]
    assert [(a.text, round(a.latency_s, 2)) for a in again] == [("second", 0.3)] * 2
    batcher.close()
    assert batcher.stats.sizes == [4]


@pytest.mark.parametrize("announced", [True, False])
def test_a_partial_batch_waits_for_videos_still_being_prepared(loaded, videos, announced):
    """Slow preparations (decoding under load) arrive well apart: announced through
    `preparing()`, they still go as one batch; unannounced, the idle timer splits them."""
    runner = make_runner(loaded, max_new_tokens=2, batch_size=4, constrained=False)
    batcher = Batcher(runner, wait_s=0.05)
    ready = [runner.prepare(v) for v in videos[:4]]
    started = threading.Barrier(4)

    def task(i: int) -> None:
        started.wait()
        if announced:
            with batcher.preparing():
                threading.Event().wait(0.3 * i)  # the i-th video takes 0.3 s more to prepare
                pending = batcher.submit(ready[i])
        else:
            threading.Event().wait(0.3 * i)
            pending = batcher.submit(ready[i])
        pending.result(timeout=120)

    threads = [threading.Thread(target=task, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    batcher.close()
    assert batcher.stats.videos == 4
    if announced:
        assert batcher.stats.sizes == [4]
    else:
        assert len(batcher.stats.sizes) > 1


def test_chunked_prefill_changes_no_answer(loaded, videos, single):
    """Prompts prefilled 64 tokens at a time (into a static cache, left-padded batch)
    answer exactly as each video alone, prefilled whole."""
    runner = make_runner(
        loaded,
        max_new_tokens=10,
        batch_size=8,
        static_cache=True,
        prefill_chunk=64,
        constrained=False,
    )
    assert max(runner.prepare(v).tokens for v in videos) > 2 * 64  # several chunks each
    _same(runner.answer(videos), single)
