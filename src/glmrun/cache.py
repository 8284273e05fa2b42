"""The KV cache: preallocated key/value buffers, passed explicitly to the model.

One buffer pair per layer, shaped ``[rows, kv_heads, max_len, head_dim]`` and living on that layer's
device. A *row* holds one sequence. The cache never grows, so shapes stay static (CUDA graphs and
``torch.compile`` stay possible) and the memory a context costs is known before generation starts.
Which positions of a row are valid is tracked by the caller (engine / scheduler), not here.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .config import ModelConfig

__all__ = ["KVCache"]


class KVCache:
    """Key/value buffers for ``rows`` sequences of up to ``max_len`` tokens each."""

    def __init__(
        self,
        config: ModelConfig,
        *,
        rows: int,
        max_len: int,
        dtype: torch.dtype,
        devices: Sequence[torch.device],
    ) -> None:
        if len(devices) != config.num_layers:
            raise ValueError(f"need one device per layer ({config.num_layers}), got {len(devices)}")
        if rows <= 0 or max_len <= 0:
            raise ValueError(f"rows and max_len must be positive, got {rows} and {max_len}")
        self.rows = rows
        self.max_len = max_len
        self.dtype = dtype
        shape = (rows, config.num_kv_heads, max_len, config.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=dev) for dev in devices]
        self.v = [torch.zeros(shape, dtype=dtype, device=dev) for dev in devices]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.k, *self.v))

    def write(self, layer: int, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor, first_row: int = 0) -> None:
        """Store ``k``/``v`` ([B, T, kv_heads, head_dim]) of rows first_row.. at ``positions`` ([B, T])."""
        rows = torch.arange(first_row, first_row + k.shape[0], device=k.device)[:, None]  # [B, 1]
        self.k[layer][rows, :, positions] = k.to(self.dtype)  # index dims first: [B, T, kvh, hd]
        self.v[layer][rows, :, positions] = v.to(self.dtype)

    def buffers(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole key and value buffers of one layer, ``[rows, kv_heads, max_len, head_dim]`` (fused kernels)."""
        return self.k[layer], self.v[layer]

    def view(self, layer: int, batch: int, length: int, first_row: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of ``batch`` rows from ``first_row``, positions 0..length-1 (views, no copy)."""
        rows = slice(first_row, first_row + batch)
        return self.k[layer][rows, :, :length], self.v[layer][rows, :, :length]

    def move_row(self, src: int, dst: int, length: int) -> None:
        """Copy the first ``length`` positions of row ``src`` into row ``dst`` (the scheduler compacts rows)."""
        if src == dst or length == 0:
            return
        for buf in (*self.k, *self.v):
            buf[dst, :, :length].copy_(buf[src, :, :length])

    def copy_prefix(self, other: KVCache, *, src_row: int, dst_row: int, length: int) -> None:
        """Copy a cached prefix from another cache (e.g. a shared document) into one of our rows."""
        for mine, theirs in zip((*self.k, *self.v), (*other.k, *other.v), strict=True):
            mine[dst_row, :, :length].copy_(theirs[src_row, :, :length])

    def free(self) -> None:
        """Drop the buffers so their memory can be returned to the device."""
        self.k.clear()
        self.v.clear()
