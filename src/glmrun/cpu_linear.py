"""Multi-row matrix products on the CPU from oneDNN-blocked copies of the float32 weights.

torch's CPU ``F.linear`` goes to the BLAS, which re-packs the whole weight matrix on every call: with a
few rows (batched decode steps of the server, prompt chunks) that packing, not arithmetic, is most of
the time. Measured on this project's 2-core AMD EPYC machines, one thread, the SmolLM2-135M matrices:
8 rows 180 ms dense vs 112 ms blocked, 2 rows 92 vs 64 ms, 64 rows 610 vs 511 ms. One row is faster
dense (51 vs 58 ms), so single-row calls keep using the original matrix and both copies are kept.

That doubles the memory of the matrices, so :func:`pack_cpu_linears_` only packs when the copies take
under a quarter of the memory available now (the 135M default model: +0.5 GB; a 6B model in float32:
not packed). The numbers differ from the dense path in the last bits (~1e-5 relative), as BLAS
results already do between different row counts.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "BlockedCopy",
    "HalfPacked",
    "HalfWeightLinear",
    "PackedLinear",
    "blocked_supported",
    "half_weights_supported",
    "half_weights_",
    "half_weights_for",
    "half_weights_model_",
    "pack_cpu_linears_",
    "pack_model_",
    "linear_rows",
]

_ROWS_HINT = 8  # the blocked layout is chosen for about this many rows (any count works)


def blocked_supported() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


def half_weights_supported() -> bool:
    """fbgemm's float16-weight products (x86 CPUs)."""
    return "fbgemm" in torch.backends.quantized.supported_engines and hasattr(
        torch.ops.quantized, "linear_prepack_fp16"
    )


def _key_of(weight: torch.Tensor) -> tuple[int, int]:
    """Changes when the tensor is replaced or modified in place."""
    return weight.data_ptr(), weight._version


def _on_cpu_float32(*tensors: torch.Tensor) -> bool:
    return all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors)


class _FollowingCopy:
    """A faster copy of a ``[out, in]`` matrix (and bias) that follows its original: made again when the
    matrix is changed in place or replaced (see :func:`_key_of`)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        self._key, self._copy = _key_of(weight), self._make(weight, bias)

    @staticmethod
    def _make(weight: torch.Tensor, bias: torch.Tensor | None) -> Any:
        raise NotImplementedError

    def _current(self, weight: torch.Tensor, bias: torch.Tensor | None) -> Any:
        if _key_of(weight) != self._key:
            self._key, self._copy = _key_of(weight), self._make(weight, bias)
        return self._copy


class BlockedCopy(_FollowingCopy):
    """A oneDNN-blocked copy of a float32 CPU matrix; moved off the CPU or cast, it is not used."""

    @staticmethod
    def _make(weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), _ROWS_HINT)

    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor | None:
        """The product from the blocked copy; None where the dense path should run (one row, not float32)."""
        if x.numel() == x.shape[-1] or not _on_cpu_float32(x, weight):
            return None
        blocked = self._current(weight, bias)
        out = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, x.shape[-1]), blocked, bias, "none", [], "")
        return out.view(*x.shape[:-1], out.shape[-1])


class HalfPacked(_FollowingCopy):
    """fbgemm's packed float16 copy of a matrix (and its float32 bias) for float32 inputs: half the bytes
    a decode step reads, float32 arithmetic."""

    @staticmethod
    def _make(weight: torch.Tensor, bias: torch.Tensor | None) -> Any:
        b = None if bias is None else bias.detach().float()
        return torch.ops.quantized.linear_prepack_fp16(weight.detach().float(), b)

    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor | None:
        if x.device.type != "cpu" or weight.device.type != "cpu" or x.dtype != torch.float32:
            return None
        out = torch.ops.quantized.linear_dynamic_fp16(x.reshape(-1, x.shape[-1]), self._current(weight, bias))
        return out.view(*x.shape[:-1], out.shape[-1])


def linear_rows(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, fast: BlockedCopy | HalfPacked | None
) -> torch.Tensor:
    """``F.linear(x, weight, bias)``, from the fast copy where it applies."""
    out = fast.linear(x, weight, bias) if fast is not None else None
    if out is not None:
        return out
    return F.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))


class PackedLinear(nn.Linear):
    """An ``nn.Linear`` (same parameters, same state dict) with a blocked copy for multi-row inputs."""

    def __init__(self, linear: nn.Linear) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self.fast = BlockedCopy(linear.weight)  # a plain attribute: not saved, not moved by .to()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear_rows(x, self.weight, self.bias, self.fast)


class HalfWeightLinear(nn.Module):
    """A linear layer whose matrix is kept in float16 (state dict: ``weight`` float16, ``bias`` float32)
    and multiplied in float32 by fbgemm: what ``dtype="float16"`` means on the CPU."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = nn.Parameter(linear.weight.detach().to(torch.float16), requires_grad=False)
        self.bias = linear.bias
        self.fast = HalfPacked(self.weight, self.bias)  # a plain attribute: not saved, not moved

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear_rows(x, self.weight, self.bias, self.fast)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, weights=float16"


def _plain_linears(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    return [(n, m) for n, m in model.named_modules() if type(m) is nn.Linear]


def _swap(model: nn.Module, found: list[tuple[str, nn.Linear]], make: Callable[[nn.Linear], nn.Module]) -> int:
    for name, linear in found:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, make(linear))
    return len(found)


def half_weights_for(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``dtype`` on ``device`` means float16 matrices with float32 arithmetic (the CPU's float16)."""
    return device.type == "cpu" and dtype == torch.float16 and half_weights_supported()


def half_weights_(model: nn.Module) -> int:
    """Swap every float32 CPU ``nn.Linear`` of ``model`` for a :class:`HalfWeightLinear`; the count swapped."""
    return _swap(model, [(n, m) for n, m in _plain_linears(model) if _on_cpu_float32(m.weight)], HalfWeightLinear)


def half_weights_model_(model: Any) -> int:
    """:func:`half_weights_` on a ChatGLMForCausalLM, plus a float16 copy of a tied output matrix (the
    embedding table itself stays float32 for the lookups)."""
    swapped = half_weights_(model)
    if model.config.tie_word_embeddings:
        model.fast_head = HalfPacked(model.transformer.embedding.word_embeddings.weight)
    return swapped


def _available_memory() -> int | None:
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def pack_cpu_linears_(model: nn.Module, *, extra_bytes: int = 0, max_fraction: float = 0.25) -> int:
    """Swap every float32 CPU ``nn.Linear`` of ``model`` for a :class:`PackedLinear`; the count swapped.

    Nothing is packed (0) without oneDNN, when a matrix is not float32 on the CPU, or when the copies
    would take (with ``extra_bytes`` the caller packs too) more than ``max_fraction`` of the memory available now.
    """
    found = _plain_linears(model)
    if not found or not blocked_supported() or not all(_on_cpu_float32(m.weight) for _, m in found):
        return 0
    needed = sum(m.weight.numel() * 4 for _, m in found) + extra_bytes
    available = _available_memory()
    if available is None or needed > max_fraction * available:
        return 0
    return _swap(model, found, PackedLinear)


def pack_model_(model: Any) -> int:
    """:func:`pack_cpu_linears_` on a ChatGLMForCausalLM, plus a blocked copy of a tied output matrix."""
    embedding = model.transformer.embedding.word_embeddings.weight
    tied = embedding.numel() * 4 if model.config.tie_word_embeddings else 0
    swapped = pack_cpu_linears_(model, extra_bytes=tied)
    if swapped and tied:
        model.fast_head = BlockedCopy(embedding)
    return swapped
