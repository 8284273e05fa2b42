"""Test-session setup.

With no CUDA GPU, glmrun's Triton kernels (when Triton is installed, as the test extra installs it) run in
Triton's interpreter on CPU tensors, so their arithmetic is tested on every machine. The variable must be
set before :mod:`glmrun.quant_kernels` is imported: Triton reads it when a kernel is decorated.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(params=["auto", "always"], ids=["serial-launch", "dependent-launch"])
def launch_mode(request: pytest.FixtureRequest):
    """Each Triton kernel test twice: as launched here ("auto": serially on a CPU) and with the kernels' code paths
    for programmatic dependent launch ("always": loads before the wait; the interpreter has no wait to do)."""
    from glmrun import kernels

    kernels.set_overlapped_launch(request.param)
    yield request.param
    kernels.set_overlapped_launch("auto")
