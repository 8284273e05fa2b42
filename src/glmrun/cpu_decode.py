"""The CPU decode fast path: one token of one sequence through the model with as few torch calls as possible.

On a small model the CPU spends much of a decode step dispatching tiny torch operations from Python:
module calls, reshapes, float casts, a rotary of a dozen ops, a cache write by advanced indexing. With
one row and one new token every shape is known, so this path runs the model's math in about 26 torch
calls a layer, none of them a module call, on rows and views allocated once:

- the rotary is one complex multiplication per step for all query heads and one for the key heads,
  whose result lands in the cache (a head's interleaved pairs viewed as complex numbers, times
  ``cos + i sin``: ``x0*cos - x1*sin`` as in :func:`glmrun.kernels.rotary`); the softmax scale is
  folded into the queries' factor;
- RMSNorm takes its sum of squares as one dot product and writes ``scale * x * weight`` in one call,
  straight in the dtype its product reads;
- attention is two batched products and a softmax over strided views of the cache (no mask: every
  cached key is visible), values written by one ``index_copy_``;
- the weights' fast copies are called directly: a GGUF file's Q4_0/Q4_1 matrices through torch's CPU
  int4 kernel on the file's own 4-bit codes (:class:`glmrun.cpu_linear.Int4Weight`), anything else
  through fbgemm's float16 copies or the float32 matrix.

The int4 kernel is fast only with bfloat16 rows, so a row is rounded to bfloat16 where a product reads
it, and the kernel's output is bfloat16 (llama.cpp similarly rounds rows to 8 bits for its Q4_1 dot
products); everything between the products -- norms, rotary, attention, residual stream, SwiGLU,
the output layer -- stays float32. Against the float32 model, SmolLM2-135M's next-token top-1 agreement
over 3,000 positions of text is 99.2% (mean KL 3e-4; with the float16 products 99.9%, KL 4e-6),
``benchmarks/results/cpu_decode_quality.json``; ``int4=False`` (``Engine.use_cpu_int4``) keeps the
float32-arithmetic products.

Like :class:`~glmrun.fastpath.GraphDecoder` on CUDA it is bound to one :class:`~glmrun.cache.KVCache`
and used by the engine (and the benchmark) for batch-1 decode steps; the model's own ``forward`` stays
the reference and serves everything else (prompt chunks: fbgemm's float16 products are faster than the
int4 kernel from 4 rows on, see :mod:`glmrun.cpu_linear`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from .cache import KVCache
from .cpu_linear import HalfPacked, HalfWeightLinear, Int4Weight, PackedLinear
from .model import ChatGLMForCausalLM, rotary_tables

__all__ = ["CpuDecoder", "cpu_decoder_supported"]

Product = Callable[[torch.Tensor], torch.Tensor]  # [1, in] of its input dtype -> [1, out], float32 or bfloat16


def cpu_decoder_supported(model: ChatGLMForCausalLM) -> bool:
    """Every layer and the output on the CPU, float32 arithmetic (the CPU's float16 is float32 arithmetic)."""
    on_cpu = all(d.type == "cpu" for d in model.layer_devices()) and model.output_device().type == "cpu"
    return on_cpu and model.compute_dtype == torch.float32


def _half_product(fast: HalfPacked, owner: nn.Module) -> Product:
    """fbgemm's product with the packed float16 copy of ``owner.weight`` (and bias, if it has one)."""
    op = torch.ops.quantized.linear_dynamic_fp16.default

    def product(x: torch.Tensor) -> torch.Tensor:
        # _current repacks if the matrix was changed in place or replaced, as the module itself would.
        return op(x, fast._current(cast(torch.Tensor, owner.weight), getattr(owner, "bias", None)))

    return product


def _int4_product(pack: Int4Weight) -> Product:
    """torch's int4 kernel on the file's 4-bit codes: a bfloat16 row in, a bfloat16 row out."""
    op, packed, group, scale_zero = torch.ops.aten._weight_int4pack_mm_for_cpu.default, *pack.kernel_args()

    def product(x: torch.Tensor) -> torch.Tensor:
        return op(x, packed, group, scale_zero)

    return product


def _product(linear: nn.Module, int4: bool) -> tuple[Product, torch.dtype]:
    """The cheapest call that computes ``linear(x)`` for one row, and the dtype that row must have."""
    pack = getattr(linear, "int4", None)
    if int4 and isinstance(pack, Int4Weight) and pack.follows(cast(torch.Tensor, linear.weight)):
        return _int4_product(pack), torch.bfloat16
    if isinstance(linear, HalfWeightLinear) and isinstance(linear.fast, HalfPacked):
        return _half_product(linear.fast, linear), torch.float32
    if type(linear) in (nn.Linear, PackedLinear):  # one row: the dense product (see cpu_linear.BlockedCopy)
        lin = cast(nn.Linear, linear)

        def dense(x: torch.Tensor) -> torch.Tensor:
            return F.linear(x, lin.weight, lin.bias)

        return dense, torch.float32
    return linear, torch.float32  # anything else (quantized layers) through its own forward


class _Layer:
    """One block's parameters, products and the rows its products read, looked up once."""

    def __init__(self, model: ChatGLMForCausalLM, index: int, int4: bool) -> None:
        block = model.blocks()[index]
        attn, mlp = block.self_attention, block.mlp
        c = model.config
        self.norm1 = block.input_layernorm.weight
        self.norm2 = block.post_attention_layernorm.weight
        modules = (attn.query_key_value, attn.dense, mlp.dense_h_to_4h, mlp.dense_4h_to_h)
        self.qkv, qkv_in = _product(modules[0], int4)
        self.dense, dense_in = _product(modules[1], int4)
        self.up, up_in = _product(modules[2], int4)
        self.down, down_in = _product(modules[3], int4)
        # Each product's input row, written in its dtype by the norm / cast before it (bfloat16 for int4).
        n, hd = c.hidden_size, c.num_attention_heads * c.head_dim
        self.qkv_in, self.up_in = torch.empty(1, n, dtype=qkv_in), torch.empty(1, n, dtype=up_in)
        self.dense_in = None if dense_in == torch.float32 else torch.empty(1, hd, dtype=dense_in)
        self.down_in = torch.empty(1, c.ffn_hidden_size, dtype=down_in)
        # What the int4 products stand for: (the module's parameters, its matrix, the matrix's version then).
        self.int4_matrices = [
            (m._parameters, w, w._version)
            for m, dtype in zip(modules, (qkv_in, dense_in, up_in, down_in), strict=True)
            if dtype == torch.bfloat16
            for w in (cast(torch.Tensor, m.weight),)
        ]


class CpuDecoder:
    """Decode steps of a one-row cache, one token at a time, on the CPU (see the module docstring).

    ``int4``: multiply by the int4 packs the layers carry (:func:`glmrun.cpu_linear.attach_int4_`, a
    GGUF file's Q4_0/Q4_1 matrices) with bfloat16 rows; False keeps every product in float32 arithmetic.
    """

    def __init__(self, model: ChatGLMForCausalLM, cache: KVCache, *, int4: bool = True) -> None:
        c = model.config
        self.model = model
        self.cache = cache
        self.int4 = int4
        self.heads, self.kv_heads, self.head_dim = c.num_attention_heads, c.num_kv_heads, c.head_dim
        self.hidden, self.ffn = c.hidden_size, c.ffn_hidden_size
        self.eps = c.layernorm_epsilon
        if cache.rows != 1 or cache.dtype != torch.float32:
            raise ValueError(f"the CPU decoder needs a one-row float32 cache, got {cache.rows} rows of {cache.dtype}")
        if not all(t.is_contiguous() and t.storage_offset() == 0 for t in (*cache.k, *cache.v)):
            raise ValueError("the CPU decoder reads the cache through strided views: it needs KVCache's own buffers")
        self.layers = [_Layer(model, i, int4) for i in range(c.num_layers)]
        self._int4_matrices = [m for layer in self.layers for m in layer.int4_matrices]
        self.final_norm = model.transformer.encoder.final_layernorm
        self.embedding = model.transformer.embedding.word_embeddings
        # Rows every layer reuses, and views of them made once (a view costs a dispatch per call). A head's
        # interleaved pairs (x[2i], x[2i+1]) are the complex numbers x[2i] + i x[2i+1] of a complex view.
        H, K, D = self.heads, self.kv_heads, self.head_dim
        self._pass = torch.ones(D // 2 - c.rotary_dim // 2, dtype=torch.complex64)  # pairs that do not rotate
        self._qkv = torch.empty(H + 2 * K, D)  # float32 q, k, v heads of one layer
        self._qkv_row = self._qkv.view(1, -1)
        q, k, v = self._qkv.split((H, K, K))
        self._q, self._k = _pairs(q), _pairs(k)  # [H, D/2], [K, D/2] complex
        self._v = v.view(1, K, 1, D)
        self._q_rot = torch.empty(K, H // K, D)  # the g query heads that share a key/value head, rotated
        self._q_rot_pairs = _pairs(self._q_rot.view(H, D))
        self._attn = torch.empty(K, H // K, D)
        self._attn_row = self._attn.view(1, H * D)
        self._h = torch.empty(2, c.ffn_hidden_size)  # gate and up rows of the MLP
        self._h_row = self._h.view(1, -1)
        self._gate, self._up = self._h[0:1], self._h[1:2]  # [1, ffn] each
        self._zero = torch.zeros(1)
        # The cache of each layer: keys as complex pairs [K, max_len, D/2], keys and values [K, max_len, D].
        self._kv = [(_pairs(k[0]), k[0], v) for k, v in zip(cache.k, cache.v, strict=True)]

    def rotary(self, positions: torch.Tensor) -> torch.Tensor:
        """``[D/2]`` complex64 ``cos + i sin`` of each pair at ``positions`` [1, 1] (1 for pairs past
        rotary_dim): a head viewed as complex pairs, times this, is the interleaved-pair rotary of
        :func:`glmrun.kernels.rotary` (``x0 c - x1 s``, ``x1 c + x0 s``)."""
        cos, sin = rotary_tables(self.model.config, positions)  # [1, 1, rd/2], the model's own tables
        turn = torch.complex(cos.view(-1), sin.view(-1))
        return turn if not len(self._pass) else torch.cat((turn, self._pass))

    def _follow(self) -> None:
        """Choose a layer's products again where a matrix with an int4 product was replaced or changed in
        place since (the pack no longer stands for it; fbgemm's copies follow their matrices by themselves)."""
        if all(params["weight"] is w and w._version == v for params, w, v in self._int4_matrices):
            return
        for i, layer in enumerate(self.layers):
            if not all(params["weight"] is w and w._version == v for params, w, v in layer.int4_matrices):
                self.layers[i] = _Layer(self.model, i, self.int4)
        self._int4_matrices = [m for layer in self.layers for m in layer.int4_matrices]

    def step(self, tokens: torch.Tensor, positions: torch.Tensor, length: int) -> torch.Tensor:
        """Logits [1, V] (float32) for ``tokens``/``positions`` [1, 1]; ``length`` = position + 1."""
        self._follow()
        K, D, eps, n = self.kv_heads, self.head_dim, self.eps, self.hidden
        L, pos, stride = length, length - 1, self.cache.max_len * D
        turn = self.rotary(positions)
        turn_q = turn * D**-0.5  # the softmax scale folded into the queries' rotation
        where = positions.view(1)
        q, k, v, q_rot, q_rot_pairs, attn, attn_row = (
            self._q,
            self._k,
            self._v,
            self._q_rot,
            self._q_rot_pairs,
            self._attn,
            self._attn_row,
        )
        qkv_row, h_row, gate, up, zero = self._qkv_row, self._h_row, self._gate, self._up, self._zero
        x = F.embedding(tokens.view(1), self.embedding.weight)  # [1, hidden], updated in place below
        x1 = x.view(n)
        for layer, (kp, kc, vc) in zip(self.layers, self._kv, strict=True):
            qkv_row.copy_(layer.qkv(_rms_norm(x, x1, layer.norm1, eps, n, zero, layer.qkv_in)))
            torch.mul(q, turn_q, out=q_rot_pairs)
            torch.mul(k, turn, out=kp.as_strided((K, D // 2), (stride // 2, 1), pos * D // 2))  # into the cache
            vc.index_copy_(2, where, v)
            # keys 0..L-1 as [K, D, L] and values as [K, L, D], straight from the cache
            probs = torch.softmax(torch.bmm(q_rot, kc.as_strided((K, D, L), (stride, 1, D))), -1)  # [K, g, L]
            torch.bmm(probs, vc.as_strided((K, L, D), (stride, D, 1)), out=attn)
            dense_in = attn_row if layer.dense_in is None else layer.dense_in.copy_(attn_row)
            x.add_(layer.dense(dense_in))
            h_row.copy_(layer.up(_rms_norm(x, x1, layer.norm2, eps, n, zero, layer.up_in)))
            x.add_(layer.down(torch.mul(F.silu(gate, inplace=True), up, out=layer.down_in)))
        return self.model.project(_rms_norm(x, x1, self.final_norm.weight, eps, n, zero, None))  # [1, V] float32


def _pairs(t: torch.Tensor) -> torch.Tensor:
    """A view of float32 ``[..., D]`` as complex64 ``[..., D/2]``: element i is ``t[2i] + i t[2i+1]``."""
    return torch.view_as_complex(t.unflatten(-1, (-1, 2)))


def _rms_norm(
    x: torch.Tensor,
    x1: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    n: int,
    zero: torch.Tensor,
    out: torch.Tensor | None,
) -> torch.Tensor:
    """RMSNorm of one float32 row [1, n], written into ``out`` (its dtype: the product's input) when given.

    The sum of squares comes to Python as a float, which saves the four dispatches of a reduction, a
    division, an addition and a reciprocal square root on 0-d tensors; ``0 + scale * x * weight`` is one
    call, computed in float32 and rounded once to ``out``'s dtype."""
    scale = 1.0 / math.sqrt(torch.dot(x1, x1).item() / n + eps)
    if out is None:
        return torch.mul(x, scale).mul_(weight)
    return torch.addcmul(zero, x, weight, value=scale, out=out)
