"""The decoder, as math only: ``forward(tokens, positions, cache) -> logits``.

One model serves ChatGLM2/ChatGLM3 and the Llama family (GGUF): the same pre-norm block with
RMSNorm, rotary attention with grouped key/value heads, and a SwiGLU MLP. What differs is data in
:class:`~glmrun.config.ModelConfig` (how much of each head rotates, QKV bias, tied embeddings).
Module names mirror the official ChatGLM2 checkpoint keys so loading is a table lookup; see the
reference implementation ``modeling_chatglm.py`` of THUDM/chatglm2-6b.

The model never samples, prints, picks devices or reads files; layers may sit on different devices
(the placement step puts them there) and the hidden state follows them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from types import ModuleType
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels
from .cache import KVCache
from .config import ModelConfig
from .cpu_linear import BlockedCopy, HalfPacked, linear_rows
from .row_fusion import NormedRow, RopeWrite, RowFusion, norm_cells

__all__ = ["ChatGLMForCausalLM", "rotary_tables", "apply_rotary"]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, *, device: torch.device | None = None, dtype: torch.dtype | None = None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.on_device(kernels.rms_norm, x)(x, self.weight, self.eps)


def _cuda_kernels(t: torch.Tensor) -> ModuleType | None:
    """:mod:`glmrun.layer_kernels` for a CUDA tensor, else None (imported on first use: it imports Triton,
    which a CPU run never needs)."""
    if not t.is_cuda:
        return None
    from . import layer_kernels

    return layer_kernels


def linear(
    layer: nn.Module, x: torch.Tensor, residual: torch.Tensor | None = None, norm: RMSNorm | None = None
) -> torch.Tensor:
    """``layer(norm(x))`` (+ ``residual``). A one-row float product on CUDA takes glmrun's GEMV kernel
    (layer_kernels.half_gemv), which adds the residual in the same kernel, as a quantized layer's does.
    (A one-row decode step on one GPU takes :meth:`ChatGLMForCausalLM._run_row` instead, whose products also
    carry the norms: glmrun.row_fusion.)"""
    if norm is not None:
        x = norm(x)
    lk = _cuda_kernels(x)
    if lk is not None and isinstance(layer, nn.Linear) and lk.gemv_supported(x, layer.weight):
        return cast(torch.Tensor, lk.half_gemv(x, layer.weight, layer.bias, residual))
    if residual is not None and getattr(layer, "adds_residual", False):  # QuantLinear: fused in its kernel
        return cast(torch.Tensor, layer(x, residual))
    y = cast(torch.Tensor, layer(x))
    return y if residual is None else residual + y


def _row_fusable(layer: nn.Module, x: torch.Tensor, lk: ModuleType) -> bool:
    """Whether ``layer`` takes a one-row product with row_fusion's norms and SwiGLU in its kernel."""
    if isinstance(layer, nn.Linear):
        return bool(lk.gemv_supported(x, layer.weight))
    check = getattr(layer, "row_fusable", None)  # QuantLinear
    return check is not None and bool(check(x))


def row_linear(
    layer: nn.Module, x: torch.Tensor, fusion: RowFusion, residual: torch.Tensor | None = None
) -> torch.Tensor:
    """One row's ``layer(x)`` (+ ``residual``) with ``fusion`` in the same kernel (see _row_fusable)."""
    if isinstance(layer, nn.Linear):
        from . import layer_kernels

        return layer_kernels.half_gemv(x, layer.weight, layer.bias, residual, fusion=fusion)
    product = cast(Callable[..., torch.Tensor], layer.row_product)  # QuantLinear
    return product(x, residual, fusion)


def row_into_norm(
    layer: nn.Module, x: torch.Tensor, residual: torch.Tensor, norm: RMSNorm | None, cell: torch.Tensor | None
) -> NormedRow | torch.Tensor:
    """``residual + layer(x)`` for one row; with ``norm``, as a NormedRow for it (``cell``: a zeroed norm_cells row)."""
    if norm is None or cell is None:
        return row_linear(layer, x, RowFusion(), residual)
    scaled = torch.empty_like(residual)
    h = row_linear(layer, x, RowFusion(out_weight=norm.weight, out_scaled=scaled, out_sumsq=cell), residual)
    return NormedRow(h, scaled, cell, norm.eps)


def rotary_frequencies(config: ModelConfig, device: torch.device) -> torch.Tensor:
    """The rotary angle per position of each rotated pair, [rotary_dim/2] float32."""
    rd = config.rotary_dim
    exponent = torch.arange(0, rd, 2, device=device, dtype=torch.float32) / rd
    return 1.0 / (config.rope_theta**exponent)


def rotary_tables(
    config: ModelConfig, positions: torch.Tensor, inv_freq: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin, [B, T, rotary_dim/2] float32, for absolute ``positions`` [B, T] (``inv_freq``: the
    :func:`rotary_frequencies` of ``config`` on positions' device, when the caller keeps them)."""
    if inv_freq is None:
        inv_freq = rotary_frequencies(config, positions.device)
    angles = positions.float()[..., None] * inv_freq  # [B, T, rd/2]
    return torch.cos(angles), torch.sin(angles)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Interleaved-pair rotary over the first ``2*cos.shape[-1]`` dims of each head (see kernels.rotary)."""
    return kernels.on_device(kernels.rotary, x)(x, cos, sin)


@dataclass(frozen=True)
class StepInputs:
    """What every layer on one device needs for this forward, computed once per device."""

    positions: torch.Tensor  # [B, T]
    cos: torch.Tensor  # [B, T, rotary_dim/2] float32
    sin: torch.Tensor
    length: int  # keys 0..length-1 exist for this step
    first_row: int  # the batch uses cache rows first_row..first_row+B-1
    mode: str  # "causal" (fresh prompt), "chunk" (later prompt chunk, one row) or "rows" (decode)
    masked: bool  # mask keys by position even for one row (CUDA graphs replay with a padded length)
    group: int  # query heads per KV head
    dtype: torch.dtype  # the compute dtype (the mask's)

    @cached_property
    def mask(self) -> torch.Tensor | None:
        """ "rows" mode: [B, 1, g*T, L] additive (0 / -inf), None when every key is visible.

        Built on first use, once per step: the plain decode path reads it in every layer, the CUDA
        decode kernels never (they read each row's position).
        """
        B, T = self.positions.shape
        if self.mode != "rows" or not (self.masked or B > 1 or T > 1):
            return None
        g, length = self.group, self.length
        visible = torch.arange(length, device=self.positions.device)[None, None, :] <= self.positions[:, :, None]
        visible = visible[:, None, None].expand(B, 1, g, T, length).reshape(B, 1, g * T, length)
        # additive, in the compute dtype: SDPA need not convert a boolean mask in every layer
        mask = torch.zeros(visible.shape, dtype=self.dtype, device=self.positions.device)
        return mask.masked_fill_(~visible, float("-inf"))


class SelfAttention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int, *, device: torch.device | None, dtype: torch.dtype | None):
        super().__init__()
        self.layer = layer
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        self.query_key_value = nn.Linear(
            config.hidden_size, config.qkv_size, bias=config.add_qkv_bias, device=device, dtype=dtype
        )
        self.dense = nn.Linear(
            self.heads * self.head_dim, config.hidden_size, bias=config.add_bias_linear, device=device, dtype=dtype
        )

    def forward(self, x: torch.Tensor, step: StepInputs, cache: KVCache, norm: RMSNorm | None = None) -> torch.Tensor:
        """``x + attention(norm(x))``: the block's first half, with its input norm and skip connection."""
        B, T, _ = x.shape  # x: [B, T, hidden]
        H, K, D = self.heads, self.kv_heads, self.head_dim
        qkv = linear(self.query_key_value, x, norm=norm)  # [B, T, (H + 2K) * D]
        lk = _cuda_kernels(qkv)
        if lk is not None and (step.mode != "rows" or T == 1) and cache.dtype == qkv.dtype and lk.supported(qkv, D):
            # CUDA: rotary and the cache write in one kernel; decode rows then take split-key attention.
            if step.mode == "rows":
                return linear(self.dense, self._rows_attention(lk, qkv, step, cache), x)
            q = self._rope_write(lk, qkv, step, cache)
            own = cache.view(self.layer, B, T, step.first_row)  # [B, K, T, D]: a fresh prompt's keys and values
        else:
            qk = apply_rotary(qkv[..., : (H + K) * D].view(B, T, H + K, D), step.cos, step.sin)  # q and k at once
            q, k = qk.split((H, K), dim=2)  # [B, T, H, D], [B, T, K, D]
            v = qkv[..., (H + K) * D :].view(B, T, K, D)
            cache.write(self.layer, step.positions, k, v, step.first_row)
            own = k.transpose(1, 2), v.transpose(1, 2)
        if step.mode == "causal":
            # A fresh prompt in one piece: causal attention over its own keys (flash / cuDNN kernels).
            out = F.scaled_dot_product_attention(q.transpose(1, 2), *own, is_causal=True, enable_gqa=K != H)
            return linear(self.dense, out.transpose(1, 2).reshape(B, T, H * D), x)  # out: [B, H, T, D]
        keys, values = cache.view(self.layer, B, step.length, step.first_row)  # [B, K, L, D]
        keys, values = keys.to(q.dtype), values.to(q.dtype)
        if step.mode == "chunk":
            # A later chunk of one prompt: its T queries are the last T of L keys (lower-right causal).
            # Imported here: the module imports torch._dynamo, ~2 s that a short prompt never needs.
            from torch.nn.attention.bias import causal_lower_right

            out = F.scaled_dot_product_attention(
                q.transpose(1, 2), keys, values, attn_mask=causal_lower_right(T, step.length), enable_gqa=K != H
            )
            return linear(self.dense, out.transpose(1, 2).reshape(B, T, H * D), x)
        # Decode rows: fold the g query heads that share a KV head into the query axis (no KV copies);
        # each row attends to keys at positions <= its own (step.mask, [B, 1, g*T, L]).
        g = H // K
        qf = q.view(B, T, K, g, D).permute(0, 2, 3, 1, 4).reshape(B, K, g * T, D)
        if T == 1:
            out = _decode_attention(qf, keys, values, step.mask)  # [B, K, g, D]
            return linear(self.dense, out.reshape(B, 1, H * D), x)
        out = F.scaled_dot_product_attention(qf, keys, values, attn_mask=step.mask)
        return linear(self.dense, out.view(B, K, g, T, D).permute(0, 3, 1, 2, 4).reshape(B, T, H * D), x)

    def _rope_write(self, lk: ModuleType, qkv: torch.Tensor, step: StepInputs, cache: KVCache) -> torch.Tensor:
        """CUDA: rotate q and k, write k and v into the cache (one kernel); the rotated queries [B, T, H, D]."""
        B, T, _ = qkv.shape
        k_buf, v_buf = cache.buffers(self.layer)
        n = B * T
        q = lk.rope_write(
            qkv.view(n, -1),
            step.cos.view(n, -1),
            step.sin.view(n, -1),
            step.positions.reshape(n),
            k_buf,
            v_buf,
            step.first_row,
            self.heads,
            self.kv_heads,
            tokens_per_row=T,
        )
        return cast(torch.Tensor, q).view(B, T, self.heads, self.head_dim)

    def _rows_attention(self, lk: ModuleType, qkv: torch.Tensor, step: StepInputs, cache: KVCache) -> torch.Tensor:
        """CUDA decode rows (one token each): rotary + cache write, then split-key attention -> [B, 1, H * D]."""
        B, H, D = qkv.shape[0], self.heads, self.head_dim
        q = self._rope_write(lk, qkv, step, cache)
        k_buf, v_buf = cache.buffers(self.layer)
        out = lk.decode_attention(q.view(B, H, D), k_buf, v_buf, step.positions.view(B), step.first_row, step.length)
        return cast(torch.Tensor, out).view(B, 1, H * D)

    def forward_row(
        self, row: NormedRow, step: StepInputs, cache: KVCache, post: RMSNorm, cell: torch.Tensor
    ) -> NormedRow | torch.Tensor:
        """One decode row on CUDA with the norms in the products: ``row.h + attention(norm(row.h))``, normed for
        ``post`` (see row_fusion)."""
        from . import layer_kernels as lk

        H, D, r = self.heads, self.head_dim, step.first_row
        k_buf, v_buf = cache.buffers(self.layer)
        q = torch.empty(H * D, dtype=row.scaled.dtype, device=row.scaled.device)
        cos, sin = step.cos.view(-1), step.sin.view(-1)
        rope = RopeWrite(q, k_buf[r], v_buf[r], cos, sin, step.positions.view(1), H, self.kv_heads)
        row_linear(self.query_key_value, row.scaled, RowFusion(row=row, rope=rope))  # q rotated; k, v cached
        out = lk.decode_attention(q.view(1, H, D), k_buf, v_buf, step.positions.view(1), r, step.length)
        return row_into_norm(self.dense, out.view(1, 1, H * D), row.h, post, cell)

    def row_fusable(self, x: torch.Tensor, cache: KVCache, lk: ModuleType) -> bool:
        return (
            cache.dtype == x.dtype
            and bool(lk.supported(x, self.head_dim))
            and _row_fusable(self.query_key_value, x, lk)
            and _row_fusable(self.dense, x, lk)
        )


def _decode_attention(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None
) -> torch.Tensor:
    """One new token per row: softmax(q k^T / sqrt(D) + mask) v as three batched matrix products.

    With 2 KV heads a fused attention kernel has only B*2 units of work and leaves most of a GPU
    idle; cuBLAS spreads the [g, L] score products over the whole chip. ``keys``/``values`` are
    cache views [B, K, L, D] whose (B, K) dims merge without a copy.
    """
    B, K, g, D = q.shape
    L = keys.shape[2]
    k = keys.reshape(B * K, L, D)
    v = values.reshape(B * K, L, D)
    qb = q.reshape(B * K, g, D)
    if mask is None:
        scores = torch.bmm(qb, k.transpose(1, 2)) * (D**-0.5)
    else:
        bias = mask.expand(B, K, g, L).reshape(B * K, g, L) if B > 1 else mask.reshape(1, g, L)
        scores = torch.baddbmm(bias, qb, k.transpose(1, 2), alpha=D**-0.5)  # [B*K, g, L]
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.bmm(probs, v).view(B, K, g, D)


class MLP(nn.Module):
    def __init__(self, config: ModelConfig, *, device: torch.device | None, dtype: torch.dtype | None):
        super().__init__()
        h, f = config.hidden_size, config.ffn_hidden_size
        self.dense_h_to_4h = nn.Linear(h, 2 * f, bias=config.add_bias_linear, device=device, dtype=dtype)
        self.dense_4h_to_h = nn.Linear(f, h, bias=config.add_bias_linear, device=device, dtype=dtype)

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None, norm: RMSNorm | None = None
    ) -> torch.Tensor:
        """The MLP of ``norm(x)``, plus ``residual`` when given (the block's skip connection, added in the last
        product's kernel where possible)."""
        h = linear(self.dense_h_to_4h, x, norm=norm)  # [B, T, 2 * ffn]: gate rows first, then up rows
        lk = _cuda_kernels(h)
        if lk is not None and lk.elementwise_supported(h):
            act = lk.swiglu(h)
        else:
            act = kernels.on_device(kernels.swiglu, h)(h)
        return linear(self.dense_4h_to_h, act, residual)

    def forward_row(self, row: NormedRow, after: RMSNorm | None, cell: torch.Tensor | None) -> NormedRow | torch.Tensor:
        """``row.h + mlp(norm(row.h))`` for one row, its SwiGLU in the up projection's kernel; normed for
        ``after`` when given (see row_fusion)."""
        act = row_linear(self.dense_h_to_4h, row.scaled, RowFusion(row=row, glu=True))  # [1, 1, ffn]
        return row_into_norm(self.dense_4h_to_h, act, row.h, after, cell)

    def row_fusable(self, x: torch.Tensor, lk: ModuleType) -> bool:
        return _row_fusable(self.dense_h_to_4h, x, lk) and _row_fusable(self.dense_4h_to_h, x, lk)


class GLMBlock(nn.Module):
    def __init__(self, config: ModelConfig, layer: int, *, device: torch.device | None, dtype: torch.dtype | None):
        super().__init__()
        eps = config.layernorm_epsilon
        self.input_layernorm = RMSNorm(config.hidden_size, eps, device=device, dtype=dtype)
        self.self_attention = SelfAttention(config, layer, device=device, dtype=dtype)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps, device=device, dtype=dtype)
        self.mlp = MLP(config, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor, step: StepInputs, cache: KVCache) -> torch.Tensor:
        h = self.self_attention(x, step, cache, norm=self.input_layernorm)  # x + attention(norm1(x))
        return self.mlp(h, residual=h, norm=self.post_attention_layernorm)  # h + mlp(norm2(h))

    def forward_row(
        self,
        row: NormedRow,
        step: StepInputs,
        cache: KVCache,
        cells: torch.Tensor,  # [2, 2] of norm_cells, zeroed: sum(h**2) of the two norms that follow
        after: RMSNorm | None,  # the next layer's input norm, or None (the result is then the plain h)
    ) -> NormedRow | torch.Tensor:
        """:meth:`forward` of one decode row (CUDA) with the norms and SwiGLU inside the products."""
        h = self.self_attention.forward_row(row, step, cache, self.post_attention_layernorm, cells[0])
        assert isinstance(h, NormedRow)
        return self.mlp.forward_row(h, after, cells[1])

    def row_fusable(self, x: torch.Tensor, cache: KVCache, lk: ModuleType) -> bool:
        """Whether :meth:`forward_row` serves the one-row ``x`` (CUDA kernels for every product and the attention)."""
        return self.self_attention.row_fusable(x, cache, lk) and self.mlp.row_fusable(x, lk)


class Embedding(nn.Module):
    def __init__(self, config: ModelConfig, *, device: torch.device | None, dtype: torch.dtype | None):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.padded_vocab_size, config.hidden_size, device=device, dtype=dtype)


class Encoder(nn.Module):
    def __init__(self, config: ModelConfig, *, device: torch.device | None, dtype: torch.dtype | None):
        super().__init__()
        self.layers = nn.ModuleList(GLMBlock(config, i, device=device, dtype=dtype) for i in range(config.num_layers))
        self.final_layernorm = RMSNorm(config.hidden_size, config.layernorm_epsilon, device=device, dtype=dtype)


class Backbone(nn.Module):
    def __init__(self, config: ModelConfig, *, device: torch.device | None, dtype: torch.dtype | None):
        super().__init__()
        self.embedding = Embedding(config, device=device, dtype=dtype)
        self.encoder = Encoder(config, device=device, dtype=dtype)
        if not config.tie_word_embeddings:
            self.output_layer = nn.Linear(
                config.hidden_size, config.padded_vocab_size, bias=False, device=device, dtype=dtype
            )


class ChatGLMForCausalLM(nn.Module):
    """``forward(tokens [B, T], positions [B, T], cache) -> logits`` for rows 0..B-1 of ``cache``."""

    def __init__(
        self, config: ModelConfig, *, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ):
        super().__init__()
        self.config = config
        # A faster copy of the tied output matrix for the CPU (glmrun.cpu_linear): oneDNN-blocked for multi-row
        # logits, or float16 for dtype="float16"; a plain attribute, so it is neither saved nor moved.
        self.fast_head: BlockedCopy | HalfPacked | None = None
        self._rotary_freqs: dict[torch.device, torch.Tensor] = {}  # rotary_frequencies(config) per device
        dev = torch.device(device) if device is not None else None
        self.transformer = Backbone(config, device=dev, dtype=dtype)

    @property
    def layers(self) -> nn.ModuleList:
        return self.transformer.encoder.layers

    def blocks(self) -> list[GLMBlock]:
        return [cast(GLMBlock, layer) for layer in self.layers]

    def layer_devices(self) -> list[torch.device]:
        return [layer.input_layernorm.weight.device for layer in self.blocks()]

    def output_weight(self) -> torch.Tensor:
        """The output matrix in the compute dtype (an error for a quantized output layer: see output_device)."""
        if self.config.tie_word_embeddings:
            return self.transformer.embedding.word_embeddings.weight
        weight = getattr(self.transformer.output_layer, "weight", None)
        if not isinstance(weight, torch.Tensor):
            raise TypeError("the output layer is quantized: it has no float weight")
        return weight

    def output_device(self) -> torch.device:
        """Where the logits are computed (the output layer's device, or the embedding's when tied)."""
        if self.config.tie_word_embeddings:
            return self.transformer.embedding.word_embeddings.weight.device
        return next(
            t for t in (*self.transformer.output_layer.parameters(), *self.transformer.output_layer.buffers())
        ).device

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.transformer.embedding.word_embeddings.weight.dtype

    def _step_inputs(self, positions: torch.Tensor, length: int, first_row: int, mode: str, masked: bool) -> StepInputs:
        freqs = self._rotary_freqs.get(positions.device)
        if freqs is None:  # once per device: a decode step then spends 4 small kernels on its tables, not 8
            freqs = self._rotary_freqs[positions.device] = rotary_frequencies(self.config, positions.device)
        cos, sin = rotary_tables(self.config, positions, freqs)
        group = self.config.num_attention_heads // self.config.num_kv_heads
        return StepInputs(positions, cos, sin, length, first_row, mode, masked, group, self.compute_dtype)

    def forward(
        self,
        tokens: torch.Tensor,  # [B, T] long
        positions: torch.Tensor,  # [B, T] long, absolute positions of these tokens in their rows
        cache: KVCache,
        *,
        length: int | None = None,
        first_row: int = 0,
        logits: str = "last",  # "last": [B, V] at each row's last token; "all": [B, T, V]; "none": hidden only
        masked: bool = False,  # always mask keys by position (CUDA graphs replay with a padded length)
    ) -> torch.Tensor:
        """Run the tokens through every layer, writing their keys/values into ``cache``.

        ``length`` is how many key positions to attend (defaults to max(positions)+1; the scheduler
        passes it so no device-to-host sync is needed). A row attends to keys at positions <= its
        query's position, so rows of different lengths can share a step. The batch uses cache rows
        ``first_row .. first_row + B - 1`` (the scheduler prefills one request into its own row).
        """
        if length is None:
            length = int(positions.max().item()) + 1
        x = self.embed(tokens)
        x = self.run_layers(
            x, positions, cache, range(self.config.num_layers), length=length, first_row=first_row, masked=masked
        )
        return self.head(x, logits)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        emb = self.transformer.embedding.word_embeddings
        return emb(tokens.to(emb.weight.device))  # [B, T, hidden]

    def run_layers(
        self,
        x: torch.Tensor,  # [B, T, hidden]
        positions: torch.Tensor,
        cache: KVCache,
        layers: range,
        *,
        length: int,
        first_row: int = 0,
        masked: bool = False,
    ) -> torch.Tensor:
        """Layers ``layers`` only (a device's segment when the model is split over GPUs)."""
        B, T = positions.shape
        # "causal": fresh prompts (every row at positions 0..T-1, e.g. right-padded prompts of a batch);
        # "chunk": a later piece of one row's prompt; "rows": decode steps (each row masked by position).
        if T > 1 and not masked and length == T:
            mode = "causal"
        else:
            mode = "chunk" if B == 1 and T > 1 and not masked else "rows"
        devices = self.layer_devices()
        if B * T == 1 and self._rows_fuse(x, cache, layers, devices):
            return self._run_row(x, positions, cache, layers, length=length, first_row=first_row, masked=masked)
        steps: dict[torch.device, StepInputs] = {}
        for i in layers:
            layer = self.layers[i]
            dev = devices[i]
            if dev not in steps:
                steps[dev] = self._step_inputs(positions.to(dev), length, first_row, mode, masked)
            x = layer(x.to(dev), steps[dev], cache)
        return x

    def _rows_fuse(self, x: torch.Tensor, cache: KVCache, layers: range, devices: list[torch.device]) -> bool:
        """Whether :meth:`_run_row` serves this one-row step: every layer on x's GPU with the fused kernels."""
        lk = _cuda_kernels(x)
        if lk is None or len(layers) == 0 or any(devices[i] != x.device for i in layers):
            return False
        return all(self.blocks()[i].row_fusable(x, cache, lk) for i in layers)

    def _run_row(
        self,
        x: torch.Tensor,  # [1, 1, hidden]
        positions: torch.Tensor,
        cache: KVCache,
        layers: range,
        *,
        length: int,
        first_row: int,
        masked: bool,
    ) -> torch.Tensor:
        """:meth:`run_layers` for one decode row on one GPU: the norms and SwiGLU ride in the products'
        kernels (glmrun.row_fusion) with the rotary and cache write, so a layer launches 6 kernels instead of 10."""
        from .kernels import overlapped_launches
        from .row_kernels import norm_prep

        step = self._step_inputs(positions.to(x.device), length, first_row, "rows", masked)
        blocks = [self.blocks()[i] for i in layers]
        cells = norm_cells(2 * len(blocks) + 1, x.dtype, x.device)  # one sum(h**2) a norm
        first = blocks[0].input_layernorm
        with overlapped_launches():  # on Hopper: each kernel starts while the one before finishes (kernels.py)
            out: NormedRow | torch.Tensor = norm_prep(x, first.weight, first.eps, cells[0])
            for j, block in enumerate(blocks):
                after = blocks[j + 1].input_layernorm if j + 1 < len(blocks) else None
                assert isinstance(out, NormedRow)
                out = block.forward_row(out, step, cache, cells[2 * j + 1 : 2 * j + 3], after)
        assert isinstance(out, torch.Tensor)
        return out

    def head(self, x: torch.Tensor, logits: str = "last") -> torch.Tensor:
        """Final norm, then logits as float32: "last" [B, V], "all" [B, T, V]; "none" returns the normed hidden."""
        norm = self.transformer.encoder.final_layernorm
        if logits == "none":
            return norm(x.to(norm.weight.device))
        if logits == "last":
            x = x[:, -1]  # [B, hidden]: the norm is per position, so only the projected one is normed
        if norm.weight.device != self.output_device():
            return self.project(norm(x.to(norm.weight.device)))
        return self.project(x, norm)

    def project(self, x: torch.Tensor, norm: RMSNorm | None = None) -> torch.Tensor:
        """Logits (float32) of hidden states ``[..., hidden]`` -> ``[..., V]``, final-normed by ``norm`` first when
        given (its weight must be on the output layer's device; :meth:`head` checks)."""
        x = x.to(self.output_device())
        if self.config.tie_word_embeddings:
            x = x if norm is None else norm(x)
            out = linear_rows(x, self.transformer.embedding.word_embeddings.weight, None, self.fast_head)
        else:
            out = linear(self.transformer.output_layer, x, norm=norm)
        return out.float()  # [B, V] or [B, T, V]
