"""Placement: which piece of the model goes on which device, decided from memory before anything loads.

One responsibility: arithmetic on byte counts. :func:`model_units` turns a config into the placeable
pieces in order (``embedding``, ``layers.0`` .. ``layers.{n-1}``, ``head``) with their exact weight bytes,
KV-cache bytes per token and transient working memory; :func:`plan_placement` gives each device one
contiguous run of them, in device order, so that every device's predicted peak stays within its budget
and the smallest relative headroom is as large as possible. Nothing here calls ``torch.cuda``: the caller
reads the cards (``glmrun doctor``, the loader) and this module only decides, so it is tested on the CPU
with made-up GPUs.

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

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any

from .config import ModelConfig, QuantSpec
from .errors import InvalidArgumentError, PlacementError

__all__ = [
    "CUBLAS_WORKSPACE_BYTES",
    "CUDA_CONTEXT_RESERVE",
    "CUDA_LIBRARY_RESERVE",
    "DEFAULT_PREFILL_CHUNK",
    "CPU_INDEX",
    "DeviceSpec",
    "DevicePlan",
    "NoFitError",
    "Plan",
    "Suggestion",
    "Transient",
    "Unit",
    "Workload",
    "device_budget",
    "even_split",
    "format_bytes",
    "model_units",
    "parse_devices",
    "parse_max_memory",
    "parse_memory",
    "plan_from_assignment",
    "plan_model",
    "plan_placement",
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
    quantize_output_layer: bool = False,
) -> list[Unit]:
    """The units of ``config`` in order, sized exactly from its shapes.

    ``quant`` (default: the config's own ``quantization``) quantizes the layers' linears; norms, biases
    and the embedding table stay at ``dtype_bytes``, and so does the output layer unless
    ``quantize_output_layer`` (the loader keeps it exact). A quantization not saved in the config happens
    on load, one float layer at a time, which costs :attr:`Unit.load_extra_bytes`. With tied embeddings the
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
    out_layer = 0 if config.tie_word_embeddings else _linear_bytes(v, h, d, quant if quantize_output_layer else None)
    head_transients = [Transient("final norm", per_token=h * (3 * 4 + d))]
    if not config.tie_word_embeddings:
        head_transients.append(Transient("logits", per_token=h * d, per_row=v * (d + 4)))
    head = Unit(
        "head", weight_bytes=h * d + out_layer, transients=tuple(head_transients), stream_bytes_per_token=stream
    )
    return [embedding, *(layer(i) for i in range(config.num_layers)), head]


# -- devices and plans -----------------------------------------------------------------------------


@dataclass(frozen=True)
class DeviceSpec:
    """A device to place on. ``budget_bytes`` is what torch may allocate there (see CUDA_CONTEXT_RESERVE)."""

    index: int  # CUDA ordinal, or CPU_INDEX for host memory
    name: str
    total_bytes: int
    budget_bytes: int
    reserve_bytes: int = CUDA_CONTEXT_RESERVE  # expected on top of the budget; 0 for the CPU
    workspace_bytes: int = CUBLAS_WORKSPACE_BYTES  # inside the budget, once the device computes; 0 for the CPU

    @property
    def label(self) -> str:
        return "cpu" if self.index == CPU_INDEX else f"cuda:{self.index}"


def device_budget(
    total_bytes: int,
    *,
    max_memory: int | None = None,
    free_bytes: int | None = None,
    reserve_bytes: int = CUDA_CONTEXT_RESERVE,
) -> int:
    """The user's ``max_memory`` if given; else the card minus the reserve, and no more than is free now.

    ``free_bytes`` is read once this process's CUDA context exists (``torch.cuda.mem_get_info`` makes it),
    so only :data:`CUDA_LIBRARY_RESERVE` is still to come out of it.
    """
    if max_memory is not None:
        return max_memory
    budget = total_bytes - reserve_bytes
    if free_bytes is not None:
        budget = min(budget, free_bytes - CUDA_LIBRARY_RESERVE)
    return max(0, budget)


def _layer_run(run: list[int]) -> str:
    return f"layer {run[0]}" if len(run) == 1 else f"layers {run[0]}-{run[-1]}"


@dataclass(frozen=True)
class DevicePlan:
    """What one device holds and its predicted peak."""

    device: DeviceSpec
    units: tuple[str, ...]  # contiguous, in model order
    weight_bytes: int
    kv_bytes: int
    activation_bytes: int
    load_extra_bytes: int
    reserve_bytes: int
    predicted_peak_bytes: int
    budget_bytes: int

    @property
    def fits(self) -> bool:
        return self.predicted_peak_bytes <= self.budget_bytes

    @property
    def utilization(self) -> float:
        if self.budget_bytes <= 0:
            return 0.0 if self.predicted_peak_bytes == 0 else math.inf
        return self.predicted_peak_bytes / self.budget_bytes

    @property
    def num_layers(self) -> int:
        return sum(name.startswith("layers.") for name in self.units)

    @property
    def span(self) -> str:
        """``"embedding, layers 0-9"``: the units in model order, runs of layers folded."""
        parts: list[str] = []
        run: list[int] = []
        for name in (*self.units, ""):
            if name.startswith("layers."):
                i = int(name.split(".", 1)[1])
                if run and i != run[-1] + 1:
                    parts.append(_layer_run(run))
                    run = []
                run.append(i)
                continue
            if run:
                parts.append(_layer_run(run))
                run = []
            if name:
                parts.append(name)
        return ", ".join(parts) or "-"

    def to_json(self) -> dict[str, Any]:
        return {
            "index": self.device.index,
            "label": self.device.label,
            "name": self.device.name,
            "total_bytes": self.device.total_bytes,
            "units": list(self.units),
            "num_layers": self.num_layers,
            "weight_bytes": self.weight_bytes,
            "kv_bytes": self.kv_bytes,
            "activation_bytes": self.activation_bytes,
            "load_extra_bytes": self.load_extra_bytes,
            "reserve_bytes": self.reserve_bytes,
            "predicted_peak_bytes": self.predicted_peak_bytes,
            "budget_bytes": self.budget_bytes,
            "utilization": round(self.utilization, 4),
            "fits": self.fits,
        }


@dataclass(frozen=True)
class Plan:
    """Unit name -> device index, and each device's share with its predicted peak."""

    assignment: dict[str, int]
    per_device: list[DevicePlan]
    workload: Workload

    @property
    def fits(self) -> bool:
        return all(dp.fits for dp in self.per_device)

    @property
    def max_utilization(self) -> float:
        return max(dp.utilization for dp in self.per_device)

    @property
    def layer_devices(self) -> list[int]:
        """Device index of layer 0, 1, ... (what the loader and the KV cache take)."""
        layers = sorted((int(n.split(".", 1)[1]), dev) for n, dev in self.assignment.items() if n.startswith("layers."))
        return [dev for _, dev in layers]

    def summary(self) -> str:
        w = self.workload
        head = ["device", "name", "units", "layers", "weights", "KV", "activ.", "peak", "budget", "use"]
        rows = [head]
        for dp in self.per_device:
            rows.append(
                [
                    dp.device.label,
                    dp.device.name,
                    dp.span,
                    str(dp.num_layers),
                    *(
                        f"{x / GiB:.2f}"
                        for x in (
                            dp.weight_bytes,
                            dp.kv_bytes,
                            dp.activation_bytes,
                            dp.predicted_peak_bytes,
                            dp.budget_bytes,
                        )
                    ),
                    f"{dp.utilization:.0%}" + ("" if dp.fits else " OVER"),
                ]
            )
        totals = [
            sum(getattr(dp, k) for dp in self.per_device)
            for k in ("weight_bytes", "kv_bytes", "activation_bytes", "predicted_peak_bytes", "budget_bytes")
        ]
        rows.append(
            [
                "total",
                "",
                "",
                str(sum(dp.num_layers for dp in self.per_device)),
                *(f"{x / GiB:.2f}" for x in totals),
                "",
            ]
        )
        widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
        reserve = max(dp.reserve_bytes for dp in self.per_device)
        lines = [
            f"context {w.context_length} tokens x {w.batch} sequence(s), prefill chunk "
            f"{min(w.prefill_chunk, w.context_length)}; sizes in GiB; peak = weights + KV + activations"
            + (f" (+ about {format_bytes(reserve)} of CUDA context per GPU, outside the budget)" if reserve else ""),
        ]
        for r in rows:
            lines.append("  ".join(c.ljust(widths[i]) if i < 3 else c.rjust(widths[i]) for i, c in enumerate(r)))
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return {
            "fits": self.fits,
            "max_utilization": round(self.max_utilization, 4),
            "context_length": self.workload.context_length,
            "batch": self.workload.batch,
            "prefill_chunk": self.workload.prefill_chunk,
            "prefill_batch": self.workload.prefill_batch,
            "devices": [dp.to_json() for dp in self.per_device],
            "assignment": dict(self.assignment),
        }


@dataclass(frozen=True)
class Suggestion:
    """A change that makes the model fit, with the plan that proves it."""

    kind: str  # "quantize", "prefill_chunk", "context" or "add_device"
    value: str | int  # "int8"/"int4", a chunk or context length in tokens, or the added device's total bytes
    option: str  # the command-line way to ask for it
    description: str
    plan: Plan

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "value": self.value,
            "option": self.option,
            "description": self.description,
            "max_utilization": round(self.plan.max_utilization, 4),
        }


class NoFitError(PlacementError):
    """No split fits the budgets; carries the numbers of the best attempt and the ways out."""

    def __init__(self, message: str, *, attempt: Plan, suggestions: list[Suggestion]):
        super().__init__(message)
        self.attempt = attempt  # the split with the lowest largest utilization, over budget somewhere
        self.needed_bytes = {dp.device.index: dp.predicted_peak_bytes for dp in attempt.per_device}
        self.available_bytes = {dp.device.index: dp.budget_bytes for dp in attempt.per_device}
        self.total_needed_bytes = sum(self.needed_bytes.values())
        self.total_available_bytes = sum(self.available_bytes.values())
        self.suggestions = suggestions

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": "no_fit",
            "message": str(self),
            "needed_bytes": {str(k): n for k, n in self.needed_bytes.items()},
            "available_bytes": {str(k): n for k, n in self.available_bytes.items()},
            "total_needed_bytes": self.total_needed_bytes,
            "total_available_bytes": self.total_available_bytes,
            "attempt": self.attempt.to_json(),
        }


# -- the planner -----------------------------------------------------------------------------------


def _device_plan(device: DeviceSpec, units: Sequence[Unit], w: Workload) -> DevicePlan:
    weight = sum(u.weight_bytes for u in units)
    kv = sum(u.kv_bytes_per_token for u in units) * w.context_length * w.batch
    in_flight = max(rows * tokens for rows, tokens, _ in w.steps())
    stream = max((u.stream_bytes_per_token for u in units), default=0) * in_flight
    workspace = device.workspace_bytes if units else 0
    act = workspace + stream + max((u.activation_bytes(w) for u in units), default=0)
    load = max((u.load_extra_bytes for u in units), default=0)
    peak = max(weight + kv + act, weight + workspace + load) if units else 0
    return DevicePlan(
        device, tuple(u.name for u in units), weight, kv, act, load, device.reserve_bytes, peak, device.budget_bytes
    )


def _peak_table(units: Sequence[Unit], w: Workload) -> list[list[int]]:
    """peak[a][b]: predicted peak of a device holding units[a:b], less its workspace (0 when empty)."""
    n = len(units)
    acts = [u.activation_bytes(w) for u in units]
    in_flight = max(rows * tokens for rows, tokens, _ in w.steps())
    table = [[0] * (n + 1) for _ in range(n + 1)]
    for a in range(n):
        weight = kv = act = stream = load = 0
        for b in range(a + 1, n + 1):
            u = units[b - 1]
            weight += u.weight_bytes
            kv += u.kv_bytes_per_token * w.context_length * w.batch
            act = max(act, acts[b - 1])
            stream = max(stream, u.stream_bytes_per_token)
            load = max(load, u.load_extra_bytes)
            table[a][b] = max(weight + kv + stream * in_flight + act, weight + load)
    return table


def _util(peak: int, device: tuple[int, int]) -> float:
    """peak / budget of a device ``(budget, workspace)`` holding units whose table peak is ``peak``."""
    if peak == 0:
        return 0.0
    budget, workspace = device
    return (peak + workspace) / budget if budget > 0 else math.inf


def _min_max_utilization(table: list[list[int]], devices: Sequence[tuple[int, int]]) -> float:
    """Smallest achievable max over devices of peak/budget, splitting the units into contiguous runs."""
    n = len(table) - 1
    best = [_util(table[0][k], devices[0]) for k in range(n + 1)]
    for device in devices[1:]:
        best = [min(max(best[j], _util(table[j][k], device)) for j in range(k + 1)) for k in range(n + 1)]
    return best[n]


def _balanced_cuts(table: list[list[int]], devices: Sequence[tuple[int, int]], cap: float) -> list[int]:
    """Cut points minimizing the sum of squared utilizations with every device at most ``cap``."""
    n = len(table) - 1
    limit = cap * (1 + 1e-12)
    inf = math.inf
    cost = [0.0] + [inf] * n  # after zero devices only the empty prefix is possible
    back: list[list[int]] = []
    for budget, workspace in devices:
        new, choice = [inf] * (n + 1), [0] * (n + 1)
        for k in range(n + 1):
            for j in range(k + 1):
                if cost[j] == inf:
                    continue
                u = _util(table[j][k], (budget, workspace))
                if u > limit or (cap <= 1 and j < k and table[j][k] + workspace > budget):
                    continue
                c = cost[j] + u * u
                if c < new[k]:
                    new[k], choice[k] = c, j
        cost = new
        back.append(choice)
    cuts = [n]
    for choice in reversed(back):
        cuts.append(choice[cuts[-1]])
    return cuts[::-1]


def _check_inputs(units: Sequence[Unit], devices: Sequence[DeviceSpec]) -> None:
    if not units:
        raise InvalidArgumentError("nothing to place: the unit list is empty")
    if not devices:
        raise InvalidArgumentError("no devices to place on")
    names = [u.name for u in units]
    if len(set(names)) != len(names):
        raise InvalidArgumentError(f"unit names must be unique, got {names}")
    indices = [d.index for d in devices]
    if len(set(indices)) != len(indices):
        raise InvalidArgumentError(f"a device is listed twice: {indices}")


def _best_plan(units: Sequence[Unit], devices: Sequence[DeviceSpec], w: Workload) -> Plan:
    table = _peak_table(units, w)
    bins = _bins(devices)
    cap = _min_max_utilization(table, bins)
    if cap == math.inf:  # a device with no budget at all: plan the attempt as if it had one byte
        bins = [(max(b, 1), ws) for b, ws in bins]
        cap = _min_max_utilization(table, bins)
    cuts = _balanced_cuts(table, bins, cap)
    assignment: dict[str, int] = {}
    per_device = []
    for device, a, b in zip(devices, cuts[:-1], cuts[1:], strict=True):
        for u in units[a:b]:
            assignment[u.name] = device.index
        per_device.append(_device_plan(device, units[a:b], w))
    return Plan(assignment, per_device, w)


def _bins(devices: Sequence[DeviceSpec]) -> list[tuple[int, int]]:
    return [(d.budget_bytes, d.workspace_bytes) for d in devices]


def _fits(units: Sequence[Unit], devices: Sequence[DeviceSpec], w: Workload) -> bool:
    return _min_max_utilization(_peak_table(units, w), _bins(devices)) <= 1.0


def plan_placement(
    units: Sequence[Unit],
    devices: Sequence[DeviceSpec],
    *,
    context_length: int,
    batch: int = 1,
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
    prefill_batch: int = 1,
    alternatives: Mapping[str, Sequence[Unit]] | None = None,
) -> Plan:
    """Split ``units`` (in order) into one contiguous run per device (in order), within every budget.

    Among the splits that fit, it takes the one with the lowest largest utilization (peak / budget): the
    card closest to its limit is where a longer prompt or fragmentation would fail first, so the plan
    maximizes the smallest relative headroom, which spreads the load in proportion to the budgets. Ties
    are broken by the smallest sum of squared utilizations, so no device idles while another works hard.
    A device may receive nothing when the units are too coarse to share. Raises :class:`NoFitError` when
    no split fits; its suggestions were each checked by planning again: the ``alternatives`` (other unit
    lists, e.g. ``{"int4": ...}``), the largest prefill chunk and the longest context that fit, and the
    smallest device to add.
    """
    w = Workload(context_length, batch, prefill_chunk, prefill_batch)
    _check_inputs(units, devices)
    plan = _best_plan(units, devices, w)
    if plan.fits:
        return plan
    suggestions = _suggestions(units, devices, w, alternatives or {})
    raise NoFitError(_no_fit_message(plan, suggestions), attempt=plan, suggestions=suggestions)


def plan_from_assignment(
    units: Sequence[Unit],
    devices: Sequence[DeviceSpec],
    assignment: Mapping[str, int],
    *,
    context_length: int,
    batch: int = 1,
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
    prefill_batch: int = 1,
) -> Plan:
    """The predicted peaks of a given assignment (e.g. :func:`even_split`), fitting or not; never raises for size."""
    w = Workload(context_length, batch, prefill_chunk, prefill_batch)
    _check_inputs(units, devices)
    known = {d.index for d in devices}
    missing = [u.name for u in units if u.name not in assignment]
    stray = sorted({dev for dev in assignment.values() if dev not in known})
    if missing or stray:
        raise InvalidArgumentError(f"assignment leaves out {missing} or names unknown devices {stray}")
    per_device = [_device_plan(d, [u for u in units if assignment[u.name] == d.index], w) for d in devices]
    return Plan({u.name: assignment[u.name] for u in units}, per_device, w)


def plan_model(
    config: ModelConfig,
    devices: Sequence[DeviceSpec],
    *,
    dtype_bytes: int = 2,
    quant: QuantSpec | None = None,
    kv_dtype_bytes: int | None = None,
    context_length: int | None = None,
    batch: int = 1,
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
    prefill_batch: int = 1,
) -> Plan:
    """:func:`model_units` + :func:`plan_placement`, with INT8/INT4 offered as alternatives when not fitting.

    ``kv_dtype_bytes`` defaults to ``dtype_bytes`` (the engine keeps the cache in the weights' dtype) and
    ``context_length`` to the model's ``seq_length``.
    """
    kv = dtype_bytes if kv_dtype_bytes is None else kv_dtype_bytes
    units = model_units(config, dtype_bytes=dtype_bytes, quant=quant, kv_dtype_bytes=kv)
    current = quant if quant is not None else config.quantization
    alternatives: dict[str, list[Unit]] = {}
    if config.quantization is None:  # a saved quantized checkpoint cannot be re-quantized on load
        for bits in (8, 4):
            if current is None or bits < current.bits:
                spec = QuantSpec(bits, current.group_size if current else 128)
                try:
                    alternatives[spec.name] = model_units(
                        config, dtype_bytes=dtype_bytes, quant=spec, kv_dtype_bytes=kv
                    )
                except InvalidArgumentError:  # the group size does not divide this model's widths
                    continue
    return plan_placement(
        units,
        devices,
        context_length=config.seq_length if context_length is None else context_length,
        batch=batch,
        prefill_chunk=prefill_chunk,
        prefill_batch=prefill_batch,
        alternatives=alternatives,
    )


# -- when nothing fits -----------------------------------------------------------------------------


def _suggestions(
    units: Sequence[Unit], devices: Sequence[DeviceSpec], w: Workload, alternatives: Mapping[str, Sequence[Unit]]
) -> list[Suggestion]:
    out = []
    for label, alt in alternatives.items():
        if _fits(alt, devices, w):
            plan = _best_plan(alt, devices, w)
            text = f"quantize the weights to {label} (the tightest device at {plan.max_utilization:.0%} of its budget)"
            out.append(Suggestion("quantize", label, f"--quantize {label}", text, plan))
    chunk = min(w.prefill_chunk, w.context_length)
    best = _largest(MIN_PREFILL_CHUNK, chunk - 1, lambda c: _fits(units, devices, _replace(w, prefill_chunk=c)))
    if best is not None:
        text = f"prefill long prompts {best} tokens at a time instead of {chunk} (less working memory, a bit slower)"
        plan = _best_plan(units, devices, _replace(w, prefill_chunk=best))
        out.append(Suggestion("prefill_chunk", best, f"--prefill-chunk {best}", text, plan))
    best = _largest(MIN_USEFUL_CONTEXT, w.context_length - 1, lambda c: _fits(units, devices, _replace(w, context=c)))
    if best is not None:
        text = f"plan for at most {best} tokens of context instead of {w.context_length}"
        plan = _best_plan(units, devices, _replace(w, context=best))
        out.append(Suggestion("context", best, f"--context {best}", text, plan))
    if all(d.index != CPU_INDEX for d in devices):  # glmrun does not pipeline between the CPU and GPUs
        extra = _smallest_extra_device(units, devices, w)
        text = (
            f"add a GPU with at least {format_bytes(extra.total_bytes)} after the others "
            f"({format_bytes(extra.budget_bytes)} for glmrun once the CUDA context is made)"
        )
        plan = _best_plan(units, [*devices, extra], w)
        option = f"add a {format_bytes(extra.total_bytes)} GPU"
        out.append(Suggestion("add_device", extra.total_bytes, option, text, plan))
    return out


def _largest(lo: int, hi: int, fits: Callable[[int], bool]) -> int | None:
    """The largest value in [lo, hi] for which ``fits`` holds (it must hold below any value it holds for)."""
    if hi < lo or not fits(lo):
        return None
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    return lo


def _replace(w: Workload, *, context: int | None = None, prefill_chunk: int | None = None) -> Workload:
    return Workload(context or w.context_length, w.batch, prefill_chunk or w.prefill_chunk, w.prefill_batch)


def _smallest_extra_device(units: Sequence[Unit], devices: Sequence[DeviceSpec], w: Workload) -> DeviceSpec:
    index = max(d.index for d in devices) + 1

    def card(mib: int) -> DeviceSpec:
        return DeviceSpec(index, "additional GPU", mib * MiB, mib * MiB - CUDA_CONTEXT_RESERVE)

    alone = _device_plan(card(0), units, w).predicted_peak_bytes  # such a card could hold everything by itself
    lo, hi = CUDA_CONTEXT_RESERVE // MiB + 1, (alone + CUDA_CONTEXT_RESERVE) // MiB + 1
    while lo < hi:  # the smallest size in MiB that fits
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if _fits(units, [*devices, card(mid)], w) else (mid + 1, hi)
    return card(lo)


def _no_fit_message(attempt: Plan, suggestions: list[Suggestion]) -> str:
    w = attempt.workload
    needed = sum(dp.predicted_peak_bytes for dp in attempt.per_device)
    available = sum(dp.budget_bytes for dp in attempt.per_device)
    lines = [
        f"the model does not fit at {w.context_length} tokens of context x {w.batch} sequence(s): the best split "
        f"needs {format_bytes(needed)} (weights, KV cache and each device's working memory) and the budgets add "
        f"up to {format_bytes(available)}:"
    ]
    for dp in attempt.per_device:
        lines.append(
            f"  {dp.device.label} ({dp.device.name}): needs {format_bytes(dp.predicted_peak_bytes)} for "
            f"{dp.span}, budget {format_bytes(dp.budget_bytes)}"
        )
    lines.append("Each of these would fit (checked by planning again):")
    lines.extend(f"  {s.option}: {s.description}" for s in suggestions)
    return "\n".join(lines)


# -- the official split, for comparison -------------------------------------------------------------


def even_split(num_layers: int, num_devices: int) -> dict[str, int]:
    """The split of the official ``load_model_on_gpus`` (THUDM/ChatGLM2-6B ``utils.py``), in our unit names.

    ``auto_configure_device_map`` counts the embedding and the final norm + output layer as one "layer"
    each, puts both on GPU 0, and gives every GPU ``(num_layers + 2) / num_gpus`` such slots in order,
    starting GPU 0 with those two already used. It looks at layer counts only: not at the cards' sizes,
    the KV cache or the activations. Here ``num_layers`` replaces the official hard-coded 28.
    https://github.com/THUDM/ChatGLM2-6B/blob/main/utils.py
    """
    if num_layers <= 0 or num_devices <= 0:
        raise InvalidArgumentError(f"need at least one layer and one device, got {num_layers} and {num_devices}")
    slots = (num_layers + 2) / num_devices
    assignment = {"embedding": 0, "head": 0}
    used, device = 2, 0
    for i in range(num_layers):
        if used >= slots:
            device, used = device + 1, 0
        if device >= num_devices:  # pragma: no cover - the arithmetic keeps it below num_devices
            raise InvalidArgumentError(f"the even split ran out of devices at layer {i}")
        assignment[f"layers.{i}"] = device
        used += 1
    return assignment
