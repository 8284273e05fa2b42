"""Continuous batching: many requests share the model's decode steps.

A :class:`Scheduler` owns one :class:`~glmrun.cache.KVCache` with a row per running request and
one worker thread, the only thread that calls the model. Between two decode steps the worker
prefills waiting requests into free rows (one prefill chunk at a time, so a long prompt cannot stall
the running streams for long); every decode step then advances all running requests together.
Running requests always occupy rows ``0..n-1``: when one finishes, the last row's keys/values move
into its place, so a step is one ``model(tokens [n, 1], positions [n, 1], cache)`` call in which
rows of different lengths take part (the model masks each row's keys by its own position).

Per request the rules are those of :meth:`glmrun.engine.Engine.stream` (sampling, EOS ids, token
limits, stop strings, incremental text), and a :class:`RequestHandle` yields the same
:class:`~glmrun.engine.StreamChunk` objects, synchronously or with ``async for``. A greedy request
running alone takes the very path ``Engine.generate`` takes; in a batch, the batched matrix products
may round differently in the last bits (see tests/test_scheduler.py), never enough to change a
token whose lead over the runner-up is more than that noise.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from .engine import Engine, GenerationResult, StreamChunk
from .errors import ContextOverflowError, GlmrunError, InvalidArgumentError
from .fastpath import GraphDecoder, graphs_supported, pow2_bucket
from .memory import raise_friendly_oom
from .sampling import SamplingParams, StopStringMatcher, make_generator, sample_rows
from .tokenizer import IncrementalDetokenizer

__all__ = ["Scheduler", "RequestHandle", "SchedulerStats", "QueueFullError", "SchedulerClosedError", "padded_batch"]


def padded_batch(n: int, max_batch: int) -> int:
    """Rows a decode step of ``n`` requests runs on the CUDA-graph path: the next power of two, capped.

    One graph per padded size (1, 2, 4, ... max_batch) instead of one per batch size keeps the number of
    captures (and their start-up cost) logarithmic in ``max_batch``.
    """
    if not 1 <= n <= max_batch:
        raise InvalidArgumentError(f"a decode step needs 1..{max_batch} rows, got {n}")
    return pow2_bucket(n, start=1, cap=max_batch)


class QueueFullError(GlmrunError):
    """Too many requests are waiting for a free batch row; retry later (HTTP 429)."""

    def __init__(self, message: str, *, waiting: int, max_queue: int):
        super().__init__(message)
        self.waiting = waiting
        self.max_queue = max_queue


class SchedulerClosedError(GlmrunError):
    """The scheduler was closed (the server is shutting down); the request was not finished."""


@dataclass(frozen=True)
class SchedulerStats:
    """A snapshot of the scheduler's state and counters (what ``/metrics`` reports)."""

    waiting: int  # submitted, not yet given a row
    running: int  # holding a row: being prefilled or decoding
    max_batch: int
    max_queue: int
    context_length: int  # tokens one row holds
    cache_bytes: int
    submitted: int
    finished: dict[str, int]  # finish_reason -> count ("stop", "length", "cancelled", "error")
    prefill_tokens: int
    generated_tokens: int  # tokens given to requests (EOS not counted)
    decode_steps: int
    decode_tokens: int  # tokens fed through decode steps (sum of the batch sizes)
    batch_sizes: dict[int, int]  # decode-step batch size -> number of steps
    worker_alive: bool


_Item = StreamChunk | BaseException


class RequestHandle:
    """One submitted request: iterate it (``for`` or ``async for``) for its chunks; ``cancel()`` to stop it.

    The last chunk carries the :class:`~glmrun.engine.GenerationResult`; a failed request raises its
    error from the iteration instead. One consumer per handle. Leaving the iteration early (``break``,
    an exception, a cancelled task) cancels the request, which frees its row.
    """

    def __init__(self, request_id: str, prompt_tokens: int, max_new_tokens: int, scheduler: Scheduler) -> None:
        self.request_id = request_id
        self.prompt_tokens = prompt_tokens
        self.max_new_tokens = max_new_tokens
        self._scheduler = scheduler
        self._items: collections.deque[_Item] = collections.deque()
        self._cond = threading.Condition()
        self._cancelled = False
        self._finished = False  # the last item (result or error) was pushed
        self._loop: asyncio.AbstractEventLoop | None = None
        self._event: asyncio.Event | None = None
        self._async_waiting = False  # the async consumer sleeps on _event (guarded by _cond)

    @property
    def cancelled(self) -> bool:
        return self._cancelled

    @property
    def finished(self) -> bool:
        return self._finished

    def cancel(self) -> None:
        """Stop generating; the worker ends the request at its next step and frees its row."""
        if not self._finished and not self._cancelled:
            self._cancelled = True
            self._scheduler._wake()

    # Called by the worker thread --------------------------------------------------------------
    def _push(self, item: _Item) -> None:
        with self._cond:
            if self._finished:
                return
            self._items.append(item)
            self._finished = isinstance(item, BaseException) or item.result is not None
            self._cond.notify_all()
            loop, event = self._loop, self._event
            wake, self._async_waiting = self._async_waiting, False
        if wake and loop is not None and event is not None:  # only a sleeping consumer needs the loop woken
            try:
                loop.call_soon_threadsafe(event.set)
            except RuntimeError:  # the consumer's event loop is closed: nobody is listening
                pass

    # Consumers --------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[StreamChunk]:
        done = False
        try:
            while True:
                with self._cond:
                    while not self._items:
                        self._cond.wait()
                    item = self._items.popleft()
                if isinstance(item, BaseException):
                    done = True
                    raise item
                done = item.result is not None
                yield item
                if done:
                    return
        finally:
            if not done:
                self.cancel()

    def __aiter__(self) -> AsyncIterator[StreamChunk]:
        return self.aiter()

    async def aiter(self, *, coalesce: bool = False) -> AsyncIterator[StreamChunk]:
        """The chunks, asynchronously. ``coalesce=True`` merges text chunks already waiting into one
        (their ``token_id`` is then the last one's): a consumer that falls behind the decode steps, e.g.
        a server writing one event per chunk to many clients, catches up with fewer, larger pieces."""
        event = asyncio.Event()
        with self._cond:
            self._loop, self._event = asyncio.get_running_loop(), event
        done = False
        try:
            while True:
                with self._cond:
                    item = self._pop_locked(coalesce)
                    if item is None:
                        event.clear()  # under the lock: a push after this sets it again
                        self._async_waiting = True
                if item is None:
                    await event.wait()
                    continue
                if isinstance(item, BaseException):
                    done = True
                    raise item
                done = item.result is not None
                yield item
                if done:
                    return
        finally:
            if not done:
                self.cancel()

    def _pop_locked(self, coalesce: bool) -> _Item | None:
        """The next item, or None (the caller holds ``_cond``); ``coalesce`` merges the text chunks
        already waiting into one, whose ``token_id`` is the last one's."""
        if not self._items:
            return None
        item = self._items.popleft()
        if not coalesce or not isinstance(item, StreamChunk) or item.result is not None:
            return item
        texts, last = [item.text], item
        while self._items:
            nxt = self._items[0]
            if not isinstance(nxt, StreamChunk) or nxt.result is not None:
                break
            texts.append(nxt.text)
            last = nxt
            self._items.popleft()
        return item if last is item else StreamChunk("".join(texts), last.token_id)

    def result(self) -> GenerationResult:
        """Block until the request ends; its result (the chunks are consumed)."""
        last = None
        for chunk in self:
            last = chunk
        assert last is not None and last.result is not None
        return last.result


@dataclass(eq=False)
class _Request:
    handle: RequestHandle
    ids: list[int]
    params: SamplingParams
    max_new: int
    t0: float
    row: int = -1
    length: int = 0  # positions of the row holding this request's keys/values
    next_token: int = -1  # sampled, shown, not yet fed to the model
    out: list[int] = field(default_factory=list)
    text: list[str] = field(default_factory=list)
    ttft: float = 0.0
    detok: IncrementalDetokenizer | None = None
    stops: StopStringMatcher | None = None
    generator: torch.Generator | None = None
    history: torch.Tensor | None = None  # prompt + output ids [T], for the repetition penalty


class Scheduler:
    """Serve many generation requests at once from one model (continuous batching).

    ``max_batch`` rows decode together; up to ``max_queue`` more requests wait for a row.
    ``max_context`` (default: the engine's context length) is how many tokens a row holds; the
    cache costs ``max_batch * max_context`` tokens' keys/values, allocated up front.
    ``on_finish`` is called on the worker thread with every request's result (cancelled ones
    included, failed ones not); keep it quick, e.g. updating metrics.
    """

    def __init__(
        self,
        engine: Engine,
        *,
        max_batch: int = 8,
        max_queue: int = 64,
        max_context: int | None = None,
        on_finish: Callable[[GenerationResult], None] | None = None,
    ) -> None:
        if max_batch < 1 or max_queue < 0:
            raise InvalidArgumentError(f"max_batch must be >= 1 and max_queue >= 0, got {max_batch} and {max_queue}")
        if max_context is not None and max_context < 2:
            raise InvalidArgumentError(f"max_context must be at least 2 tokens, got {max_context}")
        self.engine = engine
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.context_length = min(engine.context_length, max_context or engine.context_length)
        self._on_finish = on_finish
        self._eos = frozenset(engine.tokenizer.eos_token_ids) | frozenset(engine.config.eos_token_ids)
        self._device = engine.model.transformer.embedding.word_embeddings.weight.device
        with raise_friendly_oom(engine):
            self._cache = engine.new_cache(max_batch, self.context_length)
        self._cache_bytes = self._cache.nbytes
        # Decode steps replay CUDA graphs when the whole model is on GPUs (as Engine.decode_step does);
        # steps are padded to power-of-two batches, the padding rows writing at the last position.
        use_graphs = engine.use_cuda_graphs and graphs_supported(engine.model)
        self._graphs: GraphDecoder | None = GraphDecoder(engine.model, self._cache) if use_graphs else None
        self._pad_batches = use_graphs

        self._lock = threading.Condition()
        self._waiting: collections.deque[_Request] = collections.deque()  # guarded by _lock
        self._closing = False
        self._decoding: list[_Request] = []  # worker-owned; index == cache row
        self._prefilling: _Request | None = None  # worker-owned; row == len(_decoding)
        self._admitting: list[_Request] = []  # taken from the queue, not yet decoding: counted as running
        self._ids = itertools.count(1)
        self._submitted = 0
        # Every key exists from the start, so stats() can copy them while the worker counts.
        self._finished = dict.fromkeys(("stop", "length", "cancelled", "error"), 0)
        self._batch_sizes = dict.fromkeys(range(1, max_batch + 1), 0)
        self._prefill_tokens = 0
        self._generated_tokens = 0
        self._decode_steps = 0
        self._decode_tokens = 0
        self._worker = threading.Thread(target=self._run, name="glmrun-scheduler", daemon=True)
        self._worker.start()

    # Public API --------------------------------------------------------------------------------
    def submit(
        self, prompt_ids: Sequence[int], params: SamplingParams, *, request_id: str | None = None
    ) -> RequestHandle:
        """Queue a request; raises ContextOverflowError, QueueFullError or SchedulerClosedError at once."""
        ids = [int(t) for t in prompt_ids]
        if not ids:
            raise InvalidArgumentError("the prompt is empty: give at least one token")
        max_new = self._max_new_tokens(len(ids), params)
        with self._lock:
            if self._closing:
                raise SchedulerClosedError("the scheduler is closed (the server is shutting down)")
            if len(self._waiting) >= self.max_queue:
                raise QueueFullError(
                    f"{len(self._waiting)} requests are already waiting for one of the {self.max_batch} batch "
                    "rows (--max-queue); retry in a moment",
                    waiting=len(self._waiting),
                    max_queue=self.max_queue,
                )
            rid = request_id or f"req-{next(self._ids)}"
            handle = RequestHandle(rid, len(ids), max_new, self)
            self._waiting.append(_Request(handle, ids, params, max_new, time.perf_counter()))
            self._submitted += 1
            self._lock.notify_all()
        return handle

    def stats(self) -> SchedulerStats:
        with self._lock:
            waiting = len(self._waiting)
        running = len(self._decoding) + (self._prefilling is not None) + len(self._admitting)
        return SchedulerStats(
            waiting=waiting,
            running=running,
            max_batch=self.max_batch,
            max_queue=self.max_queue,
            context_length=self.context_length,
            cache_bytes=self._cache_bytes,
            submitted=self._submitted,
            finished=dict(self._finished),
            prefill_tokens=self._prefill_tokens,
            generated_tokens=self._generated_tokens,
            decode_steps=self._decode_steps,
            decode_tokens=self._decode_tokens,
            batch_sizes=dict(self._batch_sizes),
            worker_alive=self._worker.is_alive(),
        )

    def close(self, timeout: float | None = 30.0) -> None:
        """Stop the worker (unfinished requests fail with SchedulerClosedError) and free the cache."""
        with self._lock:
            self._closing = True
            self._lock.notify_all()
        if self._worker is not threading.current_thread():
            self._worker.join(timeout)

    def __enter__(self) -> Scheduler:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # Admission checks ------------------------------------------------------------------------
    def _max_new_tokens(self, n_prompt: int, params: SamplingParams) -> int:
        """How many tokens the request may generate; raises ContextOverflowError as Engine.stream does."""
        wanted = max(1, params.max_new_tokens or 1)
        if self.context_length == self.engine.context_length:
            self.engine.check_fits(n_prompt, wanted)
        elif n_prompt + wanted > self.context_length:
            raise ContextOverflowError(
                f"the prompt has {n_prompt} tokens and {wanted} new tokens were asked for: {n_prompt + wanted} > "
                f"the {self.context_length} tokens a batch row holds. Shorten the input or lower max_tokens.",
                prompt_tokens=n_prompt,
                max_new_tokens=wanted,
                context_length=self.context_length,
            )
        budget = self.context_length - n_prompt
        if params.max_length is not None:
            if n_prompt >= params.max_length:
                raise ContextOverflowError(
                    f"the prompt has {n_prompt} tokens, which reaches max_length={params.max_length}; raise max_length",
                    prompt_tokens=n_prompt,
                    max_new_tokens=0,
                    context_length=params.max_length,
                )
            budget = min(budget, params.max_length - n_prompt)
        max_new = params.max_new_tokens if params.max_new_tokens is not None else budget
        return max(1, min(max_new, budget))

    # Worker ------------------------------------------------------------------------------------
    def _wake(self) -> None:
        with self._lock:
            self._lock.notify_all()

    def _has_work(self) -> bool:
        return bool(self._waiting or self._decoding or self._prefilling is not None)

    def _run(self) -> None:
        try:
            with torch.inference_mode():
                while True:
                    with self._lock:
                        while not self._closing and not self._has_work():
                            self._lock.wait()
                        if self._closing:
                            break
                    self._drop_cancelled()
                    self._admit()
                    if self._decoding:
                        self._decode_step()
        finally:
            self._shutdown()

    def _shutdown(self) -> None:
        error = SchedulerClosedError("the scheduler was closed before this request finished")
        with self._lock:
            self._closing = True
            pending = list(self._waiting)
            self._waiting.clear()
        pending += self._decoding
        if self._prefilling is not None:
            pending.append(self._prefilling)
        self._decoding, self._prefilling = [], None
        for req in pending:
            self._finished["error"] += 1
            req.handle._push(error)
        self._graphs = None
        self._cache.free()

    def _drop_cancelled(self) -> None:
        # Each request is counted finished before it leaves the queue or its row, so stats() never shows it in
        # neither (a caller that waits for running == 0 then reads the counts sees it).
        with self._lock:
            gone = [r for r in self._waiting if r.handle.cancelled]
        for req in gone:
            self._finish(req, "cancelled")
        with self._lock:
            for req in gone:
                self._waiting.remove(req)
        if self._prefilling is not None and self._prefilling.handle.cancelled:
            self._finish(self._prefilling, "cancelled")
            self._prefilling = None
        self._release([i for i, r in enumerate(self._decoding) if r.handle.cancelled], "cancelled")

    def _admit(self) -> None:
        """Prefill waiting requests into free rows, up to one prefill chunk's worth of tokens per call.

        Short prompts are prefilled together, right-padded into one ``[k, T]`` causal call (a row's
        padding writes keys past its prompt, which its own decode steps overwrite before reading);
        a prompt longer than a chunk goes alone, one chunk per call, as ``Engine.prefill`` does.
        """
        chunk = self.engine.prefill_chunk
        budget = chunk
        while budget > 0:
            if self._prefilling is None:
                group = self._take_group(budget)
                if not group:
                    return
                if len(group) > 1 or len(group[0].ids) <= chunk:
                    budget -= len(group) * max(len(r.ids) for r in group)
                    self._prefill_group(group)
                    continue
                self._prefilling = group[0]
                self._admitting = []
            req = self._prefilling
            lo = req.length
            hi = min(lo + chunk, len(req.ids))  # the same chunks as Engine.prefill, so the same numbers
            tokens = torch.tensor([req.ids[lo:hi]], dtype=torch.long, device=self._device)  # [1, T]
            positions = torch.arange(lo, hi, device=self._device)[None]  # [1, T]
            try:
                with raise_friendly_oom(self.engine):
                    logits = self.engine.model(
                        tokens, positions, self._cache, length=hi, first_row=req.row, logits="last"
                    )  # [1, V]
            except Exception as exc:  # the request fails; the worker and the other requests go on
                self._prefilling = None  # first: _fail moves a prefilling row it finds
                self._fail([req], exc)
                continue
            req.length = hi
            self._prefill_tokens += hi - lo
            budget -= hi - lo
            if hi == len(req.ids):
                self._start(req, logits)  # decoding or finished before it stops being the prefilling one
                self._prefilling = None

    def _take_group(self, budget: int) -> list[_Request]:
        """Waiting requests for the free rows, in order: those whose padded batch fits ``budget`` tokens
        (at least the first one, which may be a long prompt to prefill chunk by chunk)."""
        group: list[_Request] = []
        free = self.max_batch - len(self._decoding)
        with self._lock:
            while self._waiting and len(group) < free:
                longest = max([len(self._waiting[0].ids), *(len(r.ids) for r in group)])
                if group and (len(group) + 1) * longest > budget:
                    break
                group.append(self._waiting.popleft())
            self._admitting = group  # stats() counts them running while they leave the queue
        for i, req in enumerate(group):
            req.row, req.length = len(self._decoding) + i, 0
        return group

    def _prefill_group(self, group: list[_Request]) -> None:
        """Prefill whole prompts of several requests in one call; each then takes its first token."""
        k, longest = len(group), max(len(r.ids) for r in group)
        lengths = torch.tensor([len(r.ids) for r in group], device=self._device)  # [k]
        rows = [r.ids + [0] * (longest - len(r.ids)) for r in group]
        tokens = torch.tensor(rows, dtype=torch.long, device=self._device)  # [k, T]
        positions = torch.arange(longest, device=self._device).expand(k, longest)  # [k, T]
        model = self.engine.model
        try:
            with raise_friendly_oom(self.engine):
                hidden = model(tokens, positions, self._cache, length=longest, first_row=group[0].row, logits="none")
                last = hidden[torch.arange(k, device=hidden.device), lengths.to(hidden.device) - 1]  # [k, hidden]
                logits = model.project(last)  # [k, V]
        except Exception as exc:
            self._fail(group, exc)
            self._admitting = []
            return
        for i, req in enumerate(group):
            req.length = len(req.ids)
            self._prefill_tokens += req.length
            if req.row != len(self._decoding):  # an earlier one of the group ended at its first token
                self._cache.move_row(req.row, len(self._decoding), req.length)
                req.row = len(self._decoding)
            self._start(req, logits[i : i + 1])
            self._admitting = group[i + 1 :]  # after: decoding or counted finished, never in neither

    def _start(self, req: _Request, logits: torch.Tensor) -> None:
        """The prompt is in the cache: set up the request's sampling state and take its first token."""
        p = req.params
        req.detok = IncrementalDetokenizer(self.engine.tokenizer)
        req.stops = StopStringMatcher(p.stop)
        req.generator = make_generator(p.seed, self._device)
        req.history = torch.tensor(req.ids, device=self._device)  # [T]
        token = int(sample_rows(self.engine.mask_logits(logits), [p], [req.history], [req.generator])[0])
        reason = self._accept(req, token)
        if reason is None:
            self._decoding.append(req)  # its row is len(_decoding): prefilled there
        else:
            self._finish(req, reason)

    def _decode_step(self) -> None:
        batch = self._decoding
        n = len(batch)
        try:
            with raise_friendly_oom(self.engine):
                logits = self.engine.mask_logits(self._decode_logits(batch))  # [n, V]
                params = [r.params for r in batch]
                history = [r.history for r in batch if r.history is not None]
                generators = [r.generator for r in batch]
                next_tokens = sample_rows(logits, params, history, generators).tolist()
        except Exception as exc:  # every request of the step fails; the worker survives
            self._decoding = []
            self._fail(batch, exc)
            return
        self._decode_steps += 1
        self._decode_tokens += n
        self._batch_sizes[n] += 1
        done: dict[int, str] = {}
        for i, (req, token) in enumerate(zip(batch, next_tokens, strict=True)):
            req.length += 1
            reason = self._accept(req, int(token))
            if reason is not None:
                done[i] = reason
        for i in sorted(done, reverse=True):
            self._release([i], done[i])

    def _decode_logits(self, batch: Sequence[_Request]) -> torch.Tensor:
        """Logits [n, V] of one decode step of rows 0..n-1 (padded to a graph's batch when padding)."""
        n = len(batch)
        rows = padded_batch(n, self.max_batch) if self._pad_batches else n
        # Padding rows are free rows (or the one being prefilled): they write one throw-away key at the
        # cache's last position, which a row only reads after its own decode step has overwritten it.
        pad = [self._cache.max_len - 1] * (rows - n)
        tokens = torch.tensor([[r.next_token] for r in batch] + [[0]] * (rows - n), device=self._device)  # [rows, 1]
        positions = torch.tensor([[r.length] for r in batch] + [[p] for p in pad], device=self._device)  # [rows, 1]
        length = max(r.length for r in batch) + 1
        if self._graphs is not None:
            return self._graphs.step(tokens, positions, length)[:n]
        return self.engine.model(tokens, positions, self._cache, length=length, first_row=0, logits="last")[:n]

    def _accept(self, req: _Request, token: int) -> str | None:
        """Take one sampled token, as Engine.stream's loop does; the finish reason if the request ends."""
        assert req.detok is not None and req.stops is not None
        if not req.out:
            req.ttft = time.perf_counter() - req.t0
        if token in self._eos:
            return "stop"
        req.out.append(token)
        self._generated_tokens += 1
        delta, stopped = req.stops.feed(req.detok.push(token))
        if delta:
            req.text.append(delta)
            req.handle._push(StreamChunk(delta, token))
        if stopped:
            return "stop"
        if len(req.out) >= req.max_new:
            return "length"
        if req.handle.cancelled:
            return "cancelled"
        if req.params.repetition_penalty != 1.0:
            assert req.history is not None
            req.history = torch.cat((req.history, torch.tensor([token], device=req.history.device)))
        req.next_token = token
        return None

    def _release(self, rows: Sequence[int], reason: str) -> None:
        """Finish the requests in these rows and compact: the last rows move into the freed ones."""
        for row in sorted(rows, reverse=True):
            req = self._decoding[row]
            self._finish(req, reason)  # counted before it leaves the running rows (see _drop_cancelled)
            last = len(self._decoding) - 1
            if row != last:
                moved = self._decoding[last]
                self._cache.move_row(last, row, moved.length)
                moved.row = row
                self._decoding[row] = moved
            self._decoding.pop()
        pre = self._prefilling
        if pre is not None and pre.row != len(self._decoding):  # keep the prefilling row right after them
            self._cache.move_row(pre.row, len(self._decoding), pre.length)
            pre.row = len(self._decoding)

    def _finish(self, req: _Request, reason: str) -> None:
        """Flush the held-back text and send the final chunk, as Engine.stream ends a generation."""
        if req.detok is not None and req.stops is not None and not req.stops.stopped:
            tail, hit = req.stops.feed(req.detok.flush())
            if hit:
                reason = "stop"
            else:
                tail += req.stops.flush()
            if tail:
                req.text.append(tail)
                req.handle._push(StreamChunk(tail, None))
        self._finished[reason] += 1
        result = GenerationResult(
            text="".join(req.text),
            token_ids=list(req.out),
            finish_reason=reason,
            prompt_tokens=len(req.ids),
            completion_tokens=len(req.out),
            prefilled_tokens=len(req.ids) if req.detok is not None else 0,
            time_to_first_token=req.ttft,
            total_time=time.perf_counter() - req.t0,
        )
        if self._on_finish is not None:
            try:
                self._on_finish(result)
            except Exception:  # an observer's bug must not stop the worker
                pass
        req.handle._push(StreamChunk("", None, result))

    def _fail(self, requests: Sequence[_Request], exc: BaseException) -> None:
        if not isinstance(exc, GlmrunError):
            exc = GlmrunError(f"generation failed: {type(exc).__name__}: {exc}")
        for req in requests:
            self._finished["error"] += 1
            req.handle._push(exc)
        if self._prefilling is not None and not self._decoding:
            pre = self._prefilling
            if pre.row != 0:
                self._cache.move_row(pre.row, 0, pre.length)
                pre.row = 0
