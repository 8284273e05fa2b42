"""Generation: prefill, decode steps, sampling and stop rules, as one streaming generator.

:meth:`Engine.stream` is the core primitive; :meth:`Engine.generate` consumes it. A
:class:`Session` owns one KV-cache row and remembers which tokens it holds, so a follow-up prompt
that starts with those tokens (a conversation's history, a document) prefills only what is new.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from .cache import KVCache
from .cpu_decode import CpuDecoder, cpu_decoder_supported
from .errors import ContextOverflowError, InvalidArgumentError
from .fastpath import GraphDecoder, graphs_supported
from .memory import raise_friendly_oom
from .model import ChatGLMForCausalLM
from .sampling import SamplingParams, StopStringMatcher, make_generator, make_sampler
from .tokenizer import IncrementalDetokenizer, Tokenizer

__all__ = ["Engine", "Session", "GenerationResult", "StreamChunk"]


@dataclass(frozen=True)
class GenerationResult:
    """What one generation produced, with its counts and timings."""

    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (EOS or a stop string), "length" (a token limit) or "cancelled"
    prompt_tokens: int
    completion_tokens: int
    prefilled_tokens: int  # prompt tokens computed now; the rest came from the session's cache
    time_to_first_token: float  # seconds from the call to the first generated token
    total_time: float

    @property
    def decode_tokens_per_second(self) -> float:
        decode_time = self.total_time - self.time_to_first_token
        return (self.completion_tokens - 1) / decode_time if self.completion_tokens > 1 and decode_time > 0 else 0.0


@dataclass(frozen=True)
class StreamChunk:
    """One streamed piece: new text (possibly empty), and the final result on the last chunk."""

    text: str
    token_id: int | None = None
    result: GenerationResult | None = None


@dataclass
class Session:
    """One KV-cache row plus the tokens whose keys/values it holds (positions 0..len-1)."""

    cache: KVCache | None = None
    tokens: list[int] = field(default_factory=list)

    def reset(self) -> None:
        self.tokens.clear()

    def close(self) -> None:
        if self.cache is not None:
            self.cache.free()
        self.cache = None
        self.tokens.clear()


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class Engine:
    """Runs a model and its tokenizer: prefill in chunks, decode token by token, stream text."""

    def __init__(
        self,
        model: ChatGLMForCausalLM,
        tokenizer: Tokenizer,
        *,
        context_length: int | None = None,
        prefill_chunk: int = 2048,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.config = model.config
        limit = self.config.seq_length
        if context_length is not None and context_length <= 0:
            raise InvalidArgumentError(f"context length must be positive, got {context_length}")
        self.context_length = min(context_length, limit) if context_length else limit
        self.prefill_chunk = prefill_chunk
        self.use_cuda_graphs = True
        self._graph: GraphDecoder | None = None  # bound to the cache of the session decoding now
        self.use_cpu_decoder = True
        # The CPU decoder multiplies by a GGUF file's 4-bit blocks where the layers carry them (bfloat16 rows,
        # see glmrun.cpu_decode); False keeps its float32-arithmetic products.
        self.use_cpu_int4 = True
        self._cpu: CpuDecoder | None = None  # likewise, on the CPU
        self.lock = threading.Lock()  # one generation at a time per Engine; the scheduler batches instead

    @property
    def cache_dtype(self) -> torch.dtype:
        return self.model.transformer.embedding.word_embeddings.weight.dtype

    # Capacity --------------------------------------------------------------------------------
    def check_fits(self, prompt_tokens: int, max_new_tokens: int) -> None:
        if prompt_tokens + max_new_tokens > self.context_length:
            raise ContextOverflowError(
                f"the prompt has {prompt_tokens} tokens and {max_new_tokens} new tokens were asked for: "
                f"{prompt_tokens + max_new_tokens} > the context of {self.context_length} tokens. Shorten the "
                "input, lower max_new_tokens, use a model with a longer context, or ask for truncation.",
                prompt_tokens=prompt_tokens,
                max_new_tokens=max_new_tokens,
                context_length=self.context_length,
            )

    def new_cache(self, rows: int, max_len: int) -> KVCache:
        return KVCache(
            self.config, rows=rows, max_len=max_len, dtype=self.cache_dtype, devices=self.model.layer_devices()
        )

    def _ensure_capacity(self, session: Session, needed: int) -> KVCache:
        cache = session.cache
        if cache is not None and cache.max_len >= needed:
            return cache
        # Grow geometrically up to the context length, keeping the cached prefix.
        size = min(self.context_length, max(needed, 2 * cache.max_len if cache else 256))
        new = self.new_cache(1, size)
        if cache is not None and session.tokens:
            new.copy_prefix(cache, src_row=0, dst_row=0, length=len(session.tokens))
        if cache is not None:
            if self._graph is not None and self._graph.cache is cache:
                self._graph = None
            if self._cpu is not None and self._cpu.cache is cache:
                self._cpu = None
            cache.free()
        session.cache = new
        return new

    # Model steps -----------------------------------------------------------------------------
    def _device(self) -> torch.device:
        return self.model.transformer.embedding.word_embeddings.weight.device

    def prefill(self, session: Session, ids: Sequence[int], start: int) -> torch.Tensor:
        """Compute ids[start:] into the session's cache (in chunks); logits [1, V] of the last one."""
        cache = session.cache
        assert cache is not None
        dev = self._device()
        del session.tokens[start:]
        logits = None
        for lo in range(start, len(ids), self.prefill_chunk):
            hi = min(lo + self.prefill_chunk, len(ids))
            tokens = torch.tensor([ids[lo:hi]], dtype=torch.long, device=dev)
            positions = torch.arange(lo, hi, device=dev)[None]
            logits = self.model(tokens, positions, cache, length=hi, logits="last")
            session.tokens.extend(ids[lo:hi])
        assert logits is not None
        return logits

    def graph_decoder(self, cache: KVCache) -> GraphDecoder | None:
        """The CUDA-graph decoder for ``cache``, when the model sits on one GPU (else None: plain path)."""
        if not self.use_cuda_graphs or not graphs_supported(self.model):
            return None
        if self._graph is None or self._graph.cache is not cache:
            self._graph = GraphDecoder(self.model, cache)
        return self._graph

    def cpu_decoder(self, cache: KVCache) -> CpuDecoder | None:
        """The CPU decoder for ``cache``, when the whole model runs float32 arithmetic on the CPU (else None)."""
        if not self.use_cpu_decoder:
            return None
        if self._cpu is not None and self._cpu.cache is cache and self._cpu.int4 == self.use_cpu_int4:
            return self._cpu
        if self._device().type != "cpu" or cache.rows != 1 or cache.dtype != torch.float32:
            return None
        if not cpu_decoder_supported(self.model):
            return None
        self._cpu = CpuDecoder(self.model, cache, int4=self.use_cpu_int4)
        return self._cpu

    def decode_step(self, session: Session, token: int) -> torch.Tensor:
        cache = session.cache
        assert cache is not None
        dev = self._device()
        pos = len(session.tokens)
        tokens, positions = torch.tensor([[token]], device=dev), torch.tensor([[pos]], device=dev)
        decoder = self.cpu_decoder(cache) or self.graph_decoder(cache)
        if decoder is not None:
            logits = decoder.step(tokens, positions, pos + 1)
        else:
            logits = self.model(tokens, positions, cache, length=pos + 1)
        session.tokens.append(token)
        return logits

    def mask_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """Ids past the tokenizer's vocabulary (padding rows of the output layer) are never sampled."""
        vocab = self.tokenizer.vocab_size
        if logits.shape[-1] > vocab:
            logits[..., vocab:] = float("-inf")
        return logits

    # Generation -----------------------------------------------------------------------------
    def stream(
        self,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        *,
        session: Session | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> Iterator[StreamChunk]:
        """Generate from ``prompt_ids``, yielding text as it is produced; the last chunk carries the result."""
        if not prompt_ids:
            raise InvalidArgumentError("the prompt is empty: give at least one token")
        with self.lock, torch.inference_mode(), raise_friendly_oom(self):
            yield from self._stream(list(prompt_ids), params, session or Session(), should_stop)

    def _stream(
        self,
        ids: list[int],
        params: SamplingParams,
        session: Session,
        should_stop: Callable[[], bool] | None,
    ) -> Iterator[StreamChunk]:
        t0 = time.perf_counter()
        n_prompt = len(ids)
        budget = self.context_length - n_prompt
        if params.max_length is not None:
            budget = min(budget, params.max_length - n_prompt)
        max_new = params.max_new_tokens if params.max_new_tokens is not None else budget
        self.check_fits(n_prompt, max(1, params.max_new_tokens or 1))
        if params.max_length is not None and n_prompt >= params.max_length:
            raise ContextOverflowError(
                f"the prompt has {n_prompt} tokens, which reaches max_length={params.max_length}; raise max_length",
                prompt_tokens=n_prompt,
                max_new_tokens=0,
                context_length=params.max_length,
            )
        max_new = max(1, min(max_new, budget))

        reuse = common_prefix(session.tokens, ids)
        if reuse == n_prompt:  # the whole prompt is cached: recompute its last token to get logits
            reuse -= 1
        self._ensure_capacity(session, n_prompt + max_new)
        logits = self.prefill(session, ids, reuse)

        sampler = make_sampler(params)
        generator = make_generator(params.seed, logits.device)
        detok = IncrementalDetokenizer(self.tokenizer)
        stops = StopStringMatcher(params.stop)
        eos = set(self.tokenizer.eos_token_ids) | set(self.config.eos_token_ids)
        history = torch.tensor([ids], device=logits.device)
        out: list[int] = []
        text_parts: list[str] = []
        ttft = 0.0
        finish = "length"
        hit_stop_string = False
        while True:
            token = int(sampler(self.mask_logits(logits), history, generator)[0])
            if not out:
                ttft = time.perf_counter() - t0
            if token in eos:
                finish = "stop"
                break
            out.append(token)
            delta, stopped = stops.feed(detok.push(token))
            if delta:
                text_parts.append(delta)
                yield StreamChunk(delta, token)
            if stopped:
                finish, hit_stop_string = "stop", True
                break
            if len(out) >= max_new:
                break
            if should_stop is not None and should_stop():
                finish = "cancelled"
                break
            if params.repetition_penalty != 1.0:
                history = torch.cat((history, torch.tensor([[token]], device=history.device)), dim=1)
            logits = self.decode_step(session, token)
        if not hit_stop_string:
            tail, hit_stop_string = stops.feed(detok.flush())
            if hit_stop_string:
                finish = "stop"
            else:
                tail += stops.flush()
            if tail:
                text_parts.append(tail)
                yield StreamChunk(tail, None)
        result = GenerationResult(
            text="".join(text_parts),
            token_ids=out,
            finish_reason=finish,
            prompt_tokens=n_prompt,
            completion_tokens=len(out),
            prefilled_tokens=n_prompt - reuse,
            time_to_first_token=ttft,
            total_time=time.perf_counter() - t0,
        )
        yield StreamChunk("", None, result)

    def generate(
        self,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        *,
        session: Session | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> GenerationResult:
        """Blocking generation: consumes :meth:`stream`."""
        result = None
        for chunk in self.stream(prompt_ids, params, session=session, should_stop=should_stop):
            result = chunk.result or result
        assert result is not None
        return result
