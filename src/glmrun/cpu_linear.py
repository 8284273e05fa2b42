"""Faster copies of CPU matrices: oneDNN-blocked float32, fbgemm float16, int4 packs of a file's 4-bit blocks.

torch's CPU ``F.linear`` goes to the BLAS, which re-packs the whole weight matrix on every call: with a
few rows (batched decode steps of the server, prompt chunks) that packing, not arithmetic, is most of
the time (:class:`BlockedCopy`). Measured on this project's 2-core AMD EPYC machines, one thread, the
SmolLM2-135M matrices: 8 rows 180 ms dense vs 112 ms blocked, 2 rows 92 vs 64 ms, 64 rows 610 vs 511 ms.
One row is faster dense (51 vs 58 ms), so single-row calls keep using the original matrix and both
copies are kept.

That doubles the memory of the matrices, so :func:`pack_cpu_linears_` only packs when the copies take
under a quarter of the memory available now (the 135M default model: +0.5 GB; a 6B model in float32:
not packed). The numbers differ from the dense path in the last bits (~1e-5 relative), as BLAS
results already do between different row counts.

``dtype="float16"`` (the x86 default) keeps float16 matrices that fbgemm multiplies in float32
(:class:`HalfPacked`). A GGUF file's Q4_0/Q4_1 layer matrices also get an :class:`Int4Weight`: the
file's 4-bit codes packed for torch's CPU int4 kernel, which the one-row decoder
(:mod:`glmrun.cpu_decode`) uses. SmolLM2-135M's 120 layer products, each matrix read once as in a
decode step, 2 threads: one row 15.6 ms int4 vs 22.8 ms fbgemm float16; the int4 kernel's arithmetic
grows with the rows (2 rows 19.7 vs 23.5, 4 rows 31.3 vs 28.5, 64 rows 470 vs 282 ms), so prompt
chunks and batched steps keep the float16 copies.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "BlockedCopy",
    "HalfPacked",
    "HalfWeightLinear",
    "Int4Weight",
    "PackedLinear",
    "attach_int4_",
    "blocked_supported",
    "half_weights_supported",
    "half_weights_",
    "half_weights_for",
    "half_weights_model_",
    "int4_supported",
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


def int4_supported() -> bool:
    """torch's CPU int4 product (``_weight_int4pack_mm_for_cpu``: bfloat16 activations, int4 weights)."""
    aten = torch.ops.aten
    return hasattr(aten, "_weight_int4pack_mm_for_cpu") and hasattr(aten, "_convert_weight_to_int4pack_for_cpu")


_INT4_GROUPS = (32, 64, 128, 256)  # group sizes the CPU int4 kernel accepts


class Int4Weight:
    """A matrix on a 4-bit grid per group of columns (a GGUF file's Q4_0/Q4_1 blocks, see
    :class:`glmrun.gguf_file.Q4Blocks`) packed for torch's CPU int4 product.

    ``w = codes * scale + low`` becomes the kernel's ``(codes - 8) * scale + zero`` with
    ``zero = low + 8 * scale``; the kernel wants scale and zero in bfloat16, so each weight moves by at
    most ``(8 |scale| + |zero|) * 2**-8`` (half a bfloat16 step of each; ``zero`` is small where
    ``low ~ -8 scale``, as in a block centred on zero). The codes themselves are kept as the file has
    them. Products take bfloat16 rows and return bfloat16 (:meth:`linear` casts around them); the
    kernel is only fast for bfloat16 activations (float32 ones take a slow fallback, ~20x).

    It stands for one module's matrix: :meth:`follows` says whether that matrix is still the one it was
    made with (replaced or changed in place, it is not, and the caller takes the matrix's own product).
    """

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, low: torch.Tensor, weight: torch.Tensor) -> None:
        out, cols = codes.shape
        groups = scale.shape[1]
        if scale.shape != low.shape or scale.shape[0] != out or cols % groups or cols // groups not in _INT4_GROUPS:
            raise ValueError(
                f"codes {tuple(codes.shape)} need scale and low [out, in / group], group in {_INT4_GROUPS}"
            )
        if out % 16:
            raise ValueError(f"the int4 kernel packs rows by 16: {out} rows")
        self.group = cols // groups
        self.shape = (out, cols)
        self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 1)
        zero = low.float() + 8.0 * scale.float()
        self.scale_zero = torch.stack((scale.t(), zero.t()), dim=-1).to(torch.bfloat16).contiguous()  # [groups, out, 2]
        self._key = _key_of(weight)

    @staticmethod
    def fits(out_features: int, in_features: int, group: int) -> bool:
        """Whether the kernel takes a matrix of this shape and group size."""
        return out_features % 16 == 0 and group in _INT4_GROUPS and in_features % group == 0

    def kernel_args(self) -> tuple[torch.Tensor, int, torch.Tensor]:
        """``(packed, group, scale_zero)``: what ``_weight_int4pack_mm_for_cpu`` takes after the rows."""
        return self.packed, self.group, self.scale_zero

    def follows(self, weight: torch.Tensor) -> bool:
        """Whether ``weight`` is still the matrix this pack was made for."""
        return _key_of(weight) == self._key

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        """``x [..., in]`` (rounded to bfloat16) times the matrix, ``[..., out]`` in ``x``'s dtype."""
        rows = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(rows, *self.kernel_args())
        return out.view(*x.shape[:-1], out.shape[-1]).to(x.dtype)


def attach_int4_(model: nn.Module, matrices: Iterable[tuple[str, Any]]) -> int:
    """Give each linear layer named in ``matrices`` (``(weight name, blocks)``, blocks with ``codes``,
    ``scale`` and ``low`` as :class:`glmrun.gguf_file.Q4Blocks` has them) an :class:`Int4Weight` as its
    ``int4`` attribute (a plain attribute: not saved, not moved); the count attached. Matrices of a
    shape the kernel does not take, and layers with a bias, are skipped; nothing is attached without the kernel."""
    if not int4_supported():
        return 0
    count = 0
    for name, blocks in matrices:
        module = model.get_submodule(name.removesuffix(".weight"))
        weight = module.weight
        out, cols = blocks.codes.shape
        group = cols // blocks.scale.shape[1]
        if weight.device.type != "cpu" or tuple(weight.shape) != (out, cols) or not Int4Weight.fits(out, cols, group):
            continue
        if getattr(module, "bias", None) is not None:  # GGUF Llama layers have none; the kernel adds none
            continue
        # a plain attribute (Module.__setattr__'s annotation admits only tensors and modules)
        setattr(module, "int4", Int4Weight(blocks.codes, blocks.scale, blocks.low, weight))  # noqa: B010
        count += 1
    return count


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


def half_weights_model_(model: Any, head: HalfPacked | None = None) -> int:
    """:func:`half_weights_` on a ChatGLMForCausalLM, plus a float16 copy of a tied output matrix (the
    embedding table itself stays float32 for the lookups): ``head`` if the caller made it already."""
    swapped = half_weights_(model)
    if model.config.tie_word_embeddings:
        model.fast_head = head or HalfPacked(model.transformer.embedding.word_embeddings.weight)
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
