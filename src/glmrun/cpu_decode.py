"""The CPU decode fast path: one token of one sequence through the model with as few torch calls as possible.

On a small model the CPU spends a decode step less on arithmetic than on dispatching ~600 tiny torch
operations from Python: module calls, reshapes, float casts, a rotary of a dozen ops, a cache write by
advanced indexing. With one row and one new token every shape is known, so this path runs the same math
as :class:`~glmrun.model.ChatGLMForCausalLM` in about 30 torch calls a layer, none of them a module call:

- the rotary for this position is one ``[head_dim, head_dim]`` rotation matrix built once per step and
  applied to all query and key heads by one product (each output is ``x0*cos - x1*sin`` as in
  :func:`glmrun.kernels.rotary`, give or take the last bit from the fused multiply-add);
- RMSNorm takes its sum of squares as one dot product (torch's ``rms_norm`` is a dozen operations on the
  CPU, and 0-d tensor arithmetic costs a dispatch per step);
- keys/values are written by a plain slice copy and read as views (no mask: every cached key is visible);
- the weights' fast copies (fbgemm float16, see :mod:`glmrun.cpu_linear`) are called directly.

Like :class:`~glmrun.fastpath.GraphDecoder` on CUDA it is bound to one :class:`~glmrun.cache.KVCache`
and used by the engine (and the benchmark) for batch-1 decode steps; the model's own ``forward`` stays
the reference and serves everything else.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from .cache import KVCache
from .cpu_linear import HalfPacked, HalfWeightLinear, PackedLinear
from .model import ChatGLMForCausalLM, rotary_tables

__all__ = ["CpuDecoder", "cpu_decoder_supported"]

Product = Callable[[torch.Tensor], torch.Tensor]  # [1, in] -> [1, out]


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


def _product(linear: nn.Module) -> Product:
    """The cheapest call that computes ``linear(x)`` for one float32 row."""
    if isinstance(linear, HalfWeightLinear) and isinstance(linear.fast, HalfPacked):
        return _half_product(linear.fast, linear)
    if type(linear) in (nn.Linear, PackedLinear):  # one row: the dense product (see cpu_linear.BlockedCopy)
        lin = cast(nn.Linear, linear)

        def dense(x: torch.Tensor) -> torch.Tensor:
            return F.linear(x, lin.weight, lin.bias)

        return dense
    return linear  # anything else (quantized layers) through its own forward


class _Layer:
    """One block's parameters and products, looked up once."""

    def __init__(self, model: ChatGLMForCausalLM, index: int) -> None:
        block = model.blocks()[index]
        attn = block.self_attention
        self.norm1 = block.input_layernorm
        self.norm2 = block.post_attention_layernorm
        self.qkv = _product(attn.query_key_value)
        self.dense = _product(attn.dense)
        self.up = _product(block.mlp.dense_h_to_4h)
        self.down = _product(block.mlp.dense_4h_to_h)


class CpuDecoder:
    """Decode steps of a one-row cache, one token at a time, on the CPU (see the module docstring)."""

    def __init__(self, model: ChatGLMForCausalLM, cache: KVCache) -> None:
        c = model.config
        self.model = model
        self.cache = cache
        self.heads, self.kv_heads, self.head_dim = c.num_attention_heads, c.num_kv_heads, c.head_dim
        self.hidden, self.ffn = c.hidden_size, c.ffn_hidden_size
        self.eps = c.layernorm_epsilon
        if cache.rows != 1 or cache.dtype != torch.float32:
            raise ValueError(f"the CPU decoder needs a one-row float32 cache, got {cache.rows} rows of {cache.dtype}")
        self.layers = [_Layer(model, i) for i in range(c.num_layers)]
        self.final_norm = model.transformer.encoder.final_layernorm
        self.embedding = model.transformer.embedding.word_embeddings
        # Where each rotary coefficient of the rotation matrix goes (see rotation), fixed for the model.
        D, half = self.head_dim, c.rotary_dim // 2
        even = torch.arange(half) * 2
        rows = torch.cat((even, even + 1, even + 1, even, torch.arange(2 * half, D)))
        cols = torch.cat((even, even, even + 1, even + 1, torch.arange(2 * half, D)))
        self._flat = rows * D + cols
        self._ones = torch.ones(D - 2 * half)

    def rotation(self, positions: torch.Tensor) -> torch.Tensor:
        """``R`` [D, D] with ``x @ R`` the interleaved-pair rotary of one head at ``positions`` [1, 1]."""
        cos, sin = rotary_tables(self.model.config, positions)  # [1, 1, rd/2], the model's own tables
        c, s = cos.view(-1), sin.view(-1)
        # out[2i] = x[2i] c - x[2i+1] s, out[2i+1] = x[2i+1] c + x[2i] s; dims past rotary_dim pass through.
        values = torch.cat((c, -s, c, s, self._ones))
        D = self.head_dim
        return torch.zeros(D * D).index_put_((self._flat,), values).view(D, D)

    def step(self, tokens: torch.Tensor, positions: torch.Tensor, length: int) -> torch.Tensor:
        """Logits [1, V] (float32) for ``tokens``/``positions`` [1, 1]; ``length`` = position + 1."""
        H, K, D = self.heads, self.kv_heads, self.head_dim
        g, f, eps, n = H // K, self.ffn, self.eps, self.hidden
        pos = length - 1
        rot = self.rotation(positions)
        x = F.embedding(tokens.view(1), self.embedding.weight)  # [1, hidden], updated in place below
        x1 = x.view(n)
        for layer, kc, vc in zip(self.layers, self.cache.k, self.cache.v, strict=True):  # [1, K, max_len, D]
            qkv = layer.qkv(_rms_norm(x, x1, layer.norm1.weight, eps, n)).view(H + 2 * K, D)  # q, k, v heads
            qk, v = qkv.split((H + K, K))
            qk = torch.mm(qk, rot)  # [H + K, D] rotated
            kc.select(2, pos).copy_(qk[H:])  # [1, K, D]
            vc.select(2, pos).copy_(v)
            # The g query heads that share a key/value head are that head's g queries: [1, K, g, D].
            out = F.scaled_dot_product_attention(
                qk[:H].view(1, K, g, D), kc.narrow(2, 0, length), vc.narrow(2, 0, length)
            )
            x.add_(layer.dense(out.view(1, H * D)))
            gate, up = layer.up(_rms_norm(x, x1, layer.norm2.weight, eps, n)).split(f, dim=1)  # [1, ffn] each
            x.add_(layer.down(F.silu(gate).mul_(up)))
        return self.model.project(_rms_norm(x, x1, self.final_norm.weight, eps, n))  # [1, V] float32, once a step


def _rms_norm(x: torch.Tensor, x1: torch.Tensor, weight: torch.Tensor, eps: float, n: int) -> torch.Tensor:
    """RMSNorm of one float32 row [1, n]: the sum of squares comes to Python as a float, which saves the
    four dispatches of a reduction, a division, an addition and a reciprocal square root on 0-d tensors."""
    scale = 1.0 / math.sqrt(torch.dot(x1, x1).item() / n + eps)
    return torch.mul(x, scale).mul_(weight)
