"""glmrun.kernels: the launch switches (programmatic dependent launch on Hopper GPUs)."""

from __future__ import annotations

import pytest
import torch

from glmrun import kernels
from glmrun.cache import KVCache


def test_overlapped_launch_never_on_the_cpu_and_follows_the_switch():
    cpu = torch.zeros(1)
    try:
        kernels.set_overlapped_launch("auto")
        assert not kernels.overlapped_launch(cpu)
        if torch.cuda.is_available():
            gpu = cpu.cuda()
            hopper = torch.cuda.get_device_capability()[0] >= 9
            assert kernels.overlapped_launch(gpu) == (hopper and kernels._triton_has_gdc())
            kernels.set_overlapped_launch("off")
            assert not kernels.overlapped_launch(gpu)
        kernels.set_overlapped_launch("always")
        assert kernels.overlapped_launch(cpu)
        with pytest.raises(ValueError, match="auto, off or always"):
            kernels.set_overlapped_launch("on")
    finally:
        kernels.set_overlapped_launch("auto")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("bits", [None, 8, 4])
def test_overlapped_launch_decodes_as_serial_launch(bits):
    """Graph-replayed one-row steps whose kernels overlap (each waits for the one before) give the logits of
    serially launched ones: a kernel reading too early would show as a different number somewhere."""
    from glmrun.bench import random_model
    from glmrun.checkpoint import PRESETS
    from glmrun.config import QuantSpec
    from glmrun.fastpath import GraphDecoder
    from glmrun.quant import quantize_model_

    config = PRESETS["tiny"].replace(num_layers=4, seq_length=1024)
    model = random_model(config, torch.device("cuda"), torch.float16, seed=5)
    if bits is not None:
        for layer in model.layers:
            quantize_model_(layer, QuantSpec(bits=bits, group_size=32))
    cache = KVCache(config, rows=1, max_len=1024, dtype=torch.float16, devices=model.layer_devices())
    prompt = torch.randint(5, 1000, (1, 300), generator=torch.Generator().manual_seed(2)).cuda()
    logits = {}
    try:
        with torch.inference_mode():
            model(prompt, torch.arange(300, device="cuda")[None], cache)
            for on in (False, True):
                kernels.set_overlapped_launch("auto" if on else "off")
                decoder = GraphDecoder(model, cache)
                tok, steps = torch.tensor([[7]], device="cuda"), []
                for i in range(24):
                    out = decoder.step(tok, torch.tensor([[300 + i]], device="cuda"), 301 + i)
                    steps.append(out.float().clone())
                    tok = out.argmax(-1, keepdim=True).view(1, 1)
                logits[on] = torch.stack(steps)
    finally:
        kernels.set_overlapped_launch("auto")
    scale = logits[False].abs().max().item()
    assert (logits[True] - logits[False]).abs().max().item() <= 1e-3 * scale
