"""Weight-only quantization: round-trip bounds, the packed layout, the module swap, saving and loading."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from glmrun.config import QuantSpec
from glmrun.errors import InvalidArgumentError
from glmrun.quant import (
    QuantizedWeight,
    QuantLinear,
    dequantize,
    logit_agreement,
    quantize_int4,
    quantize_int8,
    quantize_model_,
    quantized_bytes,
    quantized_state_shapes,
    replace_with_empty_quant_linears_,
    tile_int4_linears_,
)
from glmrun.quant_kernels import KernelConfig, dequant_matmul, triton_available, triton_config_for

INT8 = QuantSpec(bits=8, group_size=128)
INT4 = QuantSpec(bits=4, group_size=128)
INT8_SYM = QuantSpec(bits=8, group_size=128, int8_zero=False)  # folders saved before INT8 zeros


def quantize_int8_sym(w: torch.Tensor, group_size: int) -> QuantizedWeight:
    return quantize_int8(w, group_size, zero=False)


QUANTIZERS = pytest.mark.parametrize(
    "quantize", [quantize_int8, quantize_int8_sym, quantize_int4], ids=["int8", "int8-sym", "int4"]
)


def _per_element_scale(q: QuantizedWeight) -> torch.Tensor:
    return q.scale.float().repeat_interleave(q.group_size, dim=1)  # [out, in]


def _rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.float() - ref.float()).norm() / ref.float().norm()).item()


# -- numeric functions -----------------------------------------------------------------------


@QUANTIZERS
def test_round_trip_error_is_at_most_half_a_step(quantize):
    gen = torch.Generator().manual_seed(0)
    w = torch.rand(64, 512, generator=gen) * 4 - 1.5  # uniform on [-1.5, 2.5): asymmetric on purpose
    q = quantize(w, 64)
    err = (dequantize(q) - w).abs()
    half_step = _per_element_scale(q) / 2
    assert (err <= half_step * (1 + 1e-5) + 1e-7).all()
    assert err.max() > 0  # a real quantization happened


def test_int8_codes_and_shapes():
    w = torch.randn(32, 256, generator=torch.Generator().manual_seed(1))
    q = quantize_int8(w, 128)
    assert q.q.dtype == torch.int8 and q.q.shape == (32, 256)
    assert q.zero is not None and q.zero.dtype == torch.float16 and q.zero.shape == (32, 2)
    # each group's min and max land on the first and last of the 256 codes
    groups = q.q.view(32, 2, 128)
    assert (groups.amin(-1) == -128).all() and (groups.amax(-1) >= 126).all()
    mins = w.view(32, 2, 128).amin(-1)  # the zero is the group's minimum, rounded down to float16
    assert (q.zero.float() <= mins).all() and (mins - q.zero.float() <= mins.abs() * 2**-10).all()


def test_symmetric_int8_codes_and_shapes():
    w = torch.randn(32, 256, generator=torch.Generator().manual_seed(1))
    q = quantize_int8(w, 128, zero=False)
    assert (q.bits, q.group_size, q.shape) == (8, 128, (32, 256))
    assert q.q.dtype == torch.int8 and q.q.shape == (32, 256)
    assert q.scale.dtype == torch.float16 and q.scale.shape == (32, 2)
    assert q.zero is None
    assert q.q.abs().max() <= 127 and q.q.min() >= -127
    # absmax of each group lands on +-127: the scale is the absmax / 127, rounded up by at most an ulp
    assert (q.q.abs().view(32, 2, 128).amax(-1) >= 126).all()


def test_int4_packed_layout_of_a_hand_made_matrix():
    # One row, one group of 4: min 0, max 15 -> scale 1, zero 0, codes equal the values.
    w = torch.tensor([[1.0, 2.0, 15.0, 0.0]])
    q = quantize_int4(w, 4)
    assert q.q.dtype == torch.uint8 and q.q.shape == (1, 2)
    # byte j = code[2j] (low nibble) | code[2j+1] << 4
    assert q.q.tolist() == [[0x21, 0x0F]]
    assert q.scale.tolist() == [[1.0]] and q.zero is not None and q.zero.tolist() == [[0.0]]
    assert torch.equal(dequantize(q), w)


def test_int4_layout_two_rows_two_groups():
    w = torch.tensor(
        [
            [0.0, 3.0, 1.0, 2.0, 10.0, 10.5, 11.0, 17.5],  # group 2: min 10, scale 0.5
            [-3.0, 0.0, 12.0, -3.0, 0.0, 0.0, 0.0, 0.0],  # group 2: constant zeros
        ]
    )
    q = quantize_int4(w, 4)
    # 0.2 is not a float16 number: the stored scale is the next one up
    assert q.scale.tolist() == [[torch.tensor(0.2).half().item() + 2**-13, 0.5], [1.0, 0.0]]
    assert q.q[0, :2].tolist() == [0x0 | 0xF << 4, 0x5 | 0xA << 4]  # 0, 3, 1, 2 -> codes 0, 15, 5, 10
    codes_row0_g2 = [0, 1, 2, 15]
    expected_bytes_g2 = [codes_row0_g2[0] | codes_row0_g2[1] << 4, codes_row0_g2[2] | codes_row0_g2[3] << 4]
    assert q.q[0, 2:].tolist() == expected_bytes_g2
    assert q.q[1, 2:].tolist() == [0, 0]
    assert q.q[1, :2].tolist() == [0x0 | 0x3 << 4, 0xF | 0x0 << 4]  # codes -3 -> 0, 0 -> 3, 12 -> 15, -3 -> 0
    assert torch.allclose(dequantize(q), w, atol=0.11)


def test_int8_hand_made_matrix():
    w = torch.tensor([[127.0, -63.5, 0.0, 1.0]])
    q = quantize_int8(w, 4, zero=False)
    assert q.scale.tolist() == [[1.0]]
    assert q.q.tolist() == [[127, -64, 0, 1]]  # -63.5 rounds half to even
    # Asymmetric: min -63.5 is code 0 (stored -128); scale (127 + 63.5) / 255 = 0.747059, rounded up to
    # float16's 0.7470703125; 0 -> 63.5 / scale = 84.999 -> code 85 (stored -43); 1 -> 86.34 -> 86.
    q = quantize_int8(w, 4)
    assert q.zero is not None and q.zero.tolist() == [[-63.5]] and q.scale.tolist() == [[0.7470703125]]
    assert q.q.tolist() == [[127, -128, -43, -42]]
    assert torch.allclose(dequantize(q), w, atol=0.7470703125 / 2)


def test_int8_keeps_q4_1_blocks_exactly():
    """Weights on a GGUF Q4_1 grid (m + j*d, j = 0..15, blocks of 32) land on the INT8 grid of group 32:
    15 of their steps are 255 of ours. A symmetric grid moves them by up to half its own step."""
    gen = torch.Generator().manual_seed(3)
    d = (torch.rand(16, 4, 1, generator=gen) * 0.01 + 1e-3).half().float()
    m = (torch.rand(16, 4, 1, generator=gen) * -0.1).half().float()
    j = torch.randint(0, 16, (16, 4, 32), generator=gen).float()
    j[..., 0], j[..., 1] = 0, 15  # every block spans its whole grid, as the Q4_1 quantizer leaves it
    w = (m + j * d).view(16, 128)
    exact = (dequantize(quantize_int8(w, 32)) - w).abs().max() / d.max()
    moved = (dequantize(quantize_int8(w, 32, zero=False)) - w).abs().max() / d.max()
    # What is left is float16's rounding of the scale d/17: at most 2**-10 of it over 255 steps = 15 d / 1024.
    assert exact <= 15 / 1024 and moved > 4 * exact


@QUANTIZERS
def test_zero_and_constant_groups_give_no_nan(quantize):
    w = torch.zeros(4, 64)
    w[1] = 0.3  # a constant group that float16 cannot hold exactly
    w[2] = -2.0  # one it can
    w[3, :32] = 5.0
    q = quantize(w, 32)
    deq = dequantize(q)
    assert torch.isfinite(q.scale.float()).all() and torch.isfinite(deq).all()
    assert deq[0].abs().max() == 0 and q.scale[0].abs().max() == 0  # all-zero groups: scale 0, codes 0
    assert (deq - w).abs().max() <= (_per_element_scale(q) / 2 + 1e-7).max()
    if quantize is not quantize_int8_sym:
        assert torch.equal(deq[2], w[2])  # the zero holds a float16 constant exactly, with scale 0
        assert (deq[1] - w[1]).abs().max() <= 0.3 * 2**-10  # else a tiny scale covers float16's rounding


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@QUANTIZERS
def test_half_precision_inputs(dtype, quantize):
    w = torch.randn(48, 256, generator=torch.Generator().manual_seed(2)).to(dtype)
    q = quantize(w, 128)
    err = (dequantize(q) - w.float()).abs()
    assert (err <= _per_element_scale(q) / 2 * (1 + 1e-5) + 1e-7).all()


def test_bad_group_sizes_are_refused_with_a_hint():
    with pytest.raises(InvalidArgumentError, match=r"not a multiple of group_size 256.*\[32, 64, 128, 13696\]"):
        quantize_int8(torch.zeros(2, 13696), 256)  # ChatGLM2's dense_4h_to_h: 13696 = 128 * 107
    with pytest.raises(InvalidArgumentError, match="positive even"):
        quantize_int4(torch.zeros(4, 12), 3)
    with pytest.raises(InvalidArgumentError, match="2-D"):
        quantize_int8(torch.zeros(4), 4)
    with pytest.raises(InvalidArgumentError, match="NaN"):
        quantize_int8(torch.tensor([[float("nan"), 1.0]]), 2)


# -- the module --------------------------------------------------------------------------------


# Round-to-nearest on a min..max grid of a 128-sample gaussian group (range ~5.2 sigma): the step is
# ~0.35 sigma, the rms error step / sqrt(12) ~ 0.10 sigma for INT4 (~0.006 sigma for INT8).
@pytest.mark.parametrize(("spec", "limit"), [(INT8, 0.01), (INT4, 0.11)], ids=["int8", "int4"])
def test_quant_linear_matches_the_float_layer(spec, limit):
    torch.manual_seed(3)
    linear = nn.Linear(512, 384, bias=True)
    nn.init.normal_(linear.weight, std=0.02)
    x = torch.randn(2, 5, 512)
    ref = linear(x)
    qlinear = QuantLinear.from_linear(linear, spec)
    y = qlinear(x)
    assert y.shape == (2, 5, 384) and y.dtype == x.dtype
    assert _rel_err(y, ref) < limit
    y_bf16 = qlinear(x.bfloat16())
    assert y_bf16.dtype == torch.bfloat16 and _rel_err(y_bf16, ref) < limit + 0.01


def test_dequant_matmul_chunks_agree_with_one_matmul(monkeypatch):
    import glmrun.quant_kernels as qk

    w = torch.randn(300, 256, generator=torch.Generator().manual_seed(4))
    q = quantize_int4(w, 64)
    x = torch.randn(3, 256)
    whole = x @ dequantize(q).T
    monkeypatch.setattr(qk, "_CPU_CHUNK_ELEMENTS", 256 * 7)  # 7 rows a chunk, a ragged last chunk
    chunked = dequant_matmul(x, q.q, q.scale, q.zero, 4, 64)
    assert torch.allclose(chunked, whole, atol=1e-5)


@pytest.mark.parametrize("spec", [INT8, INT8_SYM, INT4], ids=["int8", "int8-sym", "int4"])
def test_state_dict_round_trip_through_safetensors(tmp_path, spec):
    torch.manual_seed(5)
    qlinear = QuantLinear.from_linear(nn.Linear(256, 64, bias=True), spec)
    state = qlinear.state_dict()
    expected = {"weight_q", "weight_scale", "bias"} | ({"weight_zero"} if spec is not INT8_SYM else set())
    assert set(state) == expected
    for name, (shape, dtype) in quantized_state_shapes(256, 64, spec, bias=True, bias_dtype=torch.float32).items():
        assert state[name].shape == shape and state[name].dtype == dtype
    path = tmp_path / "layer.safetensors"
    save_file(state, str(path))
    loaded = load_file(str(path))

    empty = QuantLinear(256, 64, spec, bias=True, bias_dtype=torch.float32, device="meta")
    empty.load_state_dict(loaded, assign=True)
    x = torch.randn(4, 256)
    assert torch.equal(empty(x), qlinear(x))


def test_a_tiled_layer_computes_and_saves_as_the_canonical_one():
    torch.manual_seed(8)
    layer = QuantLinear.from_linear(nn.Linear(512, 48, bias=True), INT4)
    canonical = {n: t.clone() for n, t in layer.state_dict().items()}
    x = torch.randn(3, 512)
    before = layer(x)
    assert layer.tile_() is layer and layer.tiled and "tiled" in repr(layer)
    assert not torch.equal(layer.weight_q, canonical["weight_q"])  # reordered in place
    assert torch.allclose(layer(x), before, atol=1e-5)
    state = layer.state_dict()
    assert all(torch.equal(state[n], canonical[n]) for n in canonical)  # saved in the canonical order
    assert torch.equal(layer.quantized_weight().q, canonical["weight_q"])

    other = QuantLinear.from_linear(nn.Linear(512, 48, bias=True), INT4).tile_()
    other.load_state_dict(canonical)  # a canonical state into a tiled layer: tiled again
    assert other.tiled and torch.equal(other.weight_q, layer.weight_q)
    assert torch.equal(other(x), layer(x))

    storage = layer.weight_q.data_ptr()
    assert layer.untile_() is layer and not layer.tiled  # back in place, the same storage
    assert layer.weight_q.data_ptr() == storage and torch.equal(layer.weight_q, canonical["weight_q"])


def test_only_int4_codes_of_a_fitting_group_are_tiled():
    assert not QuantLinear.from_linear(nn.Linear(256, 16), INT8).can_tile()
    assert not QuantLinear.from_linear(nn.Linear(96, 16), QuantSpec(bits=4, group_size=16)).can_tile()
    with pytest.raises(ValueError, match="cannot tile"):
        QuantLinear.from_linear(nn.Linear(256, 16), INT8).tile_()
    layer = QuantLinear.from_linear(nn.Linear(256, 16), INT4)  # on the CPU: quantized in the canonical order
    assert not layer.tiled and tile_int4_linears_(nn.Sequential(layer), torch.float16) == 0  # CUDA layers only


def test_quantized_bytes_matches_the_buffers():
    for spec in (INT8, INT8_SYM, INT4, QuantSpec(bits=4, group_size=32)):
        for in_f, out_f in ((256, 64), (384, 96)):
            layer = QuantLinear(in_f, out_f, spec, bias=True)
            held = sum(t.numel() * t.element_size() for n, t in layer.state_dict().items() if n != "bias")
            assert quantized_bytes(in_f, out_f, spec) == held
    # ChatGLM2-6B's MLP up-projection at INT4, group 128: 0.5 byte a weight + 4 bytes per 128 weights
    assert quantized_bytes(4096, 27392, INT4) == 27392 * 4096 // 2 + 27392 * 32 * 4
    assert quantized_bytes(4096, 27392, INT8) == 27392 * 4096 + 27392 * 32 * 4
    assert quantized_bytes(4096, 27392, INT8_SYM) == 27392 * 4096 + 27392 * 32 * 2


# -- swapping a model --------------------------------------------------------------------------


def _small_model() -> nn.Sequential:
    torch.manual_seed(6)
    return nn.Sequential(
        nn.Linear(128, 256, bias=True), nn.ReLU(), nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 64, bias=False)
    )


def test_quantize_model_swaps_in_place_and_honours_skip():
    model = _small_model()
    x = torch.randn(3, 128)
    ref = model(x)
    count = quantize_model_(model, INT8, skip=lambda name: name == "4")
    assert count == 2
    assert isinstance(model[0], QuantLinear) and isinstance(model[2], QuantLinear)
    assert type(model[4]) is nn.Linear
    assert _rel_err(model(x), ref) < 0.02
    assert quantize_model_(model, INT8) == 1  # a second pass only finds the layer left float


def test_quantize_model_checks_every_layer_before_swapping():
    model = nn.Sequential(nn.Linear(128, 64), nn.Linear(64, 32), nn.Linear(96, 8))
    with pytest.raises(InvalidArgumentError, match="layer '2'.*96"):
        quantize_model_(model, QuantSpec(bits=8, group_size=64))
    assert all(type(m) is nn.Linear for m in model)  # untouched


def test_empty_quantized_model_loads_a_saved_one(tmp_path):
    model = _small_model()
    quantize_model_(model, INT4, skip=lambda name: name == "4")
    save_file(model.state_dict(), str(tmp_path / "model.safetensors"))

    x = torch.randn(2, 128)
    for swap in (replace_with_empty_quant_linears_, quantize_model_):  # on meta both build empty modules
        with torch.device("meta"):
            skeleton = _small_model()
        assert swap(skeleton, INT4, skip=lambda name: name == "4") == 2
        assert skeleton[0].weight_q.is_meta
        skeleton.load_state_dict(load_file(str(tmp_path / "model.safetensors")), strict=True, assign=True)
        assert torch.equal(skeleton(x), model(x))


# -- quality helper ----------------------------------------------------------------------------


def test_logit_agreement():
    ref = torch.tensor([[[2.0, 0.0, -1.0], [0.0, 3.0, 0.0]]])
    same = logit_agreement(ref, ref.clone())
    assert same["top1"] == 1.0 and abs(same["kl"]) < 1e-12
    other = torch.tensor([[[0.0, 2.0, -1.0], [0.0, 3.0, 0.0]]])
    result = logit_agreement(ref, other)
    assert result["top1"] == 0.5
    p = torch.softmax(ref[0, 0].double(), -1)
    expected = (p * (p.log() - torch.log_softmax(other[0, 0].double(), -1))).sum().item() / 2
    assert result["kl"] == pytest.approx(expected, rel=1e-12)
    masked = torch.tensor([[0.0, float("-inf"), 1.0]])
    assert logit_agreement(masked, torch.tensor([[0.0, 5.0, 1.0]]))["kl"] >= 0  # no NaN from 0 * log 0
    with pytest.raises(InvalidArgumentError):
        logit_agreement(ref, ref[..., :2])


# -- kernel selection (the kernels themselves run on the GPU) ----------------------------------


def test_triton_settings_fit_chatglm2_shapes():
    for in_f, out_f in ((4096, 4608), (4096, 4096), (4096, 27392), (13696, 4096)):
        for bits in (8, 4):
            for m in (1, 8, 32):
                config = triton_config_for(m, out_f, in_f, 128, bits)
                assert isinstance(config, KernelConfig)
    assert triton_config_for(2048, 4096, 4096, 128, 4) is None  # prefill: dequantize + cuBLAS


def test_cpu_never_needs_triton():
    layer = QuantLinear.from_linear(nn.Linear(64, 16), QuantSpec(bits=4, group_size=32))
    assert layer(torch.randn(1, 64)).shape == (1, 16)
    assert isinstance(triton_available(), bool)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or not triton_available(), reason="needs CUDA and Triton")
@pytest.mark.parametrize("spec", [INT8, INT4], ids=["int8", "int4"])
@pytest.mark.parametrize("m", [1, 3, 32, 100])
def test_cuda_forward_matches_dequantized_matmul(spec, m):
    torch.manual_seed(7)
    linear = nn.Linear(13696, 512, bias=True).cuda().half()
    qlinear = QuantLinear.from_linear(linear, spec)
    x = torch.randn(m, 13696, device="cuda", dtype=torch.float16)
    w = dequantize(qlinear.quantized_weight())
    ref = x.float() @ w.T + linear.bias.float()
    assert _rel_err(qlinear(x), ref) < 3e-3
