"""The small apply step of multi-GPU placement: read the GPUs, plan with :mod:`glmrun.placement`.

The plan itself is pure (tested on the CPU with made-up GPUs); this module only asks torch what the
real devices are, turns the plan into one ``torch.device`` per layer for the loader, and compares the
prediction with what the devices report after loading and generating.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .config import ModelConfig, QuantSpec, load_chatglm_config
from .errors import DeviceError
from .loader import Checkpoint, parse_dtype
from .memory import memory_snapshot
from .placement import DeviceSpec, Plan, device_budget, plan_model

__all__ = ["checkpoint_config", "cuda_device_specs", "plan_for_checkpoint", "predicted_vs_actual"]


def checkpoint_config(ckpt: Checkpoint) -> ModelConfig:
    if ckpt.kind == "gguf":
        from .gguf_file import load_gguf_config

        return load_gguf_config(ckpt.path)
    return load_chatglm_config(ckpt.path)


def cuda_device_specs(indices: Sequence[int] | None, max_memory: dict[int, int] | None) -> list[DeviceSpec]:
    """DeviceSpecs of the chosen GPUs (all, by default), budgets from ``max_memory`` or free memory."""
    if not torch.cuda.is_available():
        raise DeviceError("--devices / --max-memory need CUDA GPUs, and this torch sees none; use --device cpu")
    count = torch.cuda.device_count()
    chosen = list(indices) if indices else (sorted(max_memory) if max_memory else list(range(count)))
    specs = []
    for i in chosen:
        if not 0 <= i < count:
            raise DeviceError(f"GPU {i} does not exist: this machine has {count} GPU(s) (0..{count - 1})")
        free, total = torch.cuda.mem_get_info(i)
        budget = device_budget(total, max_memory=(max_memory or {}).get(i), free_bytes=free)
        specs.append(DeviceSpec(i, torch.cuda.get_device_name(i), total, budget))
    return specs


def plan_for_checkpoint(
    ckpt: Checkpoint,
    *,
    dtype: str | torch.dtype | None,
    quant: QuantSpec | None,
    devices: Sequence[int] | None,
    max_memory: dict[int, int] | None,
    context: int | None,
    prefill_chunk: int,
) -> Plan:
    """Plan the checkpoint over the GPUs; raises PlacementError (with what would fit) when it cannot."""
    config = checkpoint_config(ckpt)
    specs = cuda_device_specs(devices, max_memory)
    torch_dtype = parse_dtype(dtype, torch.device("cuda", specs[0].index), config)
    dtype_bytes = torch.empty((), dtype=torch_dtype).element_size()
    return plan_model(
        config,
        specs,
        dtype_bytes=dtype_bytes,
        quant=quant,
        context_length=min(context or config.seq_length, config.seq_length),
        prefill_chunk=prefill_chunk,
    )


def predicted_vs_actual(plan: Plan | None, devices: Sequence[torch.device]) -> dict[str, dict[str, Any]]:
    """Per GPU: the planned peak next to torch's allocated / peak-allocated / reserved bytes."""
    out: dict[str, dict[str, Any]] = dict(memory_snapshot(list(devices)))
    for dp in plan.per_device if plan else ():
        row = out.get(f"cuda:{dp.device.index}")
        if row is not None:
            row.update(predicted_peak=dp.predicted_peak_bytes, budget=dp.budget_bytes, layers=dp.span)
    return out
