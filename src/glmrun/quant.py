"""Weight-only INT8 / INT4 quantization of linear layers: pure numeric functions plus a module swap.

The canonical (saved, portable) format of one ``[out, in]`` weight with group size ``g`` is:

* INT8: ``weight_q`` int8 ``[out, in]``, ``weight_scale`` and ``weight_zero`` float16 ``[out, in // g]``;
  ``w ~= (q + 128) * scale + zero``: the codes span the group's own ``[min, max]`` on 256 levels.
  Folders saved before zeros existed (``int8_zero: false`` in their config) are symmetric: no
  ``weight_zero``, codes in ``[-127, 127]``, ``w ~= q * scale``.
* INT4, asymmetric: ``weight_q`` uint8 ``[out, in // 2]`` holding two 4-bit codes ``0..15`` per byte,
  ``weight_scale`` and ``weight_zero`` float16 ``[out, in // g]``; ``w ~= q * scale + zero``.
  Nibble order: input column ``2j`` sits in the LOW nibble of byte ``j`` and column ``2j + 1`` in the
  HIGH nibble (``byte = q[2j] | q[2j + 1] << 4``), the order of a little-endian bit stream. In memory, a
  float16 INT4 layer on CUDA holds the same bytes permuted inside each group (``QuantLinear.tiled``,
  :func:`glmrun.quant_kernels.tile_int4`: the one-row kernel's order); ``state_dict()`` gives them back in
  this order, so saved folders never see the other.

Why these choices:

* INT4 and INT8 are asymmetric (``zero`` is the group's minimum) because a symmetric grid wastes up
  to half its levels on the side of zero a group does not reach; the extra float16 per group costs 2
  bytes per 128 weights (3% of the INT4 bytes, 1.6% of INT8's) and the fused kernel folds it into
  one multiply-add per group (``sum(x * (q*s + z)) = s * sum(x*q) + z * sum(x)``). INT8 needs it
  too: weights that already sit on a coarser grid -- a GGUF file's Q4_1/Q8_0 blocks of 32 -- land
  exactly on an asymmetric 32-wide grid (15 steps of Q4_1 are 255 of ours), while a symmetric one
  moves them (SmolLM2: 98.2% top-1 agreement symmetric at group 32, 99.8% asymmetric).
* Scales and zeros are float16, not float32: half the side-data bytes, which a memory-bound decode
  step reads on every token. They are rounded outward (scale up, zero down) when converted, so every
  weight still lies on the stored grid's range and the round-trip error is at most ``scale / 2`` of
  the *stored* scale. A group of equal values gets scale 0 (INT8 zeros, or an INT4 constant that
  float16 holds exactly) and codes 0, never a division by zero.
* An input width that is not a multiple of the group size is refused (no padding), so the saved
  shapes are the layer's own; the error lists group sizes that fit.

The fused CUDA and the CPU matmul paths live in :mod:`glmrun.quant_kernels`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import ModelConfig, QuantSpec
from .errors import InvalidArgumentError
from .quant_kernels import (
    KernelConfig,
    dequantize_rows,
    quant_matmul,
    tile_int4,
    tiled_int4_fits,
    tiling_pays,
    triton_available,
    triton_config_for,
    triton_quant_matmul,
    untile_int4,
)
from .row_fusion import RowFusion

__all__ = [
    "QuantizedWeight",
    "QuantLinear",
    "quantize_int8",
    "quantize_int4",
    "quantize_weight",
    "dequantize",
    "quantize_model_",
    "quantize_head_",
    "replace_with_empty_quant_linears_",
    "tile_int4_linears_",
    "quantized_state_shapes",
    "quantized_bytes",
    "logit_agreement",
    "fitting_group_size",
    "GGUF_BLOCK",
]

_SCALE_DTYPE = torch.float16
_CHUNK_ELEMENTS = 1 << 22  # rows are quantized in chunks of ~4M weights so temporaries stay small
_TILE_ROWS = 4096  # rows recoded at a time by QuantLinear.tile_ (temporaries of a few tens of MB)


@dataclass(frozen=True)
class QuantizedWeight:
    """One quantized ``[out, in]`` weight in the canonical format described in the module docstring."""

    bits: int
    group_size: int
    shape: tuple[int, int]  # (out_features, in_features) of the float weight
    q: Tensor  # int8 [out, in] (8 bits) or uint8 [out, in // 2] (4 bits, low nibble = even column)
    scale: Tensor  # float16 [out, in // group_size]
    zero: Tensor | None = None  # float16 [out, in // group_size]: the value of the lowest code (None: symmetric)


# -- numeric functions -----------------------------------------------------------------------


def _check_weight(w: Tensor, group_size: int, bits: int) -> tuple[int, int]:
    if w.dim() != 2:
        raise InvalidArgumentError(f"expected a 2-D [out, in] weight, got shape {tuple(w.shape)}")
    if not w.is_floating_point():
        raise InvalidArgumentError(f"expected a floating-point weight, got {w.dtype}")
    if w.is_meta:
        raise InvalidArgumentError("cannot quantize a weight on the meta device: load the real weights first")
    out_features, in_features = w.shape
    _check_group(in_features, group_size, bits)
    return out_features, in_features


def _check_group(in_features: int, group_size: int, bits: int) -> None:
    if group_size <= 0 or (bits == 4 and group_size % 2):
        kind = "positive even" if bits == 4 else "positive"
        raise InvalidArgumentError(f"group_size must be a {kind} number, got {group_size}")
    if in_features % group_size:
        fits = [g for g in (32, 64, 128, 256, 512, 1024) if in_features % g == 0] + [in_features]
        raise InvalidArgumentError(
            f"in_features {in_features} is not a multiple of group_size {group_size}; use a group size that "
            f"divides it, e.g. one of {fits} (the last one is one group per output row)"
        )


GGUF_BLOCK = 32  # ggml's quantized types: blocks of 32 (Q4_0, Q4_1, Q8_0...) or K-quant sub-blocks of 32/16


def fitting_group_size(config: ModelConfig, largest: int = 128) -> int:
    """The largest power of two up to ``largest`` that divides every linear layer's input width.

    ``--quantize int8|int4`` takes 128 for a ChatGLM folder (4096 and 13696 = 128 * 107) and, for a
    GGUF file, its block width (:data:`GGUF_BLOCK`): weights a file stores as Q4_1 or Q8_0 then keep
    their own grid (see the module docstring).
    """
    widths = {config.hidden_size, config.num_attention_heads * config.head_dim, config.ffn_hidden_size}
    group = largest
    while group > 2 and any(w % group for w in widths):
        group //= 2
    return group


def _to_half_outward(x: Tensor, *, up: bool) -> Tensor:
    """float32 -> float16, rounded toward +inf (``up``) or -inf so the stored value bounds ``x``."""
    h = x.to(_SCALE_DTYPE)
    if not torch.isfinite(h).all():
        raise InvalidArgumentError(
            "weight holds NaN/inf or values beyond float16 range (|w| > 65504), which cannot be quantized"
        )
    hf = h.float()
    wrong_side = hf < x if up else hf > x
    target = torch.full_like(h, float("inf") if up else float("-inf"))
    return torch.where(wrong_side, torch.nextafter(h, target), h)


def _row_chunks(out_features: int, in_features: int) -> range:
    return range(0, out_features, max(1, _CHUNK_ELEMENTS // in_features))


def quantize_int8(w: Tensor, group_size: int, *, zero: bool = True) -> QuantizedWeight:
    """Per-group INT8: asymmetric as INT4 (``zero = min`` rounded down, ``scale = (max - zero) / 255``
    rounded up, stored codes ``q = code - 128``), or with ``zero=False`` symmetric (``scale = absmax /
    127``, codes in ``[-127, 127]``, the format of folders saved before zeros existed)."""
    out_features, in_features = _check_weight(w, group_size, 8)
    n_groups = in_features // group_size
    q = torch.empty(out_features, in_features, dtype=torch.int8, device=w.device)
    scale = torch.empty(out_features, n_groups, dtype=_SCALE_DTYPE, device=w.device)
    zeros = torch.empty(out_features, n_groups, dtype=_SCALE_DTYPE, device=w.device) if zero else None
    step = _row_chunks(out_features, in_features).step
    for r0 in range(0, out_features, step):
        g = w[r0 : r0 + step].detach().float().view(-1, n_groups, group_size)  # [r, G, g]
        if zeros is None:
            s = _to_half_outward(g.abs().amax(-1) / 127.0, up=True)  # [r, G]
            codes = torch.round(g * _inverse(s)[..., None]).clamp_(-127, 127)
        else:
            codes, s, z = _asymmetric(g, 255)
            codes.sub_(128)
            zeros[r0 : r0 + step] = z
        q[r0 : r0 + step] = codes.view(-1, in_features).to(torch.int8)
        scale[r0 : r0 + step] = s
    return QuantizedWeight(8, group_size, (out_features, in_features), q, scale, zeros)


def _asymmetric(g: Tensor, top: int) -> tuple[Tensor, Tensor, Tensor]:
    """Codes ``0..top`` (float) over each group's ``[min, max]`` of ``g`` [r, G, g], its scales and zeros
    (float16 [r, G]): ``zero = min`` rounded down, ``scale = (max - zero) / top`` rounded up."""
    z = _to_half_outward(g.amin(-1), up=False)
    zf = z.float()
    s = _to_half_outward((g.amax(-1) - zf) / top, up=True)
    return torch.round((g - zf[..., None]) * _inverse(s)[..., None]).clamp_(0, top), s, z


def _inverse(s: Tensor) -> Tensor:
    """1 / scale in float32, 0 where the scale is 0 (a group of equal values: every code 0)."""
    sf = s.float()
    return torch.where(sf > 0, 1.0 / sf, torch.zeros_like(sf))


def quantize_int4(w: Tensor, group_size: int) -> QuantizedWeight:
    """Asymmetric per-group INT4: ``zero = min`` (rounded down), ``scale = (max - zero) / 15`` (rounded up)."""
    out_features, in_features = _check_weight(w, group_size, 4)
    n_groups = in_features // group_size
    packed = torch.empty(out_features, in_features // 2, dtype=torch.uint8, device=w.device)
    scale = torch.empty(out_features, n_groups, dtype=_SCALE_DTYPE, device=w.device)
    zero = torch.empty(out_features, n_groups, dtype=_SCALE_DTYPE, device=w.device)
    step = _row_chunks(out_features, in_features).step
    for r0 in range(0, out_features, step):
        g = w[r0 : r0 + step].detach().float().view(-1, n_groups, group_size)  # [r, G, g]
        codes, s, z = _asymmetric(g, 15)
        codes = codes.to(torch.uint8).view(-1, in_features // 2, 2)  # [r, in/2, (even, odd)]
        packed[r0 : r0 + step] = codes[..., 0] | (codes[..., 1] << 4)
        scale[r0 : r0 + step] = s
        zero[r0 : r0 + step] = z
    return QuantizedWeight(4, group_size, (out_features, in_features), packed, scale, zero)


def quantize_weight(w: Tensor, spec: QuantSpec) -> QuantizedWeight:
    """Quantize ``w`` as ``spec`` says (8 or 4 bits, its group size)."""
    if spec.bits == 8:
        return quantize_int8(w, spec.group_size, zero=spec.int8_zero)
    return quantize_int4(w, spec.group_size)


def dequantize(q: QuantizedWeight) -> Tensor:
    """The float32 ``[out, in]`` weight that ``q`` stands for."""
    return dequantize_rows(q.q, q.scale, q.zero, q.bits, q.group_size, dtype=torch.float32)


# -- the module --------------------------------------------------------------------------------


def quantized_state_shapes(
    in_features: int, out_features: int, spec: QuantSpec, *, bias: bool, bias_dtype: torch.dtype = torch.float16
) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """State-dict name -> (shape, dtype) of one :class:`QuantLinear`, for loaders that check a saved folder."""
    _check_group(in_features, spec.group_size, spec.bits)
    n_groups = in_features // spec.group_size
    shapes: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
    if spec.bits == 8:
        shapes["weight_q"] = ((out_features, in_features), torch.int8)
    else:
        shapes["weight_q"] = ((out_features, in_features // 2), torch.uint8)
    shapes["weight_scale"] = ((out_features, n_groups), _SCALE_DTYPE)
    if spec.has_zero:
        shapes["weight_zero"] = ((out_features, n_groups), _SCALE_DTYPE)
    if bias:
        shapes["bias"] = ((out_features,), bias_dtype)
    return shapes


def quantized_bytes(in_features: int, out_features: int, spec: QuantSpec) -> int:
    """Exact bytes of one quantized layer's weight codes plus scales (and zeros); the bias is not counted."""
    shapes = quantized_state_shapes(in_features, out_features, spec, bias=False)
    total = 0
    for shape, dtype in shapes.values():
        count = 1
        for dim in shape:
            count *= dim
        total += count * torch.empty((), dtype=dtype).element_size()
    return total


class QuantLinear(nn.Module):
    """A linear layer whose weight is stored quantized; ``forward(x[..., in]) -> [..., out]`` in x's dtype.

    The buffers are the canonical format (see the module docstring), so ``state_dict()`` saves with
    safetensors and loads back on any device. The CUDA path reads them directly with a fused Triton
    kernel when Triton is installed; elsewhere rows are dequantized chunk by chunk. :meth:`tile_` puts a
    CUDA INT4 layer's codes in the one-row kernel's order (``tiled``); ``state_dict()`` still gives the
    canonical order, and a state loaded into a tiled layer is tiled again.
    """

    weight_q: Tensor
    weight_scale: Tensor
    weight_zero: Tensor | None
    bias: Tensor | None
    adds_residual = True  # forward(x, residual) adds it (in the GEMV kernel on CUDA): glmrun.model.linear
    tiled = False  # weight_q holds INT4 codes in quant_kernels.tile_int4's order

    def __init__(
        self,
        in_features: int,
        out_features: int,
        spec: QuantSpec,
        *,
        bias: bool = False,
        bias_dtype: torch.dtype = torch.float16,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.spec = spec
        shapes = quantized_state_shapes(in_features, out_features, spec, bias=bias, bias_dtype=bias_dtype)
        for name in ("weight_q", "weight_scale", "weight_zero", "bias"):
            if name in shapes:
                shape, dtype = shapes[name]
                self.register_buffer(name, torch.zeros(shape, dtype=dtype, device=device))
            else:
                self.register_buffer(name, None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, spec: QuantSpec) -> QuantLinear:
        """Quantize ``linear``'s weight on its own device (tiled: float16 INT4 on CUDA); the bias is kept as it is."""
        weight = linear.weight
        has_bias = linear.bias is not None
        bias_dtype = linear.bias.dtype if linear.bias is not None else weight.dtype
        module = cls(linear.in_features, linear.out_features, spec, bias=has_bias, bias_dtype=bias_dtype, device="meta")
        qw = quantize_weight(weight, spec)
        module.weight_q = qw.q
        module.weight_scale = qw.scale
        module.weight_zero = qw.zero
        module.bias = linear.bias.detach().clone() if linear.bias is not None else None
        if module.tiling_pays_on(weight.dtype):
            module.tile_()  # a float16 layer on CUDA runs the tiled one-row kernel
        return module

    def quantized_weight(self) -> QuantizedWeight:
        """The weight in the canonical format (a canonical copy of the codes when they are tiled)."""
        return QuantizedWeight(
            self.spec.bits,
            self.spec.group_size,
            (self.out_features, self.in_features),
            self._canonical_codes(),
            self.weight_scale,
            self.weight_zero,
        )

    def can_tile(self) -> bool:
        """Whether :meth:`tile_` applies: INT4 codes whose group size tile_int4 takes (any device; only the CUDA
        one-row kernel gains from it, other paths read tiled codes at the cost of reordering them)."""
        return self.spec.bits == 4 and tiled_int4_fits(self.spec.group_size, self.in_features)

    def tiling_pays_on(self, dtype: torch.dtype) -> bool:
        """Whether tiling makes this layer's one-row product faster when the model runs in ``dtype``: float16 on CUDA
        with Triton (the tiled kernel's arithmetic) and a shape where it was faster (quant_kernels.tiling_pays)."""
        return (
            dtype == torch.float16
            and self.weight_q.is_cuda
            and triton_available()
            and self.can_tile()
            and tiling_pays(self.out_features, self.in_features)
        )

    @torch.no_grad()
    def tile_(self) -> QuantLinear:
        """Put the INT4 codes in the one-row kernel's order, in place (a few thousand rows at a time)."""
        if self.tiled:
            return self
        if not self.can_tile():
            raise ValueError(f"cannot tile this layer: {self.extra_repr()}")
        self._recode_(tile_int4)
        self.tiled = True
        return self

    @torch.no_grad()
    def untile_(self) -> QuantLinear:
        """Put tiled codes back in the canonical order, in place (before saving a large model: no second copy)."""
        if self.tiled:
            self._recode_(untile_int4)
            self.tiled = False
        return self

    def _recode_(self, fn: Callable[[Tensor, int], Tensor]) -> None:
        q = self.weight_q
        for r0 in range(0, q.shape[0], _TILE_ROWS):
            q[r0 : r0 + _TILE_ROWS] = fn(q[r0 : r0 + _TILE_ROWS], self.spec.group_size)

    def _canonical_codes(self) -> Tensor:
        return untile_int4(self.weight_q, self.spec.group_size) if self.tiled else self.weight_q

    def _save_to_state_dict(self, destination, prefix, keep_vars):  # type: ignore[no-untyped-def]
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.tiled:  # saved folders (and any other reader of the state) get the canonical order
            destination[prefix + "weight_q"] = self._canonical_codes()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[no-untyped-def]
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if self.tiled:  # the state holds canonical codes
            self.tiled = False
            self.tile_()

    def forward(self, x: Tensor, residual: Tensor | None = None) -> Tensor:
        """``x @ W.T + bias``, plus ``residual`` (``[..., out]``) when given (fused into the kernel on CUDA)."""
        if x.shape[-1] != self.in_features:
            raise InvalidArgumentError(f"expected input [..., {self.in_features}], got {tuple(x.shape)}")
        x2d = x.reshape(-1, self.in_features)  # [M, in]
        res = residual.reshape(-1, self.out_features) if residual is not None else None
        y = quant_matmul(
            x2d,
            self.weight_q,
            self.weight_scale,
            self.weight_zero,
            self.spec.bits,
            self.spec.group_size,
            self.bias,
            res,
            tiled=self.tiled,
        )  # [M, out]
        return y.view(*x.shape[:-1], self.out_features)

    def _row_config(self) -> KernelConfig | None:
        k, group = self.in_features, self.spec.group_size
        return triton_config_for(1, self.out_features, k, group, self.spec.bits, tiled=self.tiled)

    def row_fusable(self, x: Tensor) -> bool:
        """Whether :meth:`row_product` serves ``x`` (one row on CUDA, float16/bfloat16, the one-row kernel)."""
        if not (triton_available() and x.is_cuda and x.dtype in (torch.float16, torch.bfloat16)):
            return False
        config = self._row_config()
        return config is not None and config.kind == "gemv" and config.split_k == 1

    def row_product(self, x: Tensor, residual: Tensor | None, fusion: RowFusion) -> Tensor:
        """One row's product with :mod:`glmrun.row_fusion`'s norms or SwiGLU in the kernel (see row_fusable)."""
        config = self._row_config()
        if config is None:
            raise ValueError(f"no one-row kernel for {self.out_features} x {self.in_features}")
        res = residual.reshape(1, -1) if residual is not None else None
        bits, group = self.spec.bits, self.spec.group_size
        q, s, z = self.weight_q, self.weight_scale, self.weight_zero
        y = triton_quant_matmul(
            x.reshape(1, -1), q, s, z, bits, group, config, self.bias, res, fusion, tiled=self.tiled
        )
        return y.view(*x.shape[:-1], y.shape[-1])

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits={self.spec.bits}, "
            f"group_size={self.spec.group_size}, bias={self.bias is not None}" + (", tiled" if self.tiled else "")
        )


# -- swapping layers in a model ----------------------------------------------------------------


def _linears(model: nn.Module, skip: Callable[[str], bool] | None) -> list[tuple[str, nn.Linear]]:
    return [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and not (skip is not None and skip(name))
    ]


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def _check_group_fits(found: list[tuple[str, nn.Linear]], spec: QuantSpec) -> None:
    for name, linear in found:
        try:
            _check_group(linear.in_features, spec.group_size, spec.bits)
        except InvalidArgumentError as exc:
            raise InvalidArgumentError(f"layer {name!r}: {exc}") from None


def quantize_model_(model: nn.Module, spec: QuantSpec, *, skip: Callable[[str], bool] | None = None) -> int:
    """Replace every ``nn.Linear`` of ``model`` (except those ``skip(name)`` selects) by a :class:`QuantLinear`.

    Layers are quantized one at a time on their own device and the float layer is dropped right after,
    so the extra memory is about one layer. A layer whose weight is on the meta device (a model built
    for loading) becomes an empty :class:`QuantLinear` on meta, to be filled by
    ``load_state_dict(..., assign=True)`` from a saved quantized folder. Every layer's shape is checked
    before the first swap, so a group size that does not fit leaves the model untouched. Returns the
    number of layers swapped.
    """
    found = _linears(model, skip)
    _check_group_fits(found, spec)
    for name, linear in found:
        if linear.weight.is_meta:
            _set_submodule(model, name, _empty_like(linear, spec, "meta"))
        else:
            _set_submodule(model, name, QuantLinear.from_linear(linear, spec))
        del linear  # the model no longer references it; its weight is freed unless shared elsewhere
    return len(found)


def tile_int4_linears_(model: nn.Module, dtype: torch.dtype) -> int:
    """Tile (:meth:`QuantLinear.tile_`) every layer of ``model`` that gains from it running in ``dtype``
    (:meth:`QuantLinear.tiling_pays_on`): a saved folder's layers, which :meth:`QuantLinear.from_linear` did not make.
    Returns the count tiled."""
    layers = [m for m in model.modules() if isinstance(m, QuantLinear) and not m.tiled and m.tiling_pays_on(dtype)]
    for layer in layers:
        layer.tile_()
    return len(layers)


def quantize_head_(model: nn.Module, spec: QuantSpec) -> int:
    """Quantize the separate output layer (``transformer.output_layer``) as ``spec.head_spec()`` says.

    Returns 1 if it was swapped, 0 when there is none (tied embeddings) or the spec keeps it float.
    Works on a meta model too (empty modules, filled by the loader).
    """
    head = spec.head_spec()
    if head is None:
        return 0
    return quantize_model_(model, head, skip=lambda name: name != "transformer.output_layer")


def _empty_like(linear: nn.Linear, spec: QuantSpec, device: torch.device | str) -> QuantLinear:
    bias_dtype = linear.bias.dtype if linear.bias is not None else linear.weight.dtype
    return QuantLinear(
        linear.in_features,
        linear.out_features,
        spec,
        bias=linear.bias is not None,
        bias_dtype=bias_dtype,
        device=device,
    )


def replace_with_empty_quant_linears_(
    model: nn.Module,
    spec: QuantSpec,
    *,
    skip: Callable[[str], bool] | None = None,
    device: torch.device | str = "meta",
) -> int:
    """Swap ``nn.Linear`` layers for empty :class:`QuantLinear` ones (on ``device``, meta by default).

    For loading a saved quantized folder: build the float model on the meta device, call this with
    the spec and skip rule recorded at save time, then ``load_state_dict(tensors, assign=True)``.
    Returns the number of layers swapped.
    """
    found = _linears(model, skip)
    _check_group_fits(found, spec)
    for name, linear in found:
        _set_submodule(model, name, _empty_like(linear, spec, device))
    return len(found)


# -- quality -----------------------------------------------------------------------------------


def logit_agreement(ref_logits: Tensor, test_logits: Tensor) -> dict[str, float]:
    """Compare two models' logits ``[..., vocab]`` position by position.

    Returns ``top1`` (fraction of positions whose argmax agrees) and ``kl``: the mean over positions
    of ``KL(softmax(ref) || softmax(test))`` in nats, computed in float64.
    """
    if ref_logits.shape != test_logits.shape:
        raise InvalidArgumentError(f"logit shapes differ: {tuple(ref_logits.shape)} vs {tuple(test_logits.shape)}")
    if ref_logits.dim() == 0 or ref_logits.numel() == 0:
        raise InvalidArgumentError("logit_agreement needs at least one position of logits [..., vocab]")
    vocab = ref_logits.shape[-1]
    ref = ref_logits.detach().reshape(-1, vocab).to(torch.float64)
    test = test_logits.detach().reshape(-1, vocab).to(ref.device, torch.float64)
    top1 = (ref.argmax(-1) == test.argmax(-1)).double().mean().item()
    ref_logp = F.log_softmax(ref, dim=-1)
    test_logp = F.log_softmax(test, dim=-1)
    ref_p = ref_logp.exp()
    # 0 * log(0 / q) is 0: positions the reference masks out (-inf logits) add nothing.
    terms = torch.where(ref_p > 0, ref_p * (ref_logp - test_logp), torch.zeros_like(ref_p))
    kl = terms.sum(-1).mean().item()
    return {"top1": top1, "kl": kl}
