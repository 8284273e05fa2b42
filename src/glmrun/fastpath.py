"""The CUDA decode fast path: one decode step captured in a CUDA graph per (batch, length bucket).

A decode step of ChatGLM2-6B launches hundreds of small kernels; replaying them from a CUDA graph
removes Python and launch overhead from the critical path. The graph is bound to one
:class:`~glmrun.cache.KVCache` (its buffers' addresses are baked in) and reads keys up to a padded
length bucket, masking each row's keys by position, so one graph serves every length in its bucket.
Graphs are captured lazily on first use and share one memory pool. On the CPU, or for a model split
over several devices, :func:`graphs_supported` says no and the plain path is used.
"""

from __future__ import annotations

import torch

from .cache import KVCache
from .model import ChatGLMForCausalLM

__all__ = ["GraphDecoder", "graphs_supported", "length_bucket"]

_MIN_BUCKET = 256
_Entry = tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor, torch.Tensor]  # graph, tokens, positions, logits


def graphs_supported(model: ChatGLMForCausalLM) -> bool:
    devices = set(model.layer_devices())
    devices.add(model.output_weight().device)
    return len(devices) == 1 and next(iter(devices)).type == "cuda"


def length_bucket(length: int, max_len: int) -> int:
    """The smallest power-of-two multiple of 256 that holds ``length``, capped at ``max_len``."""
    bucket = _MIN_BUCKET
    while bucket < length:
        bucket *= 2
    return min(bucket, max_len)


class GraphDecoder:
    """Replays captured decode steps for rows 0..batch-1 of one cache."""

    def __init__(self, model: ChatGLMForCausalLM, cache: KVCache) -> None:
        self.model = model
        self.cache = cache
        self.device = model.output_weight().device
        self.graphs: dict[tuple[int, int], _Entry] = {}
        self.pool = torch.cuda.graph_pool_handle()

    def _capture(
        self, batch: int, bucket: int
    ) -> tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor, torch.Tensor]:
        tokens = torch.zeros((batch, 1), dtype=torch.long, device=self.device)
        positions = torch.zeros((batch, 1), dtype=torch.long, device=self.device)

        def step() -> torch.Tensor:
            return self.model(tokens, positions, self.cache, length=bucket, masked=True)

        # Warm up on a side stream (cuBLAS handles, workspace) before capturing, as torch's docs advise.
        # The warm-up writes position 0's keys of these rows; callers capture before prefilling.
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(2):
                step()
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            logits = step()
        return graph, tokens, positions, logits

    def prepare(self, batch: int, length: int) -> None:
        """Capture the graph for this batch and length now (before prefill: capture writes row keys)."""
        key = (batch, length_bucket(length, self.cache.max_len))
        if key not in self.graphs:
            self.graphs[key] = self._capture(*key)

    def step(self, tokens: torch.Tensor, positions: torch.Tensor, length: int) -> torch.Tensor:
        """Logits [batch, V] for ``tokens``/``positions`` [batch, 1]; ``length`` = max position + 1."""
        batch = tokens.shape[0]
        key = (batch, length_bucket(length, self.cache.max_len))
        entry = self.graphs.get(key)
        if entry is None:
            # Capturing writes garbage keys at position 0 of rows 0..batch-1: keep the real ones.
            saved = [
                (k[:batch, :, :1].clone(), v[:batch, :, :1].clone())
                for k, v in zip(self.cache.k, self.cache.v, strict=True)
            ]
            entry = self.graphs[key] = self._capture(*key)
            for (k0, v0), k, v in zip(saved, self.cache.k, self.cache.v, strict=True):
                k[:batch, :, :1].copy_(k0)
                v[:batch, :, :1].copy_(v0)
        graph, static_tokens, static_positions, logits = entry
        static_tokens.copy_(tokens)
        static_positions.copy_(positions)
        graph.replay()
        return logits
