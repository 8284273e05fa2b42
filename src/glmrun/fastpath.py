"""The CUDA decode fast path: one decode step captured in a CUDA graph per (batch, length bucket).

A decode step of ChatGLM2-6B launches hundreds of small kernels; replaying them from a CUDA graph
removes Python and launch overhead from the critical path. The graph is bound to one
:class:`~glmrun.cache.KVCache` (its buffers' addresses are baked in) and reads keys up to a padded
length bucket, masking each row's keys by position, so one graph serves every length in its bucket.
Graphs are captured lazily on first use and share one memory pool per device. A model split over
several GPUs gets one graph per GPU segment, replayed in turn. On the CPU the plain path is used.
"""

from __future__ import annotations

import torch

from .cache import KVCache
from .model import ChatGLMForCausalLM

__all__ = ["GraphDecoder", "graphs_supported", "length_bucket", "pow2_bucket", "device_segments"]

_MIN_BUCKET = 256


def graphs_supported(model: ChatGLMForCausalLM) -> bool:
    """CUDA graphs need every layer on a GPU; a model split over GPUs gets one graph per GPU."""
    return all(d.type == "cuda" for d in model.layer_devices()) and model.output_device().type == "cuda"


def device_segments(model: ChatGLMForCausalLM) -> list[tuple[torch.device, range]]:
    """Contiguous runs of layers on one device, in order."""
    segments: list[tuple[torch.device, range]] = []
    start = 0
    devices = model.layer_devices()
    for i in range(1, len(devices) + 1):
        if i == len(devices) or devices[i] != devices[start]:
            segments.append((devices[start], range(start, i)))
            start = i
    return segments


def pow2_bucket(value: int, *, start: int, cap: int) -> int:
    """The smallest ``start * 2**k`` that holds ``value``, capped at ``cap`` (graph sizes: few shapes)."""
    bucket = start
    while bucket < value:
        bucket *= 2
    return min(bucket, cap)


def length_bucket(length: int, max_len: int) -> int:
    """The smallest power-of-two multiple of 256 that holds ``length``, capped at ``max_len``."""
    return pow2_bucket(length, start=_MIN_BUCKET, cap=max_len)


class _Segment:
    """One device's part of a decode step, captured as one graph."""

    def __init__(
        self,
        device: torch.device,
        graph: torch.cuda.CUDAGraph,
        inputs: torch.Tensor,
        positions: torch.Tensor,
        output: torch.Tensor,
    ) -> None:
        self.device, self.graph, self.inputs, self.positions, self.output = device, graph, inputs, positions, output


class GraphDecoder:
    """Replays captured decode steps for rows 0..batch-1 of one cache (one graph per device segment)."""

    def __init__(self, model: ChatGLMForCausalLM, cache: KVCache) -> None:
        self.model = model
        self.cache = cache
        self.segments = device_segments(model)
        self.graphs: dict[tuple[int, int], list[_Segment]] = {}
        self.pools = {dev: torch.cuda.graph_pool_handle() for dev, _ in self.segments}
        self.streams = {dev: torch.cuda.Stream(dev) for dev, _ in self.segments}

    def _capture(self, batch: int, bucket: int) -> list[_Segment]:
        model, cache = self.model, self.cache
        captured: list[_Segment] = []
        inputs: torch.Tensor = torch.zeros((batch, 1), dtype=torch.long, device=self.segments[0][0])
        for k, (dev, layers) in enumerate(self.segments):
            positions = torch.zeros((batch, 1), dtype=torch.long, device=dev)
            seg_in = inputs if k == 0 else torch.zeros_like(inputs, device=dev)
            last = k == len(self.segments) - 1

            def step(
                seg_in: torch.Tensor = seg_in,
                positions: torch.Tensor = positions,
                layers: range = layers,
                first: bool = k == 0,
                last: bool = last,
            ) -> torch.Tensor:
                x = model.embed(seg_in) if first else seg_in
                x = model.run_layers(x, positions, cache, layers, length=bucket, masked=True)
                return model.head(x, "last") if last else x

            with torch.cuda.device(dev):
                # Warm up on a side stream (cuBLAS handles, workspaces) before capturing, as torch advises.
                side = torch.cuda.Stream(dev)
                side.wait_stream(torch.cuda.current_stream(dev))
                with torch.cuda.stream(side):
                    for _ in range(2):
                        out = step()
                torch.cuda.current_stream(dev).wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                # A capture stream of this device: torch's default one belongs to the first device
                # it was made on, and capturing there records nothing of this device's work.
                with torch.cuda.graph(graph, pool=self.pools[dev], stream=self.streams[dev]):
                    out = step()
            captured.append(_Segment(dev, graph, seg_in, positions, out))
            inputs = out
        return captured

    def step(self, tokens: torch.Tensor, positions: torch.Tensor, length: int) -> torch.Tensor:
        """Logits [batch, V] for ``tokens``/``positions`` [batch, 1]; ``length`` = max position + 1."""
        batch = tokens.shape[0]
        key = (batch, length_bucket(length, self.cache.max_len))
        segments = self.graphs.get(key)
        if segments is None:
            # Capturing writes throw-away keys at position 0 of rows 0..batch-1: keep the real ones.
            pairs = zip(self.cache.k, self.cache.v, strict=True)
            saved = [(k[:batch, :, :1].clone(), v[:batch, :, :1].clone()) for k, v in pairs]
            segments = self.graphs[key] = self._capture(*key)
            for (k0, v0), kc, vc in zip(saved, self.cache.k, self.cache.v, strict=True):
                kc[:batch, :, :1].copy_(k0)
                vc[:batch, :, :1].copy_(v0)
        previous = tokens
        for seg in segments:
            with torch.cuda.device(seg.device):  # replay on this device's current stream
                seg.inputs.copy_(previous)
                seg.positions.copy_(positions)
                seg.graph.replay()
            previous = seg.output
        return previous
