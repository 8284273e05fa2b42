"""The continuous-batching scheduler: batched requests give what each would give alone.

Most tests use a tiny random ChatGLM2 checkpoint (milliseconds a step); the last ones use the
embedded SmolLM2 model. Greedy replies are compared token for token with ``Engine.generate``.

Why exact equality is the right check although batched float32 matmuls do not round like solo
ones (MKL's GEMM gives a row different last bits depending on how many rows share the call; the
masked attention of a batch sums over more, masked, keys): the differences are ~1e-5 in the
logits, so a greedy token can only change where the top two logits are that close. The SmolLM2
test measures that lead on every step of the solo replies and requires it to be far above the
noise, so a mismatch there is a scheduler bug (a wrong row, position or cache move), not rounding.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import glmrun
from glmrun.checkpoint import PRESETS, write_random_checkpoint
from glmrun.engine import Engine, GenerationResult
from glmrun.errors import ContextOverflowError, GlmrunError, InvalidArgumentError, OutOfMemoryError
from glmrun.sampling import SamplingParams
from glmrun.scheduler import QueueFullError, RequestHandle, Scheduler, SchedulerClosedError, padded_batch

TOKENIZER = Path(__file__).resolve().parents[1].parent / "shared/tokenizers/chatglm2/tokenizer.model"
GREEDY = SamplingParams(do_sample=False)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory):
    if not TOKENIZER.is_file():
        pytest.skip(f"the ChatGLM2 tokenizer is not at {TOKENIZER}")
    folder = write_random_checkpoint(
        tmp_path_factory.mktemp("sched") / "tiny", PRESETS["tiny"], tokenizer_path=TOKENIZER
    )
    with glmrun.load(folder, device="cpu", progress=False) as model:
        yield model.engine


def prompts(engine: Engine, n: int) -> list[list[int]]:
    # Different lengths, so rows of different lengths share decode steps.
    return [engine.tokenizer.encode(f"request {i}: " + "tell me more " * (i % 5)) for i in range(n)]


def same(a: GenerationResult, b: GenerationResult) -> bool:
    return (a.token_ids, a.text, a.finish_reason) == (b.token_ids, b.text, b.finish_reason)


@contextlib.contextmanager
def held(sched: Scheduler) -> Iterator[None]:
    """Hold the worker back from the queue, so everything submitted meanwhile starts in the same step."""
    with sched._lock:
        yield


def drain(handle: RequestHandle) -> tuple[list[str], GenerationResult]:
    texts, result = [], None
    for chunk in handle:
        texts.append(chunk.text)
        result = chunk.result or result
    assert result is not None
    return texts, result


# Equality with the engine ------------------------------------------------------------------------
def test_greedy_batched_equals_solo(tiny: Engine) -> None:
    ids = prompts(tiny, 14)
    params = [GREEDY.replace(max_new_tokens=6 + (i * 5) % 17) for i in range(len(ids))]
    solo = [tiny.generate(x, p) for x, p in zip(ids, params, strict=True)]
    with Scheduler(tiny, max_batch=5, max_queue=32) as sched:  # fewer rows than requests: queueing + compaction
        with held(sched):
            handles = [sched.submit(x, p) for x, p in zip(ids, params, strict=True)]
        batched = [drain(h) for h in handles]
        stats = sched.stats()
    for i, ((texts, result), ref) in enumerate(zip(batched, solo, strict=True)):
        assert same(result, ref), f"request {i}: {result.token_ids} != solo {ref.token_ids}"
        assert "".join(texts) == ref.text  # the streamed pieces add up to the text
        assert result.prompt_tokens == len(ids[i]) and result.completion_tokens == len(ref.token_ids)
    assert max(size for size, steps in stats.batch_sizes.items() if steps) == 5  # it did batch
    assert stats.running == stats.waiting == 0
    assert stats.finished["length"] == len(ids)


def test_padded_batch_sizes() -> None:
    assert [padded_batch(n, 64) for n in (1, 2, 3, 5, 8, 9, 33, 64)] == [1, 2, 4, 8, 8, 16, 64, 64]
    assert [padded_batch(n, 6) for n in (3, 4, 5, 6)] == [4, 4, 6, 6]  # capped at the rows there are
    for bad in (0, 7):
        with pytest.raises(InvalidArgumentError):
            padded_batch(bad, 6)


@pytest.mark.parametrize("max_batch,chunk", [(5, 4), (6, 2048)])
def test_padded_decode_steps_equal_solo(
    tiny: Engine, monkeypatch: pytest.MonkeyPatch, max_batch: int, chunk: int
) -> None:
    """The CUDA-graph path pads steps to power-of-two batches; the padding rows (free rows, or the row
    being prefilled chunk by chunk) write at the cache's last position. Forced on here (CPU), with
    rows that run up to that last position, every reply must still equal its solo reply."""
    monkeypatch.setattr(tiny, "prefill_chunk", chunk)  # small chunks: a prefill spans decode steps
    ids = prompts(tiny, 9)
    context = max(len(x) for x in ids) + 12
    params = [GREEDY.replace(max_new_tokens=context - len(x) - (i % 3)) for i, x in enumerate(ids)]
    solo = [tiny.generate(x, p) for x, p in zip(ids, params, strict=True)]
    with Scheduler(tiny, max_batch=max_batch, max_queue=32, max_context=context) as sched:
        sched._pad_batches = True
        with held(sched):
            handles = [sched.submit(x, p) for x, p in zip(ids, params, strict=True)]
        batched = [h.result() for h in handles]
        stats = sched.stats()
    for i, (result, ref) in enumerate(zip(batched, solo, strict=True)):
        assert same(result, ref), f"request {i}: {result.token_ids} != solo {ref.token_ids}"
    assert any(steps for n, steps in stats.batch_sizes.items() if padded_batch(n, max_batch) != n)  # it padded


def test_stop_strings_eos_and_repetition_penalty_match_solo(tiny: Engine) -> None:
    ids = prompts(tiny, 6)
    probe = tiny.generate(ids[0], GREEDY.replace(max_new_tokens=12)).text
    stop = probe[len(probe) // 2 : len(probe) // 2 + 2].strip() or probe[-1]
    cases = [
        GREEDY.replace(max_new_tokens=12, stop=(stop,)),
        GREEDY.replace(max_new_tokens=10, repetition_penalty=1.3),
        GREEDY.replace(max_new_tokens=9, stop=("never appears 123",)),
        SamplingParams(temperature=0.9, top_p=0.9, top_k=50, seed=7, max_new_tokens=10),
        SamplingParams(temperature=1.2, top_p=0.95, seed=8, max_new_tokens=10, repetition_penalty=1.2),
        SamplingParams(temperature=0.7, top_p=0.8, seed=9, max_new_tokens=10),
    ]
    solo = [tiny.generate(x, p) for x, p in zip(ids, cases, strict=True)]
    assert solo[0].finish_reason == "stop" and stop not in solo[0].text
    with Scheduler(tiny, max_batch=6) as sched:
        with held(sched):
            handles = [sched.submit(x, p) for x, p in zip(ids, cases, strict=True)]
        results = [h.result() for h in handles]
    for i, (result, ref) in enumerate(zip(results, solo, strict=True)):
        assert same(result, ref), f"case {i}: {result} != {ref}"


def test_eos_ends_a_row_and_the_others_go_on(tiny: Engine) -> None:
    # A random model rarely says EOS: declare the first token it picks for one prompt an end-of-text id.
    ids = prompts(tiny, 4)
    solo = [tiny.generate(x, GREEDY.replace(max_new_tokens=8)).token_ids for x in ids]
    stop_id = solo[1][0]
    with Scheduler(tiny, max_batch=4) as sched:
        sched._eos = sched._eos | {stop_id}
        with held(sched):
            handles = [sched.submit(x, GREEDY.replace(max_new_tokens=8)) for x in ids]
        results = [h.result() for h in handles]
    for ref, result in zip(solo, results, strict=True):
        cut = ref.index(stop_id) if stop_id in ref else len(ref)
        assert result.token_ids == ref[:cut]
        assert result.finish_reason == ("stop" if cut < len(ref) else "length")
    assert results[1].completion_tokens == 0


# Joining, cancelling, refusing -------------------------------------------------------------------
def test_new_requests_join_between_steps_and_cancel_frees_the_row(tiny: Engine) -> None:
    ids = prompts(tiny, 4)
    with Scheduler(tiny, max_batch=2) as sched:
        long = sched.submit(ids[0], GREEDY.replace(max_new_tokens=1500))
        stream = iter(long)
        for _ in range(3):
            next(stream)  # the long request is decoding
        late = sched.submit(ids[1], GREEDY.replace(max_new_tokens=8))
        assert same(late.result(), tiny.generate(ids[1], GREEDY.replace(max_new_tokens=8)))
        assert sched.stats().batch_sizes[2] > 0  # the late one shared steps with the long one
        long.cancel()
        rest = list(stream)
        assert rest[-1].result is not None and rest[-1].result.finish_reason == "cancelled"
        assert 3 <= rest[-1].result.completion_tokens < 1500
        after = sched.stats()
        assert after.running == 0 and after.finished["cancelled"] == 1
        # The freed rows serve new requests correctly (the compaction left no stale state behind).
        again = [sched.submit(x, GREEDY.replace(max_new_tokens=7)) for x in ids[2:]]
        for x, h in zip(ids[2:], again, strict=True):
            assert same(h.result(), tiny.generate(x, GREEDY.replace(max_new_tokens=7)))


def test_leaving_the_iteration_cancels(tiny: Engine) -> None:
    with Scheduler(tiny, max_batch=1) as sched:
        handle = sched.submit(prompts(tiny, 1)[0], GREEDY.replace(max_new_tokens=1500))
        for _ in handle:
            break
        assert handle.cancelled
        deadline = time.monotonic() + 10
        while sched.stats().running and time.monotonic() < deadline:
            time.sleep(0.01)
        assert sched.stats().running == 0


def test_queue_full_and_cancel_while_waiting(tiny: Engine) -> None:
    ids = prompts(tiny, 4)
    with Scheduler(tiny, max_batch=1, max_queue=2) as sched:
        busy = sched.submit(ids[0], GREEDY.replace(max_new_tokens=1500))
        stream = iter(busy)
        next(stream)  # it holds the only row; new requests wait (dropping the iterator would cancel it)
        waiting = [sched.submit(x, GREEDY.replace(max_new_tokens=4)) for x in ids[1:3]]
        with pytest.raises(QueueFullError) as info:
            sched.submit(ids[3], GREEDY)
        assert info.value.waiting == 2 and info.value.max_queue == 2
        assert isinstance(info.value, GlmrunError)
        waiting[0].cancel()
        busy.cancel()
        gone = waiting[0].result()
        assert gone.finish_reason == "cancelled" and gone.completion_tokens == 0
        assert same(waiting[1].result(), tiny.generate(ids[2], GREEDY.replace(max_new_tokens=4)))


def test_context_overflow_is_refused_with_counts(tiny: Engine) -> None:
    with Scheduler(tiny, max_batch=1, max_context=64) as sched:
        with pytest.raises(ContextOverflowError) as info:
            sched.submit(list(range(10, 70)), GREEDY.replace(max_new_tokens=8))
        assert (info.value.prompt_tokens, info.value.max_new_tokens, info.value.context_length) == (60, 8, 64)
        with pytest.raises(ContextOverflowError):
            sched.submit(list(range(10, 74)), GREEDY)  # a full row leaves no room for one new token
        # Without max_new_tokens a request may run to the end of its row, and no further.
        result = sched.submit(list(range(10, 60)), GREEDY).result()
        assert result.finish_reason in ("length", "stop") and result.completion_tokens <= 14
        with pytest.raises(ContextOverflowError):
            sched.submit(list(range(10, 30)), GREEDY.replace(max_length=20))


def test_async_iteration_and_task_cancellation(tiny: Engine) -> None:
    ids = prompts(tiny, 2)
    expected = tiny.generate(ids[0], GREEDY.replace(max_new_tokens=9))

    async def main(sched: Scheduler) -> None:
        text, result = "", None
        async for chunk in sched.submit(ids[0], GREEDY.replace(max_new_tokens=9)):
            text += chunk.text
            result = chunk.result or result
        assert result is not None and same(result, expected) and text == expected.text

        handle = sched.submit(ids[1], GREEDY.replace(max_new_tokens=1500))
        streaming = asyncio.Event()

        async def consume() -> None:
            async for _ in handle:
                streaming.set()

        task = asyncio.create_task(consume())
        await asyncio.wait_for(streaming.wait(), timeout=30)  # mid-stream, however slow the machine
        task.cancel()  # as Starlette does when an HTTP client goes away
        with pytest.raises(asyncio.CancelledError):
            await task
        assert handle.cancelled

    with Scheduler(tiny, max_batch=2) as sched:
        asyncio.run(main(sched))
        deadline = time.monotonic() + 10
        while sched.stats().running and time.monotonic() < deadline:
            time.sleep(0.01)
        assert sched.stats().running == 0 and sched.stats().finished["cancelled"] == 1


def test_stats_never_lose_a_request_between_queue_rows_and_counts(tiny: Engine) -> None:
    """Every submitted request is waiting, running or counted finished in each stats() (a reader that waited for
    running == 0 and then read the counts once saw a cancelled request in none of them, and failed)."""
    ids = prompts(tiny, 10)
    ids[3] = ids[3] * 40  # longer than a prefill chunk: it is prefilled alone, chunk by chunk
    news = [1, 4, 9, 2, 6, 1, 12, 3, 7, 5]
    lost: list[object] = []
    stop = threading.Event()

    def poll(sched: Scheduler) -> None:
        while not stop.is_set():
            st = sched.stats()
            if st.waiting + st.running + sum(st.finished.values()) < st.submitted:
                lost.append(st)

    interval, chunk = sys.getswitchinterval(), tiny.prefill_chunk
    sys.setswitchinterval(1e-5)  # interleave the poller with the worker's bookkeeping often
    tiny.prefill_chunk = 64
    try:
        with Scheduler(tiny, max_batch=3) as sched:
            with held(sched):
                handles = [sched.submit(p, GREEDY.replace(max_new_tokens=n)) for p, n in zip(ids, news, strict=True)]
            poller = threading.Thread(target=poll, args=(sched,))
            poller.start()
            for i, handle in enumerate(handles):
                for _ in handle:
                    if i % 3 == 1:
                        handle.cancel()  # mid-stream, as a client that goes away
            stop.set()
            poller.join()
            st = sched.stats()
    finally:
        sys.setswitchinterval(interval)
        tiny.prefill_chunk = chunk
    assert not lost, lost[:3]
    assert st.running == 0 and sum(st.finished.values()) == len(ids)


class _FailingModel:
    """Wraps the model; raises torch's out-of-memory error on the first batched decode step."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.transformer = model.transformer
        self.failed = False

    def __call__(self, tokens: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        if tokens.shape[0] > 1 and not self.failed:
            self.failed = True
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return self.model(tokens, *args, **kwargs)


def test_a_failing_step_fails_its_requests_and_the_worker_survives(
    tiny: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    ids = prompts(tiny, 3)
    with Scheduler(tiny, max_batch=2) as sched:
        monkeypatch.setattr(tiny, "model", _FailingModel(tiny.model))
        with held(sched):
            handles = [sched.submit(x, GREEDY.replace(max_new_tokens=6)) for x in ids[:2]]
        for h in handles:
            with pytest.raises(OutOfMemoryError, match="ran out of memory"):
                h.result()
        monkeypatch.undo()
        assert same(sched.submit(ids[2], GREEDY.replace(max_new_tokens=6)).result(),
                    tiny.generate(ids[2], GREEDY.replace(max_new_tokens=6)))  # fmt: skip
        stats = sched.stats()
        assert stats.worker_alive and stats.finished["error"] == 2


def test_close_fails_unfinished_requests_and_refuses_new_ones(tiny: Engine) -> None:
    sched = Scheduler(tiny, max_batch=1)
    running = sched.submit(prompts(tiny, 1)[0], GREEDY.replace(max_new_tokens=1500))
    queued = sched.submit(prompts(tiny, 2)[1], GREEDY)
    stream = iter(running)
    next(stream)
    closer = threading.Thread(target=sched.close)
    closer.start()
    closer.join(30)
    for handle in (running, queued):
        with pytest.raises(SchedulerClosedError):
            handle.result()
    with pytest.raises(SchedulerClosedError):
        sched.submit([1, 2, 3], GREEDY)
    assert not sched.stats().worker_alive


# The embedded SmolLM2 model ------------------------------------------------------------------------
QUESTIONS = [
    "What is the capital of Japan?",
    "How many days are in a week?",
    "What color is the sky?",
    "What is the largest planet?",
    "What is the speed of light?",
    "Name a fruit that is yellow.",
]
MIN_LEAD = 1e-2  # smallest top-1 - top-2 logit gap allowed on the solo replies (batching noise: ~1e-5)


def greedy_leads(engine: Engine, prompt: list[int], result: GenerationResult) -> torch.Tensor:
    """Top-1 minus top-2 logit at every token the solo greedy reply chose (EOS included)."""
    seq = prompt + result.token_ids
    with torch.inference_mode():
        cache = engine.new_cache(1, len(seq))
        logits = engine.model(torch.tensor([seq]), torch.arange(len(seq))[None], cache, logits="all")[0]
    steps = logits[len(prompt) - 1 : len(prompt) - 1 + len(result.token_ids) + (result.finish_reason == "stop")]
    top = steps.topk(2, dim=-1).values
    return top[:, 0] - top[:, 1]


@pytest.fixture(scope="module")
def smol():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 2 cores: one for the worker, one for the rest (see benchmarks/)
    try:
        with glmrun.load(None, device="cpu", progress=False) as model:
            yield model.engine
    finally:
        torch.set_num_threads(threads)


def test_embedded_model_batched_greedy_equals_solo(smol: Engine) -> None:
    ids = [smol.tokenizer.build_chat_ids([{"role": "user", "content": q}]) for q in QUESTIONS]
    limits = [14, 9, 14, 11, 14, 6]
    solo = [smol.generate(x, GREEDY.replace(max_new_tokens=n)) for x, n in zip(ids, limits, strict=True)]
    for q, x, ref in zip(QUESTIONS, ids, solo, strict=True):
        lead = float(greedy_leads(smol, x, ref).min())
        assert lead > MIN_LEAD, f"{q!r}: a greedy step leads by only {lead:.2e}; pick a less ambiguous prompt"
    with Scheduler(smol, max_batch=4, max_context=256) as sched:
        with held(sched):
            handles = [sched.submit(x, GREEDY.replace(max_new_tokens=n)) for x, n in zip(ids, limits, strict=True)]
        results = [drain(h) for h in handles]
    for q, (texts, result), ref in zip(QUESTIONS, results, solo, strict=True):
        assert same(result, ref), f"{q!r}: {result.text!r} != solo {ref.text!r}"
        assert "".join(texts) == ref.text


def test_coalesced_async_iteration_merges_waiting_text(tiny: Engine) -> None:
    ids = prompts(tiny, 1)[0]
    params = GREEDY.replace(max_new_tokens=12)
    ref = tiny.generate(ids, params)
    with Scheduler(tiny, max_batch=1) as sched:
        handle = sched.submit(ids, params)
        deadline = time.monotonic() + 60
        while not handle.finished and time.monotonic() < deadline:  # every chunk is queued, none consumed
            time.sleep(0.01)
        assert handle.finished

        async def collect() -> list:
            return [chunk async for chunk in handle.aiter(coalesce=True)]

        chunks = asyncio.run(collect())
    assert len(chunks) == 2  # the waiting text chunks as one, then the final chunk with the result
    assert chunks[0].token_id == ref.token_ids[-1] and chunks[0].result is None
    assert "".join(c.text for c in chunks) == ref.text and chunks[1].result is not None
    assert chunks[1].result.token_ids == ref.token_ids
