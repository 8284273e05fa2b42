"""Drop-in replacements for the official ChatGLM2-6B usage: change only the import line.

    from glmrun.compat import AutoTokenizer, AutoModel
    tokenizer = AutoTokenizer.from_pretrained("THUDM/chatglm2-6b", trust_remote_code=True)
    model = AutoModel.from_pretrained("THUDM/chatglm2-6b", trust_remote_code=True).half().cuda()
    model = model.eval()
    response, history = model.chat(tokenizer, "你好", history=[])

No remote code runs: ``trust_remote_code`` is accepted and ignored. Signatures follow the official
``modeling_chatglm.py`` / ``tokenization_chatglm.py`` of THUDM/chatglm2-6b.
"""

from __future__ import annotations

import builtins
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .api import GLMModel, load
from .cache import KVCache
from .chat_format import detect_chatglm_format
from .errors import DeviceError, InvalidArgumentError
from .loader import resolve_checkpoint
from .tokenizer import ChatGLMTokenizer

__all__ = ["AutoTokenizer", "AutoModel", "load_model_on_gpus", "CompatTokenizer", "CompatModel", "CausalLMOutput"]


class CompatTokenizer:
    """The official tokenizer's surface: encode/decode/build_prompt/__call__."""

    def __init__(self, tokenizer: ChatGLMTokenizer) -> None:
        self.tokenizer = tokenizer

    @property
    def eos_token_id(self) -> int:
        return self.tokenizer.eos_token_ids[0]

    @property
    def pad_token_id(self) -> int:
        return 0

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    def encode(self, text: str, add_special_tokens: bool = True, **_: Any) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)

    def decode(self, ids: Sequence[int] | torch.Tensor, skip_special_tokens: bool = True, **_: Any) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def build_prompt(self, query: str, history: Sequence[tuple[str, str]] | None = None) -> str:
        return self.tokenizer.build_prompt(query, list(history or []))

    def __call__(
        self, text: str | list[str], return_tensors: str | None = None, add_special_tokens: bool = True, **_: Any
    ) -> dict[str, Any]:
        texts = [text] if isinstance(text, str) else list(text)
        rows = [self.encode(t, add_special_tokens=add_special_tokens) for t in texts]
        width = max(len(r) for r in rows)
        # Left padding, as the official tokenizer (padding_side="left").
        ids = [[0] * (width - len(r)) + r for r in rows]
        mask = [[0] * (width - len(r)) + [1] * len(r) for r in rows]
        pos = [[0] * (width - len(r)) + list(range(len(r))) for r in rows]
        out: dict[str, Any] = {"input_ids": ids, "attention_mask": mask, "position_ids": pos}
        if return_tensors == "pt":
            out = {k: torch.tensor(v) for k, v in out.items()}
        if isinstance(text, str) and return_tensors is None:
            out = {k: v[0] for k, v in out.items()}
        return out


class AutoTokenizer:
    @staticmethod
    def from_pretrained(
        path: str | os.PathLike[str], *args: Any, trust_remote_code: bool = True, **kwargs: Any
    ) -> CompatTokenizer:
        ckpt = resolve_checkpoint(path)
        if ckpt.kind != "chatglm":
            raise InvalidArgumentError(f"{path} is not a ChatGLM folder; glmrun.compat mirrors the ChatGLM2 API")
        fmt = detect_chatglm_format(ckpt.path)
        return CompatTokenizer(ChatGLMTokenizer.from_file(ckpt.path / "tokenizer.model", chat_format=fmt))


@dataclass
class CausalLMOutput:
    """What the official model's forward returns, as far as evaluation scripts read it."""

    logits: torch.Tensor  # [batch, seq, padded_vocab_size]
    past_key_values: Any = None

    def __getitem__(self, index: int) -> Any:
        return (self.logits, self.past_key_values)[index]


@dataclass
class _PastKV:
    cache: KVCache
    length: int


def _pairs(history: Sequence[Any] | None) -> list[tuple[str, str]]:
    """Official ChatGLM2 history is [(query, response)]; ChatGLM3's is role dicts: accept both."""
    pairs: list[tuple[str, str]] = []
    pending: str | None = None
    for item in history or []:
        if isinstance(item, dict):
            if item.get("role") == "user":
                pending = str(item.get("content", ""))
            elif item.get("role") == "assistant" and pending is not None:
                pairs.append((pending, str(item.get("content", ""))))
                pending = None
        else:
            q, a = item
            pairs.append((str(q), str(a)))
    return pairs


def _official_options(
    max_length: int | None, do_sample: bool, top_p: float, temperature: float, extra: dict[str, Any]
) -> dict[str, Any]:
    extra = {k: v for k, v in extra.items() if k not in ("num_beams", "logits_processor", "return_past_key_values")}
    opts: dict[str, Any] = {"do_sample": do_sample, "top_p": top_p, "temperature": temperature}
    if max_length is not None:
        opts["max_length"] = max_length
    opts.update(extra)
    return opts


class CompatModel(torch.nn.Module):
    """Wraps a :class:`GLMModel` with the official model's methods."""

    def __init__(self, glm: GLMModel) -> None:
        super().__init__()
        self.glm = glm
        self.transformer_model = glm._engine().model  # registered so .half()/.cuda() reach the weights

    @property
    def config(self) -> Any:
        return self.glm.config

    @property
    def device(self) -> torch.device:
        return self.glm._engine().model.transformer.embedding.word_embeddings.weight.device

    def _moved(self) -> CompatModel:
        self.glm._session.close()  # its cache lives on the old device / dtype
        return self

    def half(self) -> CompatModel:  # type: ignore[override]
        super().half()
        return self._moved()

    def bfloat16(self) -> CompatModel:  # type: ignore[override]
        super().bfloat16()
        return self._moved()

    def float(self) -> CompatModel:  # type: ignore[override]
        super().float()
        return self._moved()

    def cuda(self, device: int | torch.device | None = None) -> CompatModel:  # type: ignore[override]
        if not torch.cuda.is_available():
            raise DeviceError(
                f".cuda() was called but this torch sees no CUDA GPU (torch {torch.__version__}); keep the model on "
                "the CPU with .float(), or install a CUDA build of torch"
            )
        super().cuda(device)
        return self._moved()

    def cpu(self) -> CompatModel:  # type: ignore[override]
        super().cpu()
        return self._moved()

    def chat(
        self,
        tokenizer: CompatTokenizer,
        query: str,
        history: list[Any] | None = None,
        max_length: int = 8192,
        num_beams: int = 1,
        do_sample: bool = True,
        top_p: builtins.float = 0.8,
        temperature: builtins.float = 0.8,
        logits_processor: Any = None,
        **kwargs: Any,
    ) -> tuple[str, list[Any]]:
        reply = self.glm.chat(
            query, _pairs(history), **_official_options(max_length, do_sample, top_p, temperature, kwargs)
        )
        return reply.text, list(history or []) + [(query, reply.text)]

    def stream_chat(
        self,
        tokenizer: CompatTokenizer,
        query: str,
        history: list[Any] | None = None,
        past_key_values: Any = None,
        max_length: int = 8192,
        do_sample: bool = True,
        top_p: builtins.float = 0.8,
        temperature: builtins.float = 0.8,
        logits_processor: Any = None,
        return_past_key_values: bool = False,
        **kwargs: Any,
    ) -> Iterator[tuple[str, list[Any]]]:
        base = list(history or [])
        opts = _official_options(max_length, do_sample, top_p, temperature, kwargs)
        text = ""
        for chunk in self.glm.stream_chat(query, _pairs(history), **opts):
            text = chunk.text
            if chunk.delta or chunk.result is not None:
                yield text, base + [(query, text)]

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        past_key_values: Any = None,
        use_cache: bool = False,
        return_dict: bool = True,
        **_: Any,
    ) -> CausalLMOutput:
        """Logits for every position, [batch, seq, padded_vocab_size], as the official forward."""
        engine = self.glm._engine()
        model = engine.model
        ids = torch.as_tensor(input_ids, dtype=torch.long)
        if ids.dim() == 1:
            ids = ids[None]
        B, T = ids.shape
        past = past_key_values if isinstance(past_key_values, _PastKV) else None
        start = past.length if past else 0
        if past is None or past.cache.rows != B or past.cache.max_len < start + T:
            size = max(start + T, 2 * (past.cache.max_len if past else 0), 64)
            cache = engine.new_cache(B, min(size, max(engine.config.seq_length, start + T)))
            if past is not None:
                for r in range(B):
                    cache.copy_prefix(past.cache, src_row=r, dst_row=r, length=start)
            past = _PastKV(cache, start)
        dev = model.transformer.embedding.word_embeddings.weight.device
        if position_ids is None:
            positions = torch.arange(start, start + T, device=dev)[None].expand(B, T)
        else:
            positions = torch.as_tensor(position_ids, device=dev).reshape(B, T)
        with torch.inference_mode():
            logits = model(ids.to(dev), positions, past.cache, length=start + T, logits="all")
        past.length = start + T
        return CausalLMOutput(logits, past if use_cache else None)


class AutoModel:
    @staticmethod
    def from_pretrained(
        path: str | os.PathLike[str],
        *args: Any,
        trust_remote_code: bool = True,
        torch_dtype: Any = None,
        device_map: Any = None,
        **kwargs: Any,
    ) -> CompatModel:
        """Loads on the CPU in the checkpoint's dtype (weights mmap'd); then ``.half().cuda()`` as usual."""
        dtype = torch_dtype if isinstance(torch_dtype, torch.dtype) else None
        if dtype is None:
            ckpt = resolve_checkpoint(path)
            if ckpt.kind == "chatglm":
                from .config import load_chatglm_config

                dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}[
                    load_chatglm_config(ckpt.path).torch_dtype
                ]
        return CompatModel(load(path, device="cpu", dtype=dtype, progress=True))


def load_model_on_gpus(
    checkpoint_path: str | os.PathLike[str], num_gpus: int = 2, device_map: Any = None, **kwargs: Any
) -> CompatModel:
    """The official helper, but the layers are split by a memory plan, not evenly by count."""
    if num_gpus < 2 and device_map is None:
        return AutoModel.from_pretrained(checkpoint_path, trust_remote_code=True).half().cuda()
    if not torch.cuda.is_available():
        raise DeviceError("load_model_on_gpus needs CUDA GPUs, and this torch sees none")
    if torch.cuda.device_count() < num_gpus:
        raise DeviceError(f"num_gpus={num_gpus} but this machine has {torch.cuda.device_count()} GPU(s)")
    glm = load(checkpoint_path, devices=list(range(num_gpus)), dtype="float16", **kwargs)
    return CompatModel(glm)
