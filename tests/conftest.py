"""Test-session setup.

With no CUDA GPU, glmrun's Triton kernels (when Triton is installed, as the test extra installs it) run in
Triton's interpreter on CPU tensors, so their arithmetic is tested on every machine. The variable must be
set before :mod:`glmrun.quant_kernels` is imported: Triton reads it when a kernel is decorated.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
