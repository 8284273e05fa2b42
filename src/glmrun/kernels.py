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
import threading
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F

__all__ = [
    "rms_norm",
    "rotary",
    "swiglu",
    "on_device",
    "launch_device",
    "dependent_launch",
    "overlapped_launch",
    "overlapped_launches",
    "set_overlapped_launch",
]


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


_overlap: dict[int, bool] = {}
_overlap_off: list[bool] = [os.environ.get("GLMRUN_PDL", "1") == "0"]


def overlapped_launch(t: torch.Tensor) -> bool:
    """Whether a decode kernel working on ``t`` launches as a programmatic dependent of the kernel before it.

    Hopper and later GPUs can start a kernel while the one before it still runs (programmatic dependent
    launch): its programs become resident, load their first block of weights and wait in ``griddepcontrol.wait``
    until that kernel has completed and its writes are visible; only then do they read or write anything else,
    and let the next kernel launch (row_kernels' ``await_previous``), so at most one kernel waits ahead of the
    running one. Reading weights before the wait is safe only where no kernel just before wrote them (loading
    or quantizing does): so this holds only inside :func:`overlapped_launches`, which the model's one-row
    decode step (``ChatGLMForCausalLM._run_row``) opens: its first kernel waits before it reads anything, and
    every kernel after it is one of the step's own. True there on CUDA devices of compute capability 9.0 or
    later whose Triton has the instructions, unless ``GLMRUN_PDL=0`` or :func:`set_overlapped_launch` turned it
    off; never on the CPU or in Triton's interpreter.
    """
    if not t.is_cuda or _overlap_off[0] or not getattr(_scope, "on", False):
        return False
    index = t.device.index if t.device.index is not None else torch.cuda.current_device()
    known = _overlap.get(index)
    if known is None:
        known = _overlap[index] = torch.cuda.get_device_capability(index)[0] >= 9 and _triton_has_gdc()
    return known


_scope = threading.local()


@contextlib.contextmanager
def overlapped_launches() -> Iterator[None]:
    """Within it (this thread), decode kernels may launch as programmatic dependents (:func:`overlapped_launch`)."""
    before = getattr(_scope, "on", False)
    _scope.on = True
    try:
        yield
    finally:
        _scope.on = before


def dependent_launch(t: torch.Tensor) -> dict[str, Any]:
    """A decode kernel's ``PDL`` flag and launch option for tensors like ``t``, decided together by
    :func:`overlapped_launch` (the kernel waits in ``await_previous`` exactly when it is launched so). The option is
    left out when off: Triton before 3.3 does not know it."""
    pdl = overlapped_launch(t)
    return {"PDL": True, "launch_pdl": True} if pdl else {"PDL": False}


def set_overlapped_launch(enabled: bool) -> None:
    """Turn :func:`overlapped_launch` on or off for launches from now on (graphs captured before keep theirs)."""
    _overlap_off[0] = not enabled


def _triton_has_gdc() -> bool:
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return False
    try:
        from triton.language.extra import cuda
    except ImportError:
        return False
    return hasattr(cuda, "gdc_wait") and hasattr(cuda, "gdc_launch_dependents")
