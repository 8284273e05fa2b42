"""The Python API: ``glmrun.load(path)`` and the model object it returns."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .chat import Conversation, Document
from .config import ModelConfig, QuantSpec
from .engine import Engine, GenerationResult, Session, StreamChunk
from .errors import GlmrunError, InvalidArgumentError
from .loader import Checkpoint, default_group_size, load_model, parse_device, resolve_checkpoint
from .memory import cuda_devices_of, release, reset_peaks
from .model import ChatGLMForCausalLM
from .placement import Plan
from .sampling import SamplingParams
from .tokenizer import Tokenizer

__all__ = ["load", "GLMModel", "ChatReply", "ChatChunk", "parse_quantize"]

History = list[tuple[str, str]]
_SAMPLING_KEYS = {f for f in SamplingParams.__dataclass_fields__}


@dataclass(frozen=True)
class ChatReply:
    """A finished chat turn. Unpacks like the official ``response, history = model.chat(...)``."""

    text: str
    history: History
    result: GenerationResult

    def __iter__(self) -> Iterator[Any]:
        return iter((self.text, self.history))


@dataclass(frozen=True)
class ChatChunk:
    """One step of :meth:`GLMModel.stream_chat`: the new text, the answer so far and the history with it."""

    delta: str
    text: str
    history: History = field(default_factory=list)
    result: GenerationResult | None = None


def parse_quantize(value: str | QuantSpec | None, group_size: int = 128) -> QuantSpec | None:
    if value is None or isinstance(value, QuantSpec):
        return value
    text = value.strip().lower()
    if text in ("", "none", "no"):
        return None
    if text in ("int8", "8"):
        return QuantSpec(8, group_size)
    if text in ("int4", "4"):
        return QuantSpec(4, group_size)
    raise InvalidArgumentError(f"unknown quantization {value!r}: use int8 or int4")


def sampling_params(base: SamplingParams, options: dict[str, Any]) -> SamplingParams:
    unknown = set(options) - _SAMPLING_KEYS
    if unknown:
        raise InvalidArgumentError(f"unknown generation option(s) {sorted(unknown)}; known: {sorted(_SAMPLING_KEYS)}")
    if "temperature" in options and "do_sample" not in options:  # a temperature asks for sampling (0: greedy)
        options = {**options, "do_sample": options["temperature"] != 0}
    return base.replace(**options) if options else base


class GLMModel:
    """A loaded model with its tokenizer and engine. Use as a context manager, or call :meth:`close`."""

    def __init__(
        self,
        model: ChatGLMForCausalLM,
        tokenizer: Tokenizer,
        checkpoint: Checkpoint,
        *,
        context_length: int | None = None,
        prefill_chunk: int = 2048,
        plan: Plan | None = None,
    ) -> None:
        self.checkpoint = checkpoint
        self.plan = plan  # the multi-GPU placement plan, when one was made
        self.tokenizer = tokenizer
        self.engine: Engine | None = Engine(
            model, tokenizer, context_length=context_length, prefill_chunk=prefill_chunk
        )
        self.defaults = SamplingParams.model_defaults(model.config.family)
        if self.engine.context_length < (self.defaults.max_length or 0):
            self.defaults = self.defaults.replace(max_length=self.engine.context_length)
        self._session = Session()

    # Introspection ---------------------------------------------------------------------------
    @property
    def config(self) -> ModelConfig:
        return self._engine().config

    @property
    def model_id(self) -> str:
        return self.checkpoint.model_id

    @property
    def context_length(self) -> int:
        return self._engine().context_length

    def _engine(self) -> Engine:
        if self.engine is None:
            raise GlmrunError("this model was closed; load it again with glmrun.load()")
        return self.engine

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer.encode(text, add_special_tokens=False))

    def devices(self) -> list[torch.device]:
        return sorted(set(self._engine().model.layer_devices()), key=str)

    def memory_report(self) -> dict[str, dict[str, Any]]:
        """Per GPU: allocated / peak / reserved bytes, next to the plan's predicted peak (empty on the CPU)."""
        from .placement_apply import predicted_vs_actual

        return predicted_vs_actual(self.plan, cuda_devices_of(self._engine().model))

    def reset_peak_memory(self) -> None:
        reset_peaks(cuda_devices_of(self._engine().model))

    # Chat ------------------------------------------------------------------------------------
    def conversation(
        self, *, system: str | None = None, documents: Sequence[Document] = (), **options: Any
    ) -> Conversation:
        """A new conversation with its own KV cache (history, documents, follow-ups)."""
        return Conversation(
            self._engine(), system=system, documents=list(documents), params=sampling_params(self.defaults, options)
        )

    def stream_chat(
        self,
        query: str,
        history: Sequence[tuple[str, str]] | None = None,
        *,
        system: str | None = None,
        truncate: bool = False,
        **options: Any,
    ) -> Iterator[ChatChunk]:
        """Stream an answer to ``query`` after ``history``; reuses the cached prefix of the last call."""
        conv = Conversation(
            self._engine(),
            system=system,
            history=[tuple(t) for t in history or []],  # type: ignore[misc]
            params=sampling_params(self.defaults, options),
            session=self._session,
        )
        text = ""
        for chunk in conv.stream(query, truncate=truncate):
            text += chunk.text
            if chunk.result is None:
                yield ChatChunk(chunk.text, text, list(conv.history[:]) + [(query, text)])
            else:
                yield ChatChunk(chunk.text, chunk.result.text, list(conv.history), chunk.result)

    def chat(
        self,
        query: str,
        history: Sequence[tuple[str, str]] | None = None,
        *,
        system: str | None = None,
        truncate: bool = False,
        **options: Any,
    ) -> ChatReply:
        """Answer ``query``: ``reply.text``, ``reply.history``; ``text, history = model.chat(q, history)`` works."""
        last = None
        for chunk in self.stream_chat(query, history, system=system, truncate=truncate, **options):
            last = chunk
        assert last is not None and last.result is not None
        return ChatReply(last.result.text, last.history, last.result)

    # Raw completion ----------------------------------------------------------------------------
    def stream_generate(self, prompt: str | Sequence[int], **options: Any) -> Iterator[StreamChunk]:
        """Continue ``prompt`` (text, or token ids) with no chat template."""
        engine = self._engine()
        if isinstance(prompt, str):
            if not prompt:
                raise InvalidArgumentError("the prompt is empty")
            ids = self.tokenizer.encode(prompt, add_special_tokens=True)
        else:
            ids = [int(t) for t in prompt]
        yield from engine.stream(ids, sampling_params(self.defaults, options), session=self._session)

    def generate(self, prompt: str | Sequence[int], **options: Any) -> GenerationResult:
        result = None
        for chunk in self.stream_generate(prompt, **options):
            result = chunk.result or result
        assert result is not None
        return result

    # Lifetime --------------------------------------------------------------------------------
    def close(self) -> None:
        """Free the weights and caches; every GPU returns to its memory before loading."""
        if self.engine is None:
            return
        self._session.close()
        model = self.engine.model
        for module in model.modules():
            for name in list(module._parameters):
                module._parameters[name] = None
            for name in list(module._buffers):
                module._buffers[name] = None
        self.engine = None
        release()

    def __enter__(self) -> GLMModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def load(
    path: str | os.PathLike[str] | None = None,
    *,
    device: str | torch.device | None = "auto",
    dtype: str | torch.dtype | None = None,
    quantize: str | QuantSpec | None = None,
    devices: Sequence[int] | None = None,
    max_memory: dict[int, int] | None = None,
    context: int | None = None,
    prefill_chunk: int = 2048,
    progress: bool = True,
) -> GLMModel:
    """Load a ChatGLM2/3 folder or a GGUF file (default: $GLMRUN_MODEL, else the embedded SmolLM2).

    ``devices``/``max_memory`` spread the layers over several GPUs by a memory plan (see
    :mod:`glmrun.placement`); ``context`` caps the context window (and sizes that plan).
    """
    ckpt = resolve_checkpoint(path)
    # "int8"/"int4" take the model's own group size; a QuantSpec is used as given.
    quant = parse_quantize(quantize, group_size=default_group_size(ckpt) if isinstance(quantize, str) else 128)
    layer_devices = None
    plan = None
    if devices is not None or max_memory is not None:
        from .placement_apply import plan_for_checkpoint

        plan = plan_for_checkpoint(
            ckpt,
            dtype=dtype,
            quant=quant,
            devices=devices,
            max_memory=max_memory,
            context=context,
            prefill_chunk=prefill_chunk,
        )
        layer_devices = [torch.device("cuda", i) for i in plan.layer_devices]
        device = layer_devices[0]
    else:
        parse_device(device)  # fail early on a bad device, before reading any weights
    model, tokenizer = load_model(
        ckpt, dtype=dtype, device=device, quantize=quant, layer_devices=layer_devices, progress=progress
    )
    return GLMModel(model, tokenizer, ckpt, context_length=context, prefill_chunk=prefill_chunk, plan=plan)
