"""Elementwise pieces of a layer, fused on CUDA.

A decode step's matrix products read the weights once; what else it spends is the launch of many tiny
elementwise kernels (norm statistics, rotary, SwiGLU, dtype casts). On CUDA these small pure
functions are compiled once by ``torch.compile`` with dynamic shapes, each into a single fused kernel
that the CUDA graph then replays. On the CPU, or when compiling is unavailable (no Triton) or turned
off with ``GLMRUN_COMPILE=0``, the same functions run eagerly: the numbers are the same.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["rms_norm", "rotary", "swiglu", "on_device", "launch_device"]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """As the official RMSNorm: statistics in float32, result back in the input dtype."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (weight.float() * xf).to(x.dtype)


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first ``2*cos.shape[-1]`` dims of each head of ``x`` [B, T, H, D] in interleaved pairs.

    The official layout rotates (x[2i], x[2i+1]) pairs of the first half of each 128-dim head
    (``apply_rotary_pos_emb`` in modeling_chatglm.py); GGUF Llama files store q/k rows permuted so the
    same pairwise rotation applies over the whole head.
    """
    rd = cos.shape[-1] * 2
    rot, keep = x[..., :rd], x[..., rd:]
    pairs = rot.float().unflatten(-1, (rd // 2, 2))  # [B, T, H, rd/2, 2]
    x0, x1 = pairs[..., 0], pairs[..., 1]
    c, s = cos[:, :, None, :], sin[:, :, None, :]  # [B, T, 1, rd/2]
    rotated = torch.stack((x0 * c - x1 * s, x1 * c + x0 * s), dim=-1).flatten(-2)
    return torch.cat((rotated.to(x.dtype), keep), dim=-1)


def swiglu(x: torch.Tensor) -> torch.Tensor:
    """SwiGLU over the gate half then the up half of the last dim, as the official ``swiglu``."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


_fused: dict[str, Callable[..., Any]] = {}
_disabled: list[bool] = [os.environ.get("GLMRUN_COMPILE", "1") == "0"]


def on_device(fn: Callable[..., Any], x: torch.Tensor) -> Callable[..., Any]:
    """``fn`` itself on the CPU; its compiled, fused form on CUDA (falls back to ``fn`` if compiling fails)."""
    if not x.is_cuda or _disabled[0] or torch.compiler.is_compiling():
        return fn
    compiled = _fused.get(fn.__name__)
    if compiled is None:
        compiled = _fused[fn.__name__] = _guarded(fn, torch.compile(fn, dynamic=True, fullgraph=True))
    return compiled


def _guarded(eager: Callable[..., Any], compiled: Callable[..., Any]) -> Callable[..., Any]:
    def call(*args: Any) -> Any:
        if _disabled[0]:
            return eager(*args)
        try:
            return compiled(*args)
        except Exception:  # noqa: BLE001 - no Triton, an unsupported GPU...: the eager path is always right
            _disabled[0] = True
            return eager(*args)

    return call


def launch_device(t: torch.Tensor) -> contextlib.AbstractContextManager[Any]:
    """Make ``t``'s GPU the current one for a Triton launch (Triton launches on the current device).

    A model split over GPUs runs layers whose tensors live on another GPU than the current one; torch's
    own ops follow their tensors, Triton's kernels do not.
    """
    if t.is_cuda and t.device.index is not None and t.device.index != torch.cuda.current_device():
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()
