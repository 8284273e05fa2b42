"""Llama-family ``.gguf`` files as a :class:`~glmrun.config.ModelConfig` and a stream of official-name tensors.

One responsibility: translate a GGUF file (llama.cpp's format) into what the rest of glmrun already
understands. :func:`gguf_config` maps the file's metadata onto the ChatGLM2 config fields (family
``"llama"``); :func:`iter_gguf_tensors` dequantizes the memory-mapped tensors one at a time and yields
them under the official ChatGLM2 names of ``docs/CONTRACTS.md`` (q/k/v rows fused into
``query_key_value``, gate/up rows into ``dense_h_to_4h``), so the weights step does its usual strict
accounting. Reading metadata is :mod:`glmrun.gguf_meta`'s job.

Every function here takes either a path or the index :func:`glmrun.gguf_meta.open_gguf` returns
(:mod:`glmrun.gguf_index`): open once, pass the index on.

Keeping weights packed: every tensor is dequantized to ``dtype`` for the model's own forward, and
:func:`iter_gguf_q4` also yields the layer matrices a file stores as Q4_0/Q4_1 (4-bit codes in groups
of 32) as their codes and per-group scale and minimum (:class:`Q4Blocks`), fused under the same names
(q/k/v and gate/up rows concatenated), so a product kernel can use the file's own 4-bit grid instead
of quantizing the floats again (:mod:`glmrun.cpu_linear`'s int4 packs for the CPU decoder).
:func:`gguf_tensor_types` returns each tensor's ggml type name without touching tensor data.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize

from .config import ModelConfig
from .errors import ConfigError, InvalidArgumentError, UnsupportedModelError, WeightsMismatchError
from .gguf_index import GGUFIndex, GGUFTensor
from .gguf_meta import open_gguf, read_gguf_metadata

__all__ = [
    "KNOWN_IGNORED",
    "GGUFSource",
    "Q4Blocks",
    "dequantize_blocks",
    "gguf_config",
    "gguf_tensor_types",
    "is_known_ignored",
    "iter_gguf_q4",
    "iter_gguf_tensors",
    "load_gguf_config",
    "q4_blocks",
]

GGUFSource = str | os.PathLike[str] | GGUFIndex

# GGUF tensors that carry nothing the model needs (``{i}`` stands for a block index):
# - ``blk.{i}.attn_rot_embd.weight``: a stored copy of the rotary inv_freq, which the model derives
#   from llama.rope.freq_base, like the official ``transformer.rotary_pos_emb.inv_freq``.
# - ``rope_freqs.weight``: per-frequency divisors (Llama-3.1 style rope scaling). Skipped only when
#   every factor is 1; :func:`iter_gguf_tensors` refuses a file where it would change the model.
KNOWN_IGNORED: frozenset[str] = frozenset({"blk.{i}.attn_rot_embd.weight", "rope_freqs.weight"})

_BLOCK_PREFIX = re.compile(r"^blk\.\d+\.")

# Official suffix under ``transformer.encoder.layers.{i}.`` -> the GGUF tensors of block i whose rows
# are stacked, in this order, to form it.
_LAYER_MAP: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("input_layernorm.weight", ("attn_norm",)),
    ("self_attention.query_key_value.weight", ("attn_q", "attn_k", "attn_v")),
    ("self_attention.dense.weight", ("attn_output",)),
    ("post_attention_layernorm.weight", ("ffn_norm",)),
    ("mlp.dense_h_to_4h.weight", ("ffn_gate", "ffn_up")),
    ("mlp.dense_4h_to_h.weight", ("ffn_down",)),
)

# Rotary layout, the one quirk of this mapping. Hugging Face Llama checkpoints rotate the two halves
# of each head (x[j] with x[j + d/2]). llama.cpp's converter permutes the q and k rows of every head
# so that the pair (j, j + d/2) lands on rows (2j, 2j + 1): ``LlamaModel.permute``,
# reshape(n_head, 2, d/2, n_in).swapaxes(1, 2), in
# https://github.com/ggml-org/llama.cpp/blob/master/convert_hf_to_gguf.py
# and llama.cpp runs arch "llama" with its "normal" rope on adjacent pairs (``llama_model_rope_type``:
# LLM_ARCH_LLAMA -> LLAMA_ROPE_TYPE_NORM, https://github.com/ggml-org/llama.cpp/blob/master/src/llama-model.cpp).
# transformers, which rotates halves, undoes the permutation when it reads a GGUF
# (``LlamaTensorProcessor._reverse_permute_weights`` in
# https://github.com/huggingface/transformers/blob/main/src/transformers/modeling_gguf_pytorch_utils.py).
# glmrun rotates adjacent pairs (x[2i], x[2i + 1]) with inv_freq[i] = theta ** (-2i / rotary_dim), the
# stored layout, so attn_q / attn_k rows are used as stored. tests/test_gguf_file.py checks this
# against transformers' weights and rotary embedding.


def is_known_ignored(name: str) -> bool:
    """Whether a GGUF tensor name is one of :data:`KNOWN_IGNORED` (its block index read as ``{i}``)."""
    return _BLOCK_PREFIX.sub("blk.{i}.", name) in KNOWN_IGNORED


# Config ---------------------------------------------------------------------------------------


def gguf_config(metadata: Mapping[str, Any], *, source: str, tensor_names: Iterable[str] | None = None) -> ModelConfig:
    """Map GGUF metadata (``general.*``, ``llama.*``, ``tokenizer.ggml.*`` keys) onto a :class:`ModelConfig`.

    ``tensor_names`` (the file's tensor names) decides ``tie_word_embeddings``: the embedding doubles
    as the output layer when the file has no ``output.weight``, and no metadata key says so. Without
    it, ``source`` must be the file's path and the file is opened again to list them (its whole
    header is read again): pass the names of an open index, or call :func:`load_gguf_config`.
    """
    arch = metadata.get("general.architecture")
    if arch != "llama":
        raise UnsupportedModelError(
            f"{source}: general.architecture is {arch!r}; glmrun runs GGUF files of architecture 'llama' "
            "(Llama, Mistral, SmolLM2, TinyLlama...) and ChatGLM2-6B / ChatGLM3-6B folders"
        )
    if int(metadata.get("llama.expert_count", 0) or 0) > 0:
        raise UnsupportedModelError(
            f"{source}: llama.expert_count is {metadata['llama.expert_count']}; mixture-of-experts models "
            "(Mixtral) are not supported"
        )
    _check_rope_scaling(metadata, source)
    if tensor_names is None:
        if not Path(source).is_file():
            raise ConfigError(
                f"{source}: gguf_config needs tensor_names (or source naming the .gguf file) to tell whether "
                "the output layer is tied to the embedding"
            )
        tensor_names = [t.name for t in open_gguf(source).tensors]

    def need(key: str) -> Any:
        if key not in metadata:
            raise ConfigError(f"{source}: required GGUF metadata key {key!r} is missing")
        return metadata[key]

    try:
        hidden = int(need("llama.embedding_length"))
        heads = int(need("llama.attention.head_count"))
        head_dim = _head_dim(metadata, hidden, heads, source)
        tokens = metadata.get("tokenizer.ggml.tokens")
        if tokens is not None:
            vocab = len(tokens)
        elif "llama.vocab_size" in metadata:
            vocab = int(metadata["llama.vocab_size"])
        else:
            raise ConfigError(f"{source}: neither tokenizer.ggml.tokens nor llama.vocab_size is present")
        eos_ids = [int(need("tokenizer.ggml.eos_token_id"))]
        # llama.cpp also ends generation on the end-of-turn / end-of-message tokens a file names.
        for key in ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"):
            if key in metadata and int(metadata[key]) not in eos_ids:
                eos_ids.append(int(metadata[key]))
        pad = metadata.get("tokenizer.ggml.padding_token_id")
        return ModelConfig(
            hidden_size=hidden,
            num_layers=int(need("llama.block_count")),
            num_attention_heads=heads,
            kv_channels=head_dim,
            multi_query_group_num=int(metadata.get("llama.attention.head_count_kv", heads)),
            ffn_hidden_size=int(need("llama.feed_forward_length")),
            padded_vocab_size=vocab,
            seq_length=int(need("llama.context_length")),
            layernorm_epsilon=float(need("llama.attention.layer_norm_rms_epsilon")),
            rope_base=float(metadata.get("llama.rope.freq_base", 10000.0)),
            rope_ratio=1.0,
            rotary_dim=int(metadata.get("llama.rope.dimension_count", head_dim)),
            add_qkv_bias=False,
            add_bias_linear=False,
            tie_word_embeddings="output.weight" not in set(tensor_names),
            torch_dtype="float32",
            family="llama",
            eos_token_ids=tuple(eos_ids),
            pad_token_id=int(pad) if pad is not None else 0,
            extra={k: metadata[k] for k in ("general.name", "general.file_type") if k in metadata},
        )
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{source}: {exc}") from exc


def _head_dim(metadata: Mapping[str, Any], hidden: int, heads: int, source: str) -> int:
    if "llama.attention.key_length" in metadata:
        head_dim = int(metadata["llama.attention.key_length"])
    elif hidden % heads:
        raise ConfigError(
            f"{source}: llama.embedding_length {hidden} is not a multiple of llama.attention.head_count {heads} "
            "and llama.attention.key_length is missing"
        )
    else:
        head_dim = hidden // heads
    value_dim = int(metadata.get("llama.attention.value_length", head_dim))
    if value_dim != head_dim:
        raise UnsupportedModelError(
            f"{source}: llama.attention.value_length {value_dim} differs from the key length {head_dim}"
        )
    return head_dim


def _check_rope_scaling(metadata: Mapping[str, Any], source: str) -> None:
    """Refuse rope scaling that glmrun's rotary embedding does not reproduce (anything but a factor of 1)."""
    kind = str(metadata.get("llama.rope.scaling.type", "none")).lower()
    factor = float(metadata.get("llama.rope.scaling.factor", 1.0) or 1.0)
    old_linear = float(metadata.get("llama.rope.scale_linear", 1.0) or 1.0)  # older converters' key
    if kind not in ("none", "linear") or factor != 1.0 or old_linear != 1.0:
        raise UnsupportedModelError(
            f"{source}: rope scaling {kind!r} (factor {factor if old_linear == 1.0 else old_linear}) is not "
            "supported; glmrun runs GGUF files without rope scaling"
        )


def load_gguf_config(source: GGUFSource) -> ModelConfig:
    """The :class:`ModelConfig` of a ``.gguf`` file (path or open index), from its metadata and tensor names."""
    reader = _reader(source)
    return gguf_config(
        read_gguf_metadata(reader), source=_describe(reader), tensor_names=[t.name for t in reader.tensors]
    )


# Tensors --------------------------------------------------------------------------------------


def gguf_tensor_types(source: GGUFSource) -> dict[str, str]:
    """Every tensor of the file, name -> ggml type name (``"F32"``, ``"Q4_1"``...), in file order."""
    return {t.name: t.tensor_type.name for t in _reader(source).tensors}


def iter_gguf_tensors(
    source: GGUFSource,
    config: ModelConfig,
    *,
    dtype: torch.dtype = torch.float32,
    strict: bool = True,
    skipped: list[str] | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(official name, tensor)``: the embedding, each layer in order, the final norm, the output.

    Tensors are dequantized one at a time from the memory-mapped file and fused per layer, so no more
    than one layer's pieces are held besides what the caller keeps. Before the first yield the file is
    checked against ``config``: a missing or wrongly shaped tensor raises WeightsMismatchError, and so,
    when ``strict``, does a tensor that maps to nothing and is not :func:`is_known_ignored` (glmrun would
    run without it: attention biases, experts...). Every GGUF name that maps to nothing is appended to
    ``skipped`` when a list is given, for a caller that does its own accounting with ``strict=False``.
    """
    if not dtype.is_floating_point:
        raise InvalidArgumentError(f"dtype must be a floating point torch dtype, got {dtype}")
    reader = _reader(source)
    where = _describe(reader)
    tensors = {t.name: t for t in reader.tensors}
    wanted = _expected_gguf_shapes(config)
    missing = [name for name in wanted if name not in tensors]
    if missing:
        raise WeightsMismatchError(f"{where}: tensors missing from the file: {_listed(missing)}")
    for name, shape in wanted.items():
        found = _torch_shape(tensors[name])
        if found != shape:
            raise WeightsMismatchError(
                f"{where}: tensor {name} has shape {list(found)}, the config needs {list(shape)}"
            )
    unused = [name for name in tensors if name not in wanted]
    unknown = [name for name in unused if not is_known_ignored(name)]
    if strict and unknown:
        raise WeightsMismatchError(
            f"{where}: tensors glmrun has no place for: {_listed(unknown)}; this Llama variant is not supported"
        )
    if "rope_freqs.weight" in tensors:
        factors = _dequantize(tensors["rope_freqs.weight"], where, torch.float32)
        if not bool(torch.all(factors == 1.0)):
            raise UnsupportedModelError(
                f"{where}: rope_freqs.weight rescales the rotary frequencies (Llama-3.1 style rope scaling), "
                "which glmrun does not support"
            )
    if skipped is not None:
        skipped.extend(unused)
    return _stream(tensors, config, where, dtype)


def _stream(
    tensors: Mapping[str, GGUFTensor], config: ModelConfig, where: str, dtype: torch.dtype
) -> Iterator[tuple[str, torch.Tensor]]:
    def load(name: str) -> torch.Tensor:
        return _dequantize(tensors[name], where, dtype)

    yield "transformer.embedding.word_embeddings.weight", load("token_embd.weight")
    for i in range(config.num_layers):
        for suffix, pieces in _LAYER_MAP:
            parts = [load(f"blk.{i}.{piece}.weight") for piece in pieces]
            fused = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)  # rows: q, k, v / gate, up
            del parts
            yield f"transformer.encoder.layers.{i}.{suffix}", fused
    yield "transformer.encoder.final_layernorm.weight", load("output_norm.weight")
    if not config.tie_word_embeddings:
        yield "transformer.output_layer.weight", load("output.weight")


def _expected_gguf_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """GGUF name -> torch shape of every tensor the config needs, in the order they are yielded."""
    h, f, v = config.hidden_size, config.ffn_hidden_size, config.padded_vocab_size
    q_rows = config.num_attention_heads * config.head_dim
    kv_rows = config.num_kv_heads * config.head_dim
    per_layer: dict[str, tuple[int, ...]] = {
        "attn_norm": (h,),
        "attn_q": (q_rows, h),
        "attn_k": (kv_rows, h),
        "attn_v": (kv_rows, h),
        "attn_output": (h, q_rows),
        "ffn_norm": (h,),
        "ffn_gate": (f, h),
        "ffn_up": (f, h),
        "ffn_down": (h, f),
    }
    shapes: dict[str, tuple[int, ...]] = {"token_embd.weight": (v, h)}
    for i in range(config.num_layers):
        for piece, shape in per_layer.items():
            shapes[f"blk.{i}.{piece}.weight"] = shape
    shapes["output_norm.weight"] = (h,)
    if not config.tie_word_embeddings:
        shapes["output.weight"] = (v, h)
    return shapes


def _torch_shape(tensor: GGUFTensor) -> tuple[int, ...]:
    # ggml lists dimensions innermost first: ne = [n_in, n_out] is a torch [n_out, n_in] matrix.
    return tuple(reversed(tensor.shape))


# Block layouts dequantized with torch ops (bytes per block of 32): a float16 scale d, for Q4_1 a float16
# minimum m, then the codes -- Q8_0: 32 int8 (x = q * d); Q4_0 / Q4_1: 16 bytes whose low nibbles are
# values 0-15 and high nibbles values 16-31 (x = (q - 8) * d, x = q * d + m).
_TORCH_BLOCKS = {GGMLQuantizationType.Q8_0: 34, GGMLQuantizationType.Q4_0: 18, GGMLQuantizationType.Q4_1: 20}


def _block_fields(
    data: np.ndarray, qtype: GGMLQuantizationType
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Q8_0 / Q4_0 / Q4_1 block bytes -> ``d`` float32 ``[n, 1]``, Q4_1's ``m`` (else None) and the code bytes
    ``[n, 32 or 16]`` (uint8, a view of a copy this owns) of the ``n`` blocks."""
    blocks = torch.from_numpy(np.array(data, dtype=np.uint8, copy=True).reshape(-1, _TORCH_BLOCKS[qtype]))
    d = blocks[:, :2].contiguous().view(torch.float16).float()
    if qtype == GGMLQuantizationType.Q4_1:
        return d, blocks[:, 2:4].contiguous().view(torch.float16).float(), blocks[:, 4:]
    return d, None, blocks[:, 2:]


def _spread_nibbles(packed: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """A Q4 block's 16 code bytes ``[n, 16]`` as its 32 values in ``out`` ``[n, 32]`` (converted to its dtype as
    they are written): low nibbles are values 0-15, high nibbles 16-31."""
    out[:, :16] = packed & 15
    out[:, 16:] = packed >> 4
    return out


def dequantize_blocks(data: np.ndarray, qtype: GGMLQuantizationType) -> torch.Tensor:
    """Q8_0 / Q4_0 / Q4_1 block bytes ``[..., row bytes]`` -> float32 ``[n_values]``, with torch ops.

    The same float32 arithmetic as ``gguf.quants.dequantize`` (the tests compare them bit for bit), on
    every core, writing each value once: half of numpy's time for SmolLM2's 135M values on 2 cores.
    """
    d, m, codes = _block_fields(data, qtype)  # d: [n, 1]
    if qtype == GGMLQuantizationType.Q8_0:
        return (codes.contiguous().view(torch.int8).float() * d).reshape(-1)
    out = _spread_nibbles(codes, torch.empty(codes.shape[0], 32))
    if m is None:  # Q4_0
        return out.sub_(8).mul_(d).reshape(-1)
    return out.mul_(d).add_(m).reshape(-1)


_Q4_TYPES = (GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q4_1)
_Q4_GROUP = 32  # values per Q4_0 / Q4_1 block


@dataclass(frozen=True)
class Q4Blocks:
    """A ``[out, in]`` matrix on a 4-bit grid per group of 32 columns, as Q4_0/Q4_1 store it:
    ``w[r, c] = codes[r, c] * scale[r, c // 32] + low[r, c // 32]`` (float32 arithmetic, the same
    numbers as :func:`dequantize_blocks`)."""

    codes: torch.Tensor  # uint8 [out, in], values 0..15
    scale: torch.Tensor  # float32 [out, in // 32]: the block's float16 d
    low: torch.Tensor  # float32 [out, in // 32]: Q4_1's float16 m, Q4_0's -8 d (exact: a power of two)

    def dequantize(self) -> torch.Tensor:
        """The float32 matrix ``[out, in]``."""
        out, cols = self.codes.shape
        grouped = self.codes.view(out, cols // _Q4_GROUP, _Q4_GROUP).float()
        return grouped.mul_(self.scale[..., None]).add_(self.low[..., None]).view(out, cols)


def q4_blocks(data: np.ndarray, qtype: GGMLQuantizationType, shape: tuple[int, ...]) -> Q4Blocks:
    """Q4_0 / Q4_1 block bytes of a torch-shaped ``[out, in]`` matrix as :class:`Q4Blocks`."""
    if qtype not in _Q4_TYPES:
        raise InvalidArgumentError(f"q4_blocks reads Q4_0 / Q4_1 blocks, not {qtype.name}")
    out, cols = shape
    d, m, packed = _block_fields(data, qtype)
    codes = _spread_nibbles(packed, torch.empty(packed.shape[0], _Q4_GROUP, dtype=torch.uint8))
    low = d * -8.0 if m is None else m
    return Q4Blocks(codes.view(out, cols), d.view(out, cols // _Q4_GROUP), low.view(out, cols // _Q4_GROUP))


def iter_gguf_q4(
    source: GGUFSource, config: ModelConfig, layers: Iterable[int] | None = None
) -> Iterator[tuple[str, Q4Blocks]]:
    """Yield ``(official name, Q4Blocks)`` for each matrix of ``layers`` (default: all) whose GGUF pieces
    are all Q4_0/Q4_1.

    Names and row order are those of :func:`iter_gguf_tensors` (q/k/v, gate/up fused), so
    ``blocks.dequantize()`` equals the tensor it yields under the same name; a matrix with any piece
    of another type (a K-quant, Q8_0, F16...) is left out. Shapes are those the config expects; call
    this on a file :func:`iter_gguf_tensors` accepted.
    """
    reader = _reader(source)
    tensors = {t.name: t for t in reader.tensors}
    for i in range(config.num_layers) if layers is None else layers:
        for suffix, pieces in _LAYER_MAP:
            parts = [tensors.get(f"blk.{i}.{piece}.weight") for piece in pieces]
            if not all(p is not None and p.tensor_type in _Q4_TYPES and len(p.shape) == 2 for p in parts):
                continue
            found = [q4_blocks(p.data, p.tensor_type, _torch_shape(p)) for p in parts if p is not None]
            fused = Q4Blocks(  # rows: q, k, v / gate, up
                torch.cat([b.codes for b in found]),
                torch.cat([b.scale for b in found]),
                torch.cat([b.low for b in found]),
            )
            yield f"transformer.encoder.layers.{i}.{suffix}", fused


def _dequantize(tensor: GGUFTensor, where: str, dtype: torch.dtype) -> torch.Tensor:
    """One GGUF tensor as a torch tensor of ``dtype`` and torch shape, owning its memory."""
    qtype = tensor.tensor_type
    if qtype in _TORCH_BLOCKS:
        return dequantize_blocks(tensor.data, qtype).view(_torch_shape(tensor)).to(dtype)
    try:
        values = dequantize(tensor.data, qtype)
    except NotImplementedError as exc:
        raise UnsupportedModelError(
            f"{where}: tensor {tensor.name} is stored as {qtype.name}, which glmrun cannot dequantize; use a file "
            "quantized as F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 or a K-quant (Q2_K..Q6_K)"
        ) from exc
    values = np.asarray(values, dtype=np.float32).reshape(_torch_shape(tensor))
    if not values.flags.writeable:  # F32 data is a view of the read-only memory map
        values = values.copy()
    return torch.from_numpy(values).to(dtype)


def _reader(source: GGUFSource) -> GGUFIndex:
    return source if isinstance(source, GGUFIndex) else open_gguf(source)


def _describe(index: GGUFIndex) -> str:
    """The file name for messages."""
    return str(index.path)


def _listed(names: list[str], limit: int = 8) -> str:
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more
