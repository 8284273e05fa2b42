"""The fused one-row products (norm folded in, SwiGLU, output norm) against the separate steps they replace.

Without a GPU the kernels run in Triton's interpreter on CPU tensors (tests/conftest.py). The last test runs a
small model's one-row decode through ``_run_row`` (every norm and SwiGLU inside a product) against its plain
layer-by-layer path on the same weights and cache.
"""

from __future__ import annotations

import pytest
import torch

from glmrun import kernels, layer_kernels
from glmrun.cache import KVCache
from glmrun.config import QuantSpec
from glmrun.quant import QuantLinear
from glmrun.row_fusion import NormedRow, RowFusion, cell_value, check_cell, fusion_args, norm_cells
from glmrun.row_kernels import ROW_SCALE, norm_prep

from .test_layer_kernels import _config

pytestmark = pytest.mark.skipif(layer_kernels.triton is None, reason="needs Triton (the test extra installs it)")
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
EPS = 1e-5


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _row(k: int, seed: int, scale: float = 3.0) -> tuple[torch.Tensor, torch.Tensor]:
    h = (torch.randn(1, 1, k, generator=_gen(seed)) * scale).half().to(DEVICE)
    gamma = (1.0 + 0.3 * torch.randn(k, generator=_gen(seed + 1))).half().to(DEVICE)
    return h, gamma


def _layer(kind: str, n: int, k: int, seed: int, bias: bool = False) -> torch.nn.Module:
    lin = torch.nn.Linear(k, n, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n, k, generator=_gen(seed)) * 0.05 + 0.01)
        if bias:
            lin.bias.copy_(torch.randn(n, generator=_gen(seed + 7)))
    if kind == "float16":
        return lin.half().to(DEVICE)
    q = QuantLinear.from_linear(lin, QuantSpec(bits=4 if kind.startswith("int4") else 8, group_size=32))
    if q.bias is not None:
        q.bias = q.bias.half()
    if kind == "int4-tiled":  # (from_linear tiles float16 CUDA layers itself; this one was quantized on the CPU)
        q.tile_()
    return q.to(DEVICE)


def _product(layer: torch.nn.Module, x: torch.Tensor, fusion: RowFusion, residual=None) -> torch.Tensor:
    if isinstance(layer, QuantLinear):
        return layer.row_product(x, residual, fusion)
    return layer_kernels.half_gemv(x, layer.weight, layer.bias, residual, fusion=fusion)


def _plain(layer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The unfused kernel's product (the path a layer takes without row fusion)."""
    return _product(layer, x, RowFusion())


def _cell(exact: bool) -> torch.Tensor:
    return norm_cells(1, torch.float16 if exact else torch.bfloat16, DEVICE)[0]


@pytest.mark.parametrize("exact", [True, False])
def test_norm_prep_gives_the_scaled_row_and_its_sum_of_squares(exact):
    h, gamma = _row(200, seed=1)  # not a multiple of the kernel's block
    cell = torch.full((2,), 77, dtype=torch.int64 if exact else torch.float32, device=DEVICE)  # stored over
    row = norm_prep(h, gamma, EPS, cell)
    assert row.h is h and row.sumsq is cell and row.eps == EPS
    assert torch.equal(row.scaled.cpu(), (h.float() * gamma.float() * ROW_SCALE).half().cpu())
    want = h.double().pow(2).sum().item()
    assert abs(cell_value(cell) - want) <= 1e-6 * want


def test_norm_cells_are_exact_integers_for_float16_rows_only():
    exact = norm_cells(3, torch.float16, DEVICE)
    assert exact.shape == (3, 2) and exact.dtype == torch.int64 and not exact.any()
    assert norm_cells(3, torch.bfloat16, DEVICE).dtype == torch.float32
    # the fixed point: hi in units of 2**-16, lo in units of 2**-56
    assert cell_value(torch.tensor([3 << 16, 1 << 55])) == 3.5
    assert cell_value(torch.tensor([2.25], dtype=torch.float32)) == 2.25


def test_a_cell_that_cannot_hold_the_sum_is_refused():
    check_cell(torch.zeros(2, dtype=torch.int64), torch.float16)
    with pytest.raises(ValueError, match="float16 rows only"):
        check_cell(torch.zeros(2, dtype=torch.int64), torch.bfloat16)  # squares past the fixed point's range
    with pytest.raises(ValueError, match="2 contiguous"):
        check_cell(torch.zeros(1, dtype=torch.int64), torch.float16)
    with pytest.raises(ValueError, match="int64 \\[2\\] or float32"):
        check_cell(torch.zeros(2, dtype=torch.float16), torch.float16)
    h, gamma = _row(64, seed=2)
    with pytest.raises(ValueError, match="float16 rows only"):
        norm_prep(h.bfloat16(), gamma.bfloat16(), EPS, torch.zeros(2, dtype=torch.int64, device=DEVICE))


def test_norm_prep_takes_one_row():
    h, gamma = _row(64, seed=2)
    with pytest.raises(ValueError, match="one row"):
        norm_prep(h.expand(2, 1, 64), gamma, EPS, torch.zeros(1, device=DEVICE))


@pytest.mark.parametrize("kind", ["float16", "int8", "int4", "int4-tiled"])
@pytest.mark.parametrize("bias", [False, True])
def test_a_norm_folded_into_the_product_matches_norm_then_product(kind, bias):
    h, gamma = _row(256, seed=3)
    layer = _layer(kind, 48, 256, seed=4, bias=bias)
    row = norm_prep(h, gamma, EPS, torch.zeros(1, dtype=torch.float32, device=DEVICE))
    got = _product(layer, row.scaled, RowFusion(row=row))
    want = _plain(layer, kernels.rms_norm(h, gamma, EPS))
    assert got.shape == want.shape == (1, 1, 48)
    err = (got.float() - want.float()).abs().max().item()
    assert err <= 4e-3 * want.float().abs().max().item(), err


@pytest.mark.parametrize("kind", ["float16", "int8", "int4", "int4-tiled"])
def test_a_large_residual_stream_times_a_large_norm_weight_does_not_overflow(kind):
    h, _ = _row(256, seed=16, scale=1.0)
    h[..., :8] = 30000.0  # a few huge dims, as real residual streams have
    gamma = torch.full((256,), 40.0, dtype=torch.float16, device=DEVICE)  # 30000 * 40 is past float16
    layer = _layer(kind, 32, 256, seed=17)
    row = norm_prep(h, gamma, EPS, torch.zeros(1, dtype=torch.float32, device=DEVICE))
    got = _product(layer, row.scaled, RowFusion(row=row))
    want = _plain(layer, kernels.rms_norm(h, gamma, EPS))
    assert torch.isfinite(got).all()
    err = (got.float() - want.float()).abs().max().item()
    assert err <= 4e-3 * want.float().abs().max().item(), err


@pytest.mark.parametrize("kind", ["float16", "int8", "int4", "int4-tiled"])
def test_swiglu_in_the_up_projection_matches_the_separate_kernel(kind):
    x, _ = _row(128, seed=5, scale=1.0)
    layer = _layer(kind, 2 * 40, 128, seed=6)  # 40 outputs: the last program is cut
    got = _product(layer, x, RowFusion(glu=True))
    want = layer_kernels.swiglu(_plain(layer, x))
    assert got.shape == want.shape == (1, 1, 40)
    err = (got.float() - want.float()).abs().max().item()
    assert err <= 2e-3 * want.float().abs().max().item(), err


@pytest.mark.parametrize("kind", ["float16", "int8", "int4", "int4-tiled"])
@pytest.mark.parametrize("exact", [True, False])
def test_an_output_norm_writes_the_next_products_input(kind, exact):
    x, _ = _row(96, seed=7)
    residual, gamma = _row(40, seed=8)
    layer = _layer(kind, 40, 96, seed=9)
    scaled = torch.empty_like(residual)
    cell = _cell(exact)
    fusion = RowFusion(out_weight=gamma, out_scaled=scaled, out_sumsq=cell)
    h = _product(layer, x, fusion, residual)
    want = _product(layer, x, RowFusion(), residual)  # the same kernel without the output norm
    assert torch.equal(h.cpu(), want.cpu())
    assert torch.equal(scaled.cpu(), (h.float() * gamma.float() * ROW_SCALE).half().cpu())
    ss = h.double().pow(2).sum().item()
    assert abs(cell_value(cell) - ss) <= (1e-6 if exact else 1e-5) * ss


@pytest.mark.parametrize("kind", ["float16", "int4", "int4-tiled"])
def test_an_exact_output_norm_repeats_bit_for_bit(kind):
    """Many programs adding to one cell: the int64 sums (and the next product's input) repeat exactly. (On a GPU
    the programs finish in a different order each time; the interpreter runs them in order.)"""
    x, _ = _row(256, seed=20)
    residual, gamma = _row(2048, seed=21, scale=30.0)
    layer, consumer = _layer(kind, 2048, 256, seed=22), _layer(kind, 64, 2048, seed=23)
    runs = []
    for _ in range(1 if DEVICE.type == "cpu" else 20):
        cell, scaled = _cell(True), torch.empty_like(residual)
        _product(layer, x, RowFusion(out_weight=gamma, out_scaled=scaled, out_sumsq=cell), residual)
        nxt = _product(consumer, scaled, RowFusion(row=NormedRow(residual, scaled, cell, EPS)))  # the next norm
        runs.append((cell.cpu(), nxt.cpu()))
    for cell, nxt in runs[1:]:
        assert torch.equal(cell, runs[0][0]) and torch.equal(nxt, runs[0][1])
    h = _product(layer, x, RowFusion(), residual)
    ss = h.double().pow(2).sum().item()
    assert abs(cell_value(runs[0][0]) - ss) <= 1e-6 * ss


@pytest.mark.parametrize("kind", ["float16", "int8", "int4", "int4-tiled"])
def test_a_rotary_and_cache_write_in_the_qkv_product_match_rope_write(kind):
    """ChatGLM2's layout in small: 4 query heads and 2 key/value heads of 16 dims, the first 8 of each rotating."""
    from glmrun.model import rotary_tables
    from glmrun.row_fusion import RopeWrite

    H, K, D, rows, max_len, row, position = 4, 2, 16, 3, 32, 1, 11
    cfg = _config(H, K, D, rotary_dim=8)
    x, _ = _row(64, seed=13, scale=1.0)
    layer = _layer(kind, (H + 2 * K) * D, 64, seed=14, bias=True)
    pos = torch.tensor([position], device=DEVICE)
    cos, sin = rotary_tables(cfg, pos[None])
    caches = [torch.randn(2, rows, K, max_len, D, generator=_gen(15)).half().to(DEVICE) for _ in range(2)]
    want_q = layer_kernels.rope_write(
        _plain(layer, x).view(1, -1), cos.view(1, -1), sin.view(1, -1), pos, caches[0][0], caches[0][1], row, H, K
    )
    q = torch.empty(H * D, dtype=torch.float16, device=DEVICE)
    k_row, v_row = caches[1][0][row], caches[1][1][row]
    rope = RopeWrite(q, k_row, v_row, cos.view(-1), sin.view(-1), pos, H, K)
    _product(layer, x, RowFusion(rope=rope))
    assert (q.float() - want_q.view(-1).float()).abs().max().item() <= 1e-3 * want_q.float().abs().max().item()
    diff = (caches[1].float() - caches[0].float()).abs()
    assert diff.max().item() <= 1e-3 * caches[0][:, row, :, position].float().abs().max().item()
    elsewhere = torch.ones_like(diff, dtype=torch.bool)
    elsewhere[:, row, :, position] = False
    assert diff[elsewhere].max().item() == 0  # nothing but the new position was written


def test_fusion_args_refuse_an_output_norm_without_its_buffers():
    like = torch.zeros(1)
    with pytest.raises(ValueError, match="out_scaled and out_sumsq"):
        fusion_args(RowFusion(out_weight=like), like, 8)
    row = NormedRow(like, like, like, 0.5)
    args = fusion_args(RowFusion(row=row, glu=True), like, 8)
    assert args["IN_NORM"] and args["GLU"] and not args["OUT_NORM"] and args["eps"] == 0.5 and not args["ROPE"]


def test_a_fused_product_needs_one_row():
    layer = _layer("int8", 16, 64, seed=10)
    x = torch.randn(2, 64, generator=_gen(11)).half().to(DEVICE)
    with pytest.raises(ValueError, match="one row"):
        from glmrun.quant_kernels import triton_config_for, triton_quant_matmul

        config = triton_config_for(1, 16, 64, 32, 8)
        triton_quant_matmul(x, layer.weight_q, layer.weight_scale, layer.weight_zero, 8, 32, config, fusion=RowFusion())


@pytest.mark.parametrize(("bits", "tiled"), [(None, False), (8, False), (4, False), (4, True)])
def test_a_fused_decode_row_matches_the_plain_layers(bits, tiled):
    """_run_row (norms and SwiGLU in the products) against run_layers' plain path on the same weights."""
    from glmrun.bench import random_model
    from glmrun.checkpoint import PRESETS
    from glmrun.quant import quantize_model_

    config = PRESETS["tiny"].replace(num_layers=3, seq_length=256, padded_vocab_size=512)
    model = random_model(config, torch.device("cpu"), torch.float32, seed=5)
    if bits is not None:
        for layer in model.layers:
            quantize_model_(layer, QuantSpec(bits=bits, group_size=32))
    model = model.to(DEVICE, torch.float16)
    if tiled:
        assert all(m.tile_().tiled for m in model.modules() if isinstance(m, QuantLinear))
    caches = [KVCache(config, rows=1, max_len=256, dtype=torch.float16, devices=[DEVICE] * 3) for _ in range(2)]
    prompt = torch.randint(5, 500, (1, 20), generator=_gen(12)).to(DEVICE)
    with torch.inference_mode():
        for cache in caches:
            model(prompt, torch.arange(20, device=DEVICE)[None], cache)
        token = torch.tensor([[17]], device=DEVICE)
        pos = torch.tensor([[20]], device=DEVICE)
        x = model.embed(token)
        fused = model._run_row(x, pos, caches[0], range(3), length=21, first_row=0, masked=False)
        steps = {DEVICE: model._step_inputs(pos, 21, 0, "rows", False)}
        plain = x
        for layer in model.blocks():
            plain = layer(plain, steps[DEVICE], caches[1])
    assert fused.shape == plain.shape == (1, 1, 64)
    err = (fused.float() - plain.float()).abs().max().item()
    assert err <= 1e-2 * plain.float().abs().max().item(), err
    for i in range(3):  # the new token's keys and values went into every layer's cache
        for got_kv, want_kv in ((caches[0].k[i], caches[1].k[i]), (caches[0].v[i], caches[1].v[i])):
            new = want_kv[0, :, 20].float()
            assert new.abs().max().item() > 0
            assert (got_kv[0, :, 20].float() - new).abs().max().item() <= 1e-2 * new.abs().max().item() + 1e-3
