"""Choosing the next token from logits: small pure functions composed by :func:`make_sampler`.

Each step (repetition penalty, temperature, top-k, top-p, greedy, sampling) takes logits of shape
``[B, V]`` and returns new ones; none modifies its input, and all work in float32 whatever the
logits' dtype. Randomness comes only from the ``torch.Generator`` passed in, so a seeded request is
reproducible. The semantics follow transformers' logits processors, which the official ChatGLM2
``chat()`` uses through ``generate()``. :class:`StopStringMatcher` cuts streamed text at stop strings.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .errors import InvalidArgumentError

__all__ = [
    "SamplingParams",
    "Sampler",
    "apply_repetition_penalty",
    "apply_temperature",
    "apply_top_k",
    "apply_top_p",
    "greedy",
    "sample_from_logits",
    "make_sampler",
    "make_generator",
    "sample_rows",
    "StopStringMatcher",
]

# (logits [B, V], tokens seen so far [B, T], generator) -> next tokens [B]
Sampler = Callable[[Tensor, Tensor, torch.Generator | None], Tensor]


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class SamplingParams:
    """How one request picks its tokens, and when it stops."""

    temperature: float = 0.8  # 0 means greedy
    top_p: float = 0.8
    top_k: int = 0  # 0 = off
    repetition_penalty: float = 1.0  # 1 = off
    do_sample: bool = True  # False -> greedy regardless of temperature
    seed: int | None = None
    max_new_tokens: int | None = None
    max_length: int | None = None  # prompt + generated tokens, as in the official chat(max_length=8192)
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        def bad(name: str, allowed: str) -> InvalidArgumentError:
            return InvalidArgumentError(f"sampling {name} must be {allowed}, got {getattr(self, name)!r}")

        if not isinstance(self.temperature, (int, float)) or not 0 <= self.temperature < math.inf:
            raise bad("temperature", "a finite number >= 0 (0 means greedy)")
        if not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            raise bad("top_p", "in the range 0 < top_p <= 1")
        if not _is_int(self.top_k) or self.top_k < 0:
            raise bad("top_k", "an integer >= 0 (0 turns it off)")
        rp = self.repetition_penalty
        if not isinstance(rp, (int, float)) or not 0 < rp < math.inf:
            raise bad("repetition_penalty", "a finite number > 0 (1 turns it off)")
        if not isinstance(self.do_sample, bool):
            raise bad("do_sample", "True or False")
        if self.seed is not None and not _is_int(self.seed):
            raise bad("seed", "an integer or None")
        for name in ("max_new_tokens", "max_length"):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or value < 1):
                raise bad(name, "an integer >= 1 or None")
        if isinstance(self.stop, str) or not isinstance(self.stop, (tuple, list)):
            raise bad("stop", "a tuple of non-empty strings")
        if not all(isinstance(s, str) and s for s in self.stop):
            raise bad("stop", "a tuple of non-empty strings")
        object.__setattr__(self, "stop", tuple(self.stop))  # a list would make the params unhashable

    @property
    def greedy(self) -> bool:
        """Whether the next token is the argmax rather than a random draw."""
        return not self.do_sample or self.temperature == 0

    @classmethod
    def chatglm2_defaults(cls) -> SamplingParams:
        """The defaults of the official ``ChatGLM2.chat()``.

        https://huggingface.co/THUDM/chatglm2-6b/blob/main/modeling_chatglm.py (``def chat``:
        max_length=8192, num_beams=1, do_sample=True, top_p=0.8, temperature=0.8).
        """
        return cls(temperature=0.8, top_p=0.8, do_sample=True, max_length=8192)

    @classmethod
    def model_defaults(cls, family: str) -> SamplingParams:
        """A model family's chat defaults: ChatGLM's official ones; greedy for Llama-family GGUF models.

        The embedded SmolLM2-135M (Q4_1) puts only ~15% on its best first token for "What is the capital of
        France?" ("The"; "L" 14%, "La" 10%): sampled at 0.8 -- or even at its model card's 0.2 -- it often
        drifts into French nonsense, as llama.cpp does on the same file, while its greedy answer is right.
        ``--temperature``/``temperature=`` still sample.
        """
        if family == "llama":
            return cls(temperature=0.8, top_p=0.8, do_sample=False, max_length=8192)
        return cls.chatglm2_defaults()

    def replace(self, **changes: Any) -> SamplingParams:
        """A copy with some fields changed, validated like a new instance."""
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - names)
        if unknown:
            raise InvalidArgumentError(f"unknown sampling option(s) {unknown}; valid ones are {sorted(names)}")
        return dataclasses.replace(self, **changes)


def apply_repetition_penalty(logits: Tensor, prev_tokens: Tensor, penalty: float) -> Tensor:
    """Make tokens already seen less likely: positive logits divided by ``penalty``, negative multiplied.

    Same rule as transformers' ``RepetitionPenaltyLogitsProcessor``; a token seen twice is penalized once.
    """
    logits = logits.float()  # [B, V]
    if penalty == 1.0 or prev_tokens.numel() == 0:
        return logits.clone()
    index = prev_tokens.to(device=logits.device, dtype=torch.long)  # [B, T]
    seen = logits.gather(1, index)  # [B, T]
    seen = torch.where(seen < 0, seen * penalty, seen / penalty)
    return logits.scatter(1, index, seen)


def apply_temperature(logits: Tensor, temperature: float) -> Tensor:
    """Divide logits by ``temperature``; below 1 sharpens the distribution, above 1 flattens it."""
    if not temperature > 0:
        raise InvalidArgumentError(f"temperature must be > 0 here (use greedy() for 0), got {temperature!r}")
    return logits.float() / temperature


def apply_top_k(logits: Tensor, k: int) -> Tensor:
    """Keep the ``k`` largest logits of each row (and any tied with the k-th); the rest become -inf."""
    logits = logits.float()  # [B, V]
    if k <= 0 or k >= logits.shape[-1]:
        return logits.clone()
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]  # [B, 1]
    return logits.masked_fill(logits < kth, -math.inf)


def apply_top_p(logits: Tensor, p: float) -> Tensor:
    """Nucleus filtering: keep the smallest set of most likely tokens whose probabilities sum to >= ``p``.

    Computed as transformers' ``TopPLogitsWarper`` does (ascending sort, drop tokens whose cumulative
    mass is <= 1 - p), so boundary cases round the same way; the most likely token is always kept.
    """
    logits = logits.float()  # [B, V]
    if p >= 1.0:
        return logits.clone()
    sorted_logits, order = torch.sort(logits, dim=-1, descending=False)  # [B, V]
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)  # [B, V]
    drop_sorted = cumulative <= 1 - p
    drop_sorted[..., -1] = False  # the top token
    drop = drop_sorted.scatter(1, order, drop_sorted)
    return logits.masked_fill(drop, -math.inf)


def greedy(logits: Tensor) -> Tensor:
    """The most likely token of each row, ``[B]`` long."""
    return logits.float().argmax(dim=-1)


def sample_from_logits(logits: Tensor, generator: torch.Generator | None) -> Tensor:
    """Draw one token per row from ``softmax(logits)``, ``[B]`` long."""
    probs = logits.float().softmax(dim=-1)  # [B, V]
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)


def _warp(logits: Tensor, params: SamplingParams) -> Tensor:
    """Temperature, then top-k, then top-p: the order of transformers' logits warpers."""
    logits = apply_temperature(logits, params.temperature)
    if params.top_k > 0:
        logits = apply_top_k(logits, params.top_k)
    if params.top_p < 1.0:
        logits = apply_top_p(logits, params.top_p)
    return logits


def make_sampler(params: SamplingParams) -> Sampler:
    """Compose the steps ``params`` asks for into one function ``(logits, prev_tokens, generator) -> tokens``.

    The repetition penalty applies to greedy decoding too, as in transformers' ``generate()``.
    """

    def sampler(logits: Tensor, prev_tokens: Tensor, generator: torch.Generator | None) -> Tensor:
        logits = apply_repetition_penalty(logits, prev_tokens, params.repetition_penalty)
        if params.greedy:
            return greedy(logits)
        return sample_from_logits(_warp(logits, params), generator)

    return sampler


def make_generator(seed: int | None, device: torch.device | str) -> torch.Generator | None:
    """A generator seeded with ``seed`` on ``device``, or None (torch's global one) when there is no seed."""
    if seed is None:
        return None
    return torch.Generator(device=device).manual_seed(seed)


def sample_rows(
    logits: Tensor,
    params: Sequence[SamplingParams],
    prev_tokens: Sequence[Tensor],
    generators: Sequence[torch.Generator | None],
) -> Tensor:
    """Next tokens ``[B]`` for a batch whose rows have their own params, history ``[T_i]`` and generator.

    Greedy rows share one argmax; sampled rows are drawn one by one so each uses its own generator.
    """
    batch = logits.shape[0]
    if not len(params) == len(prev_tokens) == len(generators) == batch:
        raise InvalidArgumentError(
            f"sample_rows needs one params, prev_tokens and generator per row: batch {batch}, got "
            f"{len(params)}, {len(prev_tokens)} and {len(generators)}"
        )
    out = torch.empty(batch, dtype=torch.long, device=logits.device)  # [B]
    greedy_rows = [i for i, p in enumerate(params) if p.greedy]
    if greedy_rows:
        rows = [
            apply_repetition_penalty(logits[i : i + 1], prev_tokens[i].reshape(1, -1), params[i].repetition_penalty)
            for i in greedy_rows
        ]
        out[greedy_rows] = greedy(torch.cat(rows))  # one argmax over [G, V]
    for i, p in enumerate(params):
        if not p.greedy:
            out[i] = make_sampler(p)(logits[i : i + 1], prev_tokens[i].reshape(1, -1), generators[i])[0]
    return out


class StopStringMatcher:
    """Cut streamed text at the first stop string, never showing the stop string itself.

    Text that could be the beginning of a stop string is held back until the next delta settles it.
    Generation stops as soon as any stop string is complete in the text seen so far.
    """

    def __init__(self, stops: Sequence[str]) -> None:
        if isinstance(stops, str) or not all(isinstance(s, str) and s for s in stops):
            raise InvalidArgumentError(f"stop strings must be a sequence of non-empty strings, got {stops!r}")
        self.stops = tuple(stops)
        self._held = ""
        self.stopped = False

    def feed(self, text_delta: str) -> tuple[str, bool]:
        """Add newly decoded text; return the text safe to show now and whether a stop string was hit."""
        if self.stopped:
            return "", True
        text = self._held + text_delta
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if hits:
            self._held = ""
            self.stopped = True
            return text[: min(hits)], True
        hold = 0
        for stop in self.stops:  # longest tail of text that is a proper prefix of a stop string
            for n in range(min(len(stop) - 1, len(text)), hold, -1):
                if text.endswith(stop[:n]):
                    hold = n
                    break
        self._held = text[len(text) - hold :]
        return text[: len(text) - hold], False

    def flush(self) -> str:
        """The held-back text, for when generation ends without a stop string."""
        held, self._held = self._held, ""
        return held
