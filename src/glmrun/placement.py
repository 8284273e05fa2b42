"""Placement: which piece of the model goes on which device, decided from memory before anything loads.

One responsibility: arithmetic on byte counts. :func:`model_units` turns a config into the placeable
pieces in order (``embedding``, ``layers.0`` .. ``layers.{n-1}``, ``head``) with their exact weight bytes,
KV-cache bytes per token and transient working memory; :func:`plan_placement` gives each device one
contiguous run of them, in device order, so that every device's predicted peak stays within its budget
and the smallest relative headroom is as large as possible. Nothing here calls ``torch.cuda``: the caller
reads the cards (``glmrun doctor``, the loader) and this module only decides, so it is tested on the CPU
with made-up GPUs.

The memory model (what each piece costs) lives in :mod:`glmrun.placement_units`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .config import ModelConfig, QuantSpec
from .errors import InvalidArgumentError, PlacementError
from .placement_units import (  # re-exported: the planner's public API includes its inputs
    CPU_INDEX,
    CUBLAS_WORKSPACE_BYTES,
    CUDA_CONTEXT_RESERVE,
    CUDA_LIBRARY_RESERVE,
    DEFAULT_PREFILL_CHUNK,
    MIN_PREFILL_CHUNK,
    MIN_USEFUL_CONTEXT,
    GiB,
    MiB,
    Transient,
    Unit,
    Workload,
    format_bytes,
    model_units,
    parse_devices,
    parse_max_memory,
    parse_memory,
)

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
