"""Blocked (oneDNN) float32 matrices for multi-row products on the CPU: same numbers, same state dict."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from glmrun.cpu_linear import (
    HalfWeightLinear,
    PackedLinear,
    blocked_supported,
    half_weights_,
    half_weights_supported,
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
