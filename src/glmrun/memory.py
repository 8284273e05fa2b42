"""Device memory: friendly out-of-memory errors, per-device peak readings, and giving memory back."""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator
from typing import Any

import torch

from .errors import OutOfMemoryError

__all__ = ["raise_friendly_oom", "cuda_devices_of", "memory_snapshot", "reset_peaks", "release"]

GiB = 1024**3


def cuda_devices_of(module: torch.nn.Module) -> list[torch.device]:
    seen: dict[torch.device, None] = {}
    for p in module.parameters():
        if p.device.type == "cuda":
            seen.setdefault(p.device, None)
    for b in module.buffers():
        if b.device.type == "cuda":
            seen.setdefault(b.device, None)
    return list(seen)


def memory_snapshot(devices: list[torch.device]) -> dict[str, dict[str, Any]]:
    """Allocated / reserved / peak bytes for each CUDA device (empty on the CPU)."""
    out: dict[str, dict[str, int]] = {}
    for dev in devices:
        if dev.type != "cuda":
            continue
        out[str(dev)] = {
            "allocated": torch.cuda.memory_allocated(dev),
            "reserved": torch.cuda.memory_reserved(dev),
            "peak_allocated": torch.cuda.max_memory_allocated(dev),
            "peak_reserved": torch.cuda.max_memory_reserved(dev),
        }
    return out


def reset_peaks(devices: list[torch.device]) -> None:
    for dev in devices:
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)


def release() -> None:
    """Return cached blocks to the driver after tensors were dropped.

    cuBLAS keeps a workspace per (handle, stream) in torch's allocator: the graph-capture side streams
    add some, and on an H200 they were the ~99 MiB still allocated after ``close()``; drop them too.
    """
    gc.collect()
    if torch.cuda.is_available():
        clear = getattr(torch._C, "_cuda_clearCublasWorkspaces", None)
        if clear is not None:
            clear()
        torch.cuda.empty_cache()


@contextlib.contextmanager
def raise_friendly_oom(owner: Any = None) -> Iterator[None]:
    """Turn torch's out-of-memory error into :class:`OutOfMemoryError` with the numbers and advice.

    The temporaries of the failed step are dropped and the allocator cache emptied before raising,
    so the model stays usable and memory returns to where it was before the request.
    """
    try:
        yield
    except torch.OutOfMemoryError as exc:
        message = str(exc).splitlines()[0] if str(exc) else "out of memory"
        del exc
        release()
        details = []
        if torch.cuda.is_available():
            for i in range(torch.cuda.device_count()):
                free, total = torch.cuda.mem_get_info(i)
                details.append(f"cuda:{i} {free / GiB:.2f} GiB free of {total / GiB:.2f} GiB")
        raise OutOfMemoryError(
            f"the device ran out of memory during this request ({message}). "
            + ("; ".join(details) + ". " if details else "")
            + "Use a shorter prompt or fewer new tokens, a smaller batch, --quantize int8/int4, or another GPU "
            "(--devices / --max-memory). The model is still loaded and usable."
        ) from None
