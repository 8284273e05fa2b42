"""The memory model of placement: what each piece of a model costs on a device, in bytes.

One responsibility: exact byte counts. :func:`model_units` turns a config into the placeable pieces in
order (``embedding``, ``layers.0`` .. ``layers.{n-1}``, ``head``) with their weight bytes, KV-cache bytes
per token and transient working memory; :mod:`glmrun.placement` plans with them. Also the parsing of
memory strings (``7.5GiB``) and device lists.

Memory model of one device (what ``torch.cuda.max_memory_allocated`` will reach)::

    peak        = max(weights + KV cache + activations,        # while generating
                      weights + the largest load-time extra)   # while a layer is quantized on load
    KV cache    = sum over its layers of 2 * kv_heads * head_dim * kv_dtype_bytes * context * batch
    activations = cuBLAS workspace + stream buffer + the largest transient of any one of its units

Activations are transient (a unit's temporaries are freed before the next unit runs), so only the largest
unit counts, plus the stream buffer (the hidden state the device received from the previous device, or
that its embedding produced, and its rotary tables) and the workspaces cuBLAS takes from torch's
allocator. Transients are evaluated for the two steps the engine runs: a prefill chunk (``prefill_batch``
sequences -- ``Engine.prefill`` runs one -- of ``t = min(prefill_chunk, context)`` tokens attending to
``L = context`` positions) and a decode step (``batch`` sequences of one token). With d = dtype bytes and
g = query heads per KV head, one sequence of a ChatGLM layer as :mod:`glmrun.model` computes it needs the
largest of:

* attention: ``t * (2*hidden + qkv + 4*heads*head_dim + kv_heads*head_dim) * d + t * heads * 4`` (norm
  output, fused qkv, rotated q and k, folded q, SDPA output and its float32 log-sum-exp, the re-laid-out
  output, the dense projection). One sequence alone goes through SDPA's causal kernels (flash, with the
  KV heads shared), which materialize nothing of size t x L. Several sequences in one step attend through
  a boolean mask [g*t, L] per sequence that the device keeps for all its layers, and SDPA makes an
  additive copy of it in the query dtype for each layer: ``+ t * L * g * (1 + d)``.
* MLP: ``t * (2*hidden + 4*ffn) * d`` (residual, norm output, the 2*ffn up projection, silu(gate) and its
  product with up); with quantized weights, the moment a chunk of the down projection is dequantized.
* head: the final norm of the chunk in float32 (``t * hidden * (3*4 + d)``) and one row of logits per
  sequence (``vocab * (d + 4)``: the matmul output and its float32 copy).

``tests/test_placement.py`` checks these predictions against ``torch.cuda.max_memory_allocated`` where a
GPU is present (4 ChatGLM2-6B layers, fp16, fp16 + INT8 and INT4, prefill in chunks then a decode step of
1 to 8 sequences). On an H200 with torch 2.11, with the cuBLAS workspace counted at 64 MiB, every
prediction was 9 to 59 MiB above the reading; it is counted at 96 MiB to keep a margin.
On the CPU, or on GPUs without flash
attention (before Ampere), torch's attention kernels differ and a plan is an estimate.

Outside torch's accounting the CUDA context and the libraries' kernels take memory too:
:data:`CUDA_CONTEXT_RESERVE` is kept below each card's total for them, so a :class:`DeviceSpec`'s budget
is what torch may allocate.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation

from .config import ModelConfig, QuantSpec
from .errors import InvalidArgumentError

__all__ = [
    "CPU_INDEX",
    "CUBLAS_WORKSPACE_BYTES",
    "CUDA_CONTEXT_RESERVE",
    "CUDA_LIBRARY_RESERVE",
    "DEFAULT_PREFILL_CHUNK",
    "DEQUANT_CHUNK_ELEMENTS",
    "GiB",
    "MIN_PREFILL_CHUNK",
    "MIN_USEFUL_CONTEXT",
    "MiB",
    "QUANTIZE_WORKSPACE_BYTES",
    "Transient",
    "Unit",
    "Workload",
    "format_bytes",
    "model_units",
    "parse_devices",
    "parse_max_memory",
    "parse_memory",
]

MiB = 1024**2
GiB = 1024**3

# Device memory torch cannot see, kept off each card's total: the CUDA context (it grows with the number
# of SMs: 527 MiB on a 132-SM H200 with torch 2.11, less on consumer cards) and the kernels cuBLAS loads
# at its first matmul (another 158 MiB there). When free memory can be read after the context exists,
# only the library part is still to come: CUDA_LIBRARY_RESERVE.
CUDA_CONTEXT_RESERVE = 512 * MiB
CUDA_LIBRARY_RESERVE = 192 * MiB
# cuBLAS/cuBLASLt workspaces come from torch's own allocator (about 2 x 32 MiB on Hopper), once per device;
# counted at 96 MiB to leave a margin over what was measured (see the module docstring).
CUBLAS_WORKSPACE_BYTES = 96 * MiB
DEFAULT_PREFILL_CHUNK = 2048  # Engine.prefill's default chunk
CPU_INDEX = -1  # DeviceSpec.index of the host (RAM) when there is no GPU
MIN_USEFUL_CONTEXT = 256  # a shorter context is not offered as a way out
MIN_PREFILL_CHUNK = 64  # nor a smaller prefill chunk
# glmrun.quant_kernels dequantizes at most this many weights at a time on a GPU (its _GPU_CHUNK_ELEMENTS).
DEQUANT_CHUNK_ELEMENTS = 1 << 25
# glmrun.quant quantizes 2**22 weights at a time; about four float32 copies of such a chunk are alive.
QUANTIZE_WORKSPACE_BYTES = 4 * 4 * (1 << 22)


# -- parsing user text -----------------------------------------------------------------------------

_MEMORY = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([A-Za-z]*)\s*")
_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


def parse_memory(text: str) -> int:
    """``"7.5GiB"``, ``"8GB"``, ``"512MiB"``, ``"1024"`` (bytes) -> bytes (rounded down)."""
    match = _MEMORY.fullmatch(text)
    if match is None:
        raise InvalidArgumentError(
            f"memory size {text!r} is not understood: write a number and a unit, e.g. 7.5GiB, 8GB, 512MiB "
            "or a plain number of bytes"
        )
    unit = match.group(2).lower()
    if unit not in _UNITS:
        raise InvalidArgumentError(
            f"memory size {text!r} has an unknown unit {match.group(2)!r}: use KiB, MiB, GiB, TiB (powers of "
            "1024) or KB, MB, GB, TB (powers of 1000), or no unit for bytes"
        )
    try:
        value = int(Decimal(match.group(1)) * _UNITS[unit])
    except InvalidOperation:  # pragma: no cover - the pattern admits only decimal numbers
        raise InvalidArgumentError(f"memory size {text!r} is not a number") from None
    if value <= 0:
        raise InvalidArgumentError(f"memory size {text!r} must be more than zero bytes")
    return value


def _parse_index(text: str, what: str) -> int:
    raw = text.strip()
    body = raw[5:] if raw.lower().startswith("cuda:") else raw
    if not body.isdigit():
        raise InvalidArgumentError(f"{what} {raw!r} is not a GPU index: write 0, 1, ... (or cuda:0, cuda:1, ...)")
    return int(body)


def parse_devices(text: str) -> list[int]:
    """``"0,1"`` -> ``[0, 1]``: the GPUs to use, in pipeline order."""
    parts = text.split(",")
    if not text.strip() or any(not p.strip() for p in parts):
        raise InvalidArgumentError(f"devices {text!r}: give GPU indices separated by commas, e.g. 0,1")
    devices = [_parse_index(p, "device") for p in parts]
    if len(set(devices)) != len(devices):
        raise InvalidArgumentError(f"devices {text!r} names a GPU twice")
    return devices


def parse_max_memory(text: str) -> dict[int, int]:
    """``"0=7.5GiB,1=11.5GiB"`` -> ``{0: 8053063680, 1: 12348030976}`` (bytes torch may use on each GPU)."""
    out: dict[int, int] = {}
    for part in text.split(","):
        index_text, sep, size_text = part.partition("=")
        if not sep or not index_text.strip() or not size_text.strip():
            raise InvalidArgumentError(
                f"max memory {text!r}: each entry is GPU=SIZE, separated by commas, e.g. 0=7.5GiB,1=11.5GiB "
                f"(the entry {part.strip()!r} is not)"
            )
        index = _parse_index(index_text, "max memory entry")
        if index in out:
            raise InvalidArgumentError(f"max memory {text!r} gives GPU {index} twice")
        out[index] = parse_memory(size_text)
    return out


def format_bytes(n: int | float) -> str:
    return f"{n / GiB:.2f} GiB"


# -- what is placed --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Workload:
    """What the device memory must hold: the context, how many sequences, how big a prefill step is."""

    context_length: int
    batch: int = 1  # sequences decoded together; each has its own KV cache of context_length positions
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK
    prefill_batch: int = 1  # sequences prefilled together (Engine.prefill: one)

    def __post_init__(self) -> None:
        for name in ("context_length", "batch", "prefill_chunk", "prefill_batch"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise InvalidArgumentError(f"{name.replace('_', ' ')} must be a positive integer, got {value!r}")

    def steps(self) -> tuple[tuple[int, int, bool], ...]:
        """(sequences, tokens each, masked) of a prefill chunk and of a decode step.

        Several sequences in one step attend through an explicit [rows, g*tokens, context] mask; one
        sequence alone uses SDPA's causal kernels, which build none.
        """
        chunk = min(self.prefill_chunk, self.context_length)
        return (self.prefill_batch, chunk, self.prefill_batch > 1), (self.batch, 1, self.batch > 1)


@dataclass(frozen=True)
class Transient:
    """Bytes alive together at one moment of a unit's forward.

    ``bytes = per_forward + rows * (per_row + t * per_token + L * per_context_token + t * L * per_token_pair)``
    for ``rows`` sequences of ``t`` tokens each attending to ``L`` positions; the last term only for a
    step that attends through an explicit mask.
    """

    label: str
    per_forward: int = 0
    per_row: int = 0
    per_token: int = 0
    per_context_token: int = 0
    per_token_pair: int = 0

    def bytes(self, rows: int, tokens: int, context: int, masked: bool = True) -> int:
        per_seq = (
            self.per_row
            + tokens * self.per_token
            + context * self.per_context_token
            + (tokens * context * self.per_token_pair if masked else 0)
        )
        return self.per_forward + rows * per_seq


@dataclass(frozen=True)
class Unit:
    """A placeable piece of the model: ``embedding``, ``layers.{i}`` or ``head`` (final norm + output layer)."""

    name: str
    weight_bytes: int
    kv_bytes_per_token: int = 0  # per sequence and cached position
    transients: tuple[Transient, ...] = ()
    stream_bytes_per_token: int = 0  # hidden state + rotary tables its device holds per token in flight
    load_extra_bytes: int = 0  # extra bytes while it is loaded (a float layer being quantized)

    def activation_bytes(self, workload: Workload) -> int:
        """The largest transient over a prefill chunk and a decode step."""
        return max(
            (
                t.bytes(rows, tokens, workload.context_length, masked)
                for rows, tokens, masked in workload.steps()
                for t in self.transients
            ),
            default=0,
        )


def _linear_bytes(out_features: int, in_features: int, dtype_bytes: int, quant: QuantSpec | None) -> int:
    if quant is None:
        return out_features * in_features * dtype_bytes
    from .quant import quantized_bytes  # imports torch: only needed for quantized sizes

    return quantized_bytes(in_features, out_features, quant)


def model_units(
    config: ModelConfig,
    *,
    dtype_bytes: int = 2,
    quant: QuantSpec | None = None,
    kv_dtype_bytes: int = 2,
) -> list[Unit]:
    """The units of ``config`` in order, sized exactly from its shapes.

    ``quant`` (default: the config's own ``quantization``) quantizes the layers' linears, and a separate
    output layer as ``quant.head_spec()`` says (INT8 by default); norms, biases and the embedding table stay
    at ``dtype_bytes``. A quantization not saved in the config happens on load, one float layer (and at the
    end the float output layer) at a time, which costs :attr:`Unit.load_extra_bytes`. With tied embeddings the
    head owns no matrix: its logits are computed on the embedding's device from the embedding table, so
    that small transient is counted with the embedding instead.
    """
    if dtype_bytes not in (2, 4) or kv_dtype_bytes not in (1, 2, 4):
        raise InvalidArgumentError(f"dtype bytes must be 2 or 4, got {dtype_bytes} (KV: {kv_dtype_bytes})")
    quant = quant if quant is not None else config.quantization
    on_load = quant is not None and config.quantization is None
    d = dtype_bytes
    h, f, v = config.hidden_size, config.ffn_hidden_size, config.padded_vocab_size
    heads, kv_heads, hd = config.num_attention_heads, config.num_kv_heads, config.head_dim
    q_width, group = heads * hd, heads // kv_heads
    linears = [(config.qkv_size, h), (h, q_width), (2 * f, h), (h, f)]  # (out, in), as the checkpoint
    biases = (config.qkv_size if config.add_qkv_bias else 0) + ((h + 2 * f + h) if config.add_bias_linear else 0)
    float_layer = sum(o * i for o, i in linears) * d + biases * d + 2 * h * d
    layer_bytes = sum(_linear_bytes(o, i, d, quant) for o, i in linears) + biases * d + 2 * h * d
    stream = h * d + config.rotary_dim * 4 + 8  # hidden state, cos+sin float32, int64 position

    # Attention, at its widest: norm output, fused qkv, rotated q and k, the query heads folded over the
    # shared KV heads (several rows), SDPA's output and float32 log-sum-exp, the re-laid-out output and the
    # dense projection. With several rows the device holds a boolean mask [rows, g*t, L] for all its layers
    # and SDPA makes an additive copy of it in the query dtype for each layer.
    cast = 2 * kv_heads * hd * d if kv_dtype_bytes != d else 0  # cached K/V cast to the compute dtype
    layer_transients = [
        Transient(
            "attention",
            per_token=(2 * h + config.qkv_size + 4 * q_width + kv_heads * hd) * d + heads * 4,
            per_context_token=cast,
            per_token_pair=group * (1 + d),
        ),
        Transient("mlp", per_token=(2 * h + 4 * f) * d),
    ]
    if quant is not None:
        # Rows of a weight are dequantized a chunk at a time (glmrun.quant_kernels.dequant_matmul); the worst
        # moment is the down projection: residual, norm output, up projection (2f), SwiGLU product (f) and the
        # output parts so far (<= hidden), next to one chunk's codes cast to d and scaled (+ unpacked nibbles).
        chunk = min(max(o * i for o, i in linears), DEQUANT_CHUNK_ELEMENTS)
        per_weight = 2 * d + (1 if quant.bits == 4 else 0)
        layer_transients.append(Transient("dequantize", per_forward=chunk * per_weight, per_token=(3 * h + 3 * f) * d))

    def layer(i: int) -> Unit:
        return Unit(
            f"layers.{i}",
            weight_bytes=layer_bytes,
            kv_bytes_per_token=2 * kv_heads * hd * kv_dtype_bytes,
            transients=tuple(layer_transients),
            stream_bytes_per_token=stream,
            load_extra_bytes=float_layer - layer_bytes + QUANTIZE_WORKSPACE_BYTES if on_load else 0,
        )

    logits = Transient("logits", per_row=h * d + v * (d + 4))
    embedding = Unit(
        "embedding",
        weight_bytes=v * h * d,
        transients=(Transient("token ids", per_token=8),) + ((logits,) if config.tie_word_embeddings else ()),
        stream_bytes_per_token=stream,
    )
    head_quant = quant.head_spec() if quant is not None else None
    out_layer = 0 if config.tie_word_embeddings else _linear_bytes(v, h, d, head_quant)
    head_load_extra = v * h * d - out_layer + QUANTIZE_WORKSPACE_BYTES if on_load and head_quant and out_layer else 0
    head_transients = [Transient("final norm", per_token=h * (3 * 4 + d))]
    if not config.tie_word_embeddings:
        head_transients.append(Transient("logits", per_token=h * d, per_row=v * (d + 4)))
    head = Unit(
        "head",
        weight_bytes=h * d + out_layer,
        transients=tuple(head_transients),
        stream_bytes_per_token=stream,
        load_extra_bytes=head_load_extra,
    )
    return [embedding, *(layer(i) for i in range(config.num_layers)), head]


# -- devices and plans -----------------------------------------------------------------------------
