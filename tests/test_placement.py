"""The memory planner, on made-up GPUs: sizes, splits, the ways out when nothing fits, and user text."""

from __future__ import annotations

import itertools
import json

import pytest

from glmrun.config import ModelConfig, QuantSpec
from glmrun.errors import InvalidArgumentError, PlacementError
from glmrun.placement import (
    CUDA_CONTEXT_RESERVE,
    DeviceSpec,
    NoFitError,
    Unit,
    Workload,
    even_split,
    model_units,
    parse_devices,
    parse_max_memory,
    parse_memory,
    plan_from_assignment,
    plan_model,
    plan_placement,
)

GiB = 1024**3
MiB = 1024**2

# The ChatGLM2-6B shape, written out here so the planner is checked against numbers it did not produce.
CHATGLM2_6B = ModelConfig(
    hidden_size=4096,
    num_layers=28,
    num_attention_heads=32,
    kv_channels=128,
    multi_query_group_num=2,
    ffn_hidden_size=13696,
    padded_vocab_size=65024,
    seq_length=32768,
    rotary_dim=64,
    add_qkv_bias=True,
)


def gpu(index: int, total_gib: float, budget_gib: float | None = None) -> DeviceSpec:
    total = int(total_gib * GiB)
    budget = int(budget_gib * GiB) if budget_gib is not None else total - CUDA_CONTEXT_RESERVE
    return DeviceSpec(index, f"test GPU {index}", total, budget)


def order(plan_assignment: dict[str, int], units: list[Unit]) -> list[int]:
    return [plan_assignment[u.name] for u in units]


# -- sizes -------------------------------------------------------------------------------------------


def test_chatglm2_6b_fp16_weights_are_exact():
    units = model_units(CHATGLM2_6B)
    assert [u.name for u in units] == ["embedding", *(f"layers.{i}" for i in range(28)), "head"]
    assert sum(u.weight_bytes for u in units) == 6_243_584_000 * 2 == 12_487_168_000
    assert CHATGLM2_6B.num_parameters() == 6_243_584_000
    assert units[0].weight_bytes == 65024 * 4096 * 2  # the embedding table
    assert units[-1].weight_bytes == 65024 * 4096 * 2 + 4096 * 2  # output layer + final norm
    assert units[1].kv_bytes_per_token * 28 == 28_672  # per token in fp16, as GPU.md
    assert units[1].weight_bytes == 2 * (4608 * 4096 + 4608 + 4096 * 4096 + 27392 * 4096 + 4096 * 13696 + 2 * 4096)


def test_float32_doubles_weights():
    fp32 = model_units(CHATGLM2_6B, dtype_bytes=4, kv_dtype_bytes=4)
    assert sum(u.weight_bytes for u in fp32) == 4 * 6_243_584_000


def _linears_int8(group: int) -> int:
    shapes = [(4608, 4096), (4096, 4096), (27392, 4096), (4096, 13696)]
    return sum(o * i + 2 * o * (i // group) * 2 for o, i in shapes)  # int8 codes + float16 scales and zeros


def _linears_int4(group: int) -> int:
    shapes = [(4608, 4096), (4096, 4096), (27392, 4096), (4096, 13696)]
    return sum(o * i // 2 + 2 * o * (i // group) * 2 for o, i in shapes)  # packed codes + scales + zeros


def test_quantized_layer_sizes():
    fp16 = model_units(CHATGLM2_6B)[1].weight_bytes
    rest = (4608 + 2 * 4096) * 2  # qkv bias and the two norms stay in fp16
    int8 = model_units(CHATGLM2_6B, quant=QuantSpec(8))[1].weight_bytes
    int4 = model_units(CHATGLM2_6B, quant=QuantSpec(4))[1].weight_bytes
    assert int8 == _linears_int8(128) + rest
    assert int4 == _linears_int4(128) + rest
    assert 0.50 < int8 / fp16 < 0.52  # about half, plus a scale and a zero per 128 weights
    assert 0.25 < int4 / fp16 < 0.28  # about a quarter, plus a scale and a zero per 128 weights
    # The embedding stays in fp16; the output layer is INT8 (head_bits=8, the loader's default) or fp16.
    head8 = 65024 * 4096 + 2 * 65024 * 32 * 2 + 4096 * 2  # codes, fp16 scale and zero per 128, the final norm
    for spec in (QuantSpec(8), QuantSpec(4)):
        units = model_units(CHATGLM2_6B, quant=spec)
        assert units[0].weight_bytes == 65024 * 4096 * 2 and units[-1].weight_bytes == head8
        exact_head = model_units(CHATGLM2_6B, quant=QuantSpec(spec.bits, head_bits=None))[-1].weight_bytes
        assert exact_head == 65024 * 4096 * 2 + 4096 * 2
    head4 = model_units(CHATGLM2_6B, quant=QuantSpec(4, head_bits=4))[-1].weight_bytes
    assert head4 == 65024 * 4096 // 2 + 2 * 65024 * 32 * 2 + 4096 * 2


def test_quantize_on_load_costs_one_float_layer_while_loading():
    on_load = model_units(CHATGLM2_6B, quant=QuantSpec(4))[1]
    saved = model_units(CHATGLM2_6B.replace(quantization=QuantSpec(4)))[1]
    fp16 = model_units(CHATGLM2_6B)[1].weight_bytes
    assert saved.weight_bytes == on_load.weight_bytes
    assert saved.load_extra_bytes == 0
    assert on_load.load_extra_bytes > fp16 - on_load.weight_bytes


def test_dequant_chunk_mirrors_the_kernels():
    kernels = pytest.importorskip("glmrun.quant_kernels")
    from glmrun.placement_units import DEQUANT_CHUNK_ELEMENTS

    assert getattr(kernels, "_GPU_CHUNK_ELEMENTS", DEQUANT_CHUNK_ELEMENTS) == DEQUANT_CHUNK_ELEMENTS


def test_tied_embeddings_count_the_table_once():
    tied = CHATGLM2_6B.replace(tie_word_embeddings=True)
    units = model_units(tied)
    assert units[-1].weight_bytes == 4096 * 2  # the head only owns its norm
    assert sum(u.weight_bytes for u in units) == tied.num_parameters() * 2
    assert any(t.label == "logits" for t in units[0].transients)  # logits are computed next to the table


def test_activations_follow_the_step_shape():
    layer = model_units(CHATGLM2_6B)[1]
    a = layer.activation_bytes(Workload(4096, prefill_chunk=512))
    assert layer.activation_bytes(Workload(4096, prefill_chunk=2048)) > a
    # One sequence attends through SDPA's causal kernels: nothing of size chunk x context.
    assert layer.activation_bytes(Workload(32768, prefill_chunk=512)) == a
    # The MLP is the widest moment of a one-sequence chunk: residual, norm, up (2 ffn), silu, product.
    assert a == 512 * (2 * 4096 + 4 * 13696) * 2
    # A short context caps the chunk: 100 tokens never need a 2048-token step.
    assert layer.activation_bytes(Workload(100, prefill_chunk=2048)) == layer.activation_bytes(
        Workload(100, prefill_chunk=100)
    )
    # Several sequences in a step attend through a mask [g * tokens, context] each, plus its fp16 copy.
    masked = layer.activation_bytes(Workload(16384, prefill_chunk=2048, prefill_batch=2))
    assert 2 * 2048 * 16384 * 16 * 3 < masked < 2 * 2048 * 16384 * 16 * 3 + 2 * 300 * MiB
    decode_32k = layer.activation_bytes(Workload(32768, batch=64, prefill_chunk=16))
    assert decode_32k > layer.activation_bytes(Workload(8192, batch=64, prefill_chunk=16))
    assert decode_32k >= 64 * 32768 * 16 * 3


def test_workload_rejects_non_positive_numbers():
    with pytest.raises(InvalidArgumentError, match="context length"):
        Workload(0)
    with pytest.raises(InvalidArgumentError, match="batch"):
        plan_placement(model_units(CHATGLM2_6B), [gpu(0, 80)], context_length=8, batch=0)


# -- plans -------------------------------------------------------------------------------------------


def check_plan(plan, units, devices):
    devs = order(plan.assignment, units)
    assert devs == sorted(devs, key=[d.index for d in devices].index)  # contiguous, in device order
    assert set(plan.assignment) == {u.name for u in units}
    for dp in plan.per_device:
        assert dp.predicted_peak_bytes <= dp.budget_bytes
        assert dp.predicted_peak_bytes >= dp.weight_bytes + dp.kv_bytes
    assert plan.fits
    # The table the planner searched agrees with an independent evaluation of its answer.
    again = plan_from_assignment(
        units,
        devices,
        plan.assignment,
        context_length=plan.workload.context_length,
        batch=plan.workload.batch,
        prefill_chunk=plan.workload.prefill_chunk,
    )
    assert again.per_device == plan.per_device


def test_uneven_cards_3060ti_and_3060_at_8k():
    units = model_units(CHATGLM2_6B)
    devices = [gpu(0, 8, 7.5), gpu(1, 12, 11.5)]
    plan = plan_placement(units, devices, context_length=8192)
    check_plan(plan, units, devices)
    small, big = plan.per_device
    assert big.num_layers > small.num_layers
    assert small.num_layers + big.num_layers == 28
    assert plan.assignment["embedding"] == 0 and plan.assignment["head"] == 1
    assert abs(small.utilization - big.utilization) < 0.1  # headroom spread in proportion to the budgets
    assert plan.layer_devices == [0] * small.num_layers + [1] * big.num_layers


def test_split_minimizes_the_largest_utilization():
    units = model_units(CHATGLM2_6B)
    devices = [gpu(0, 8, 7.5), gpu(1, 12, 11.5)]
    plan = plan_placement(units, devices, context_length=8192)
    best = min(
        max(
            dp.utilization
            for dp in plan_from_assignment(
                units, devices, {u.name: int(i >= cut) for i, u in enumerate(units)}, context_length=8192
            ).per_device
        )
        for cut in range(len(units) + 1)
    )
    assert plan.max_utilization == pytest.approx(best)


def test_three_devices_brute_force_optimum():
    units = [Unit(f"u{i}", weight_bytes=w * MiB) for i, w in enumerate([5, 9, 2, 7, 7, 3, 8, 1, 6])]
    devices = [
        DeviceSpec(0, "a", 40 * MiB, 20 * MiB, 0, 0),
        DeviceSpec(1, "b", 40 * MiB, 30 * MiB, 0, 0),
        DeviceSpec(2, "c", 40 * MiB, 25 * MiB, 0, 0),
    ]
    plan = plan_placement(units, devices, context_length=1)
    n = len(units)
    best = min(
        max(
            sum(u.weight_bytes for u in units[a:b]) / d.budget_bytes
            for d, a, b in zip(devices, (0, c1, c2), (c1, c2, n), strict=True)
        )
        for c1, c2 in itertools.combinations_with_replacement(range(n + 1), 2)
    )
    assert plan.max_utilization == pytest.approx(best)
    check_plan(plan, units, devices)


def test_eight_cards():
    units = model_units(CHATGLM2_6B)
    devices = [gpu(i, 24) for i in range(8)]
    plan = plan_placement(units, devices, context_length=32768)
    check_plan(plan, units, devices)
    layers = [dp.num_layers for dp in plan.per_device]
    assert sum(layers) == 28 and min(layers) >= 2 and max(layers) - min(layers) <= 2


def test_one_big_card_holds_everything():
    units = model_units(CHATGLM2_6B)
    plan = plan_placement(units, [gpu(0, 80)], context_length=32768, batch=4)
    check_plan(plan, units, [gpu(0, 80)])
    (dp,) = plan.per_device
    assert dp.units == tuple(u.name for u in units)
    assert dp.kv_bytes == 28_672 * 32768 * 4


def test_device_indices_are_kept():
    units = model_units(CHATGLM2_6B)
    devices = [gpu(3, 12), gpu(1, 12)]  # pipeline order is the list's order, not the index
    plan = plan_placement(units, devices, context_length=4096)
    check_plan(plan, units, devices)
    assert plan.assignment["embedding"] == 3 and plan.assignment["head"] == 1


def test_more_devices_than_needed_still_spread():
    units = model_units(CHATGLM2_6B)
    devices = [gpu(0, 80), gpu(1, 80)]
    plan = plan_placement(units, devices, context_length=2048)
    assert all(dp.num_layers >= 12 for dp in plan.per_device)


def test_even_split_reproduces_the_official_map():
    two = even_split(28, 2)
    assert two["embedding"] == two["head"] == 0
    assert [two[f"layers.{i}"] for i in range(28)] == [0] * 13 + [1] * 15
    four = even_split(28, 4)
    assert [four[f"layers.{i}"] for i in range(28)] == [0] * 6 + [1] * 8 + [2] * 8 + [3] * 6
    eight = even_split(28, 8)
    assert [eight[f"layers.{i}"] for i in range(28)] == [0] * 2 + [d for d in range(1, 7) for _ in range(4)] + [7] * 2
    assert set(even_split(28, 1).values()) == {0}
    with pytest.raises(InvalidArgumentError):
        even_split(28, 0)


def test_even_split_overflows_a_small_first_card_where_the_plan_fits():
    units = model_units(CHATGLM2_6B)
    devices = [gpu(0, 4), gpu(1, 8), gpu(2, 8)]
    official = plan_from_assignment(units, devices, even_split(28, 3), context_length=8192)
    assert not official.fits and not official.per_device[0].fits
    plan = plan_placement(units, devices, context_length=8192)
    check_plan(plan, units, devices)


# -- when nothing fits -------------------------------------------------------------------------------


def test_two_4gib_cards_cannot_hold_fp16_and_int4_is_offered():
    devices = [gpu(0, 4), gpu(1, 4)]
    with pytest.raises(PlacementError) as info:
        plan_model(CHATGLM2_6B, devices, context_length=8192)
    err = info.value
    assert isinstance(err, NoFitError)
    assert err.available_bytes == {0: 4 * GiB - CUDA_CONTEXT_RESERVE, 1: 4 * GiB - CUDA_CONTEXT_RESERVE}
    assert all(err.needed_bytes[i] > err.available_bytes[i] for i in (0, 1))
    assert err.total_needed_bytes > 12_487_168_000
    text = str(err)
    assert "3.50 GiB" in text and "cuda:0" in text and "cuda:1" in text and "--quantize int4" in text
    by_kind = {s.kind: s for s in err.suggestions}
    assert "context" not in by_kind  # the weights alone are too big at any context
    int4 = next(s for s in err.suggestions if s.value == "int4")
    assert int4.plan.fits
    # Really fits: plan the INT4 units from scratch.
    units4 = model_units(CHATGLM2_6B, quant=QuantSpec(4))
    check_plan(plan_placement(units4, devices, context_length=8192), units4, devices)
    assert json.loads(json.dumps(err.to_json()))["kind"] == "no_fit"


def test_suggested_device_is_the_smallest_that_fits():
    units = model_units(CHATGLM2_6B)
    devices = [gpu(0, 4), gpu(1, 4)]
    with pytest.raises(NoFitError) as info:
        plan_placement(units, devices, context_length=8192)
    size = next(s for s in info.value.suggestions if s.kind == "add_device").value
    assert isinstance(size, int)
    plan_placement(units, [*devices, DeviceSpec(2, "x", size, size - CUDA_CONTEXT_RESERVE)], context_length=8192)
    smaller = size - MiB
    with pytest.raises(NoFitError):
        plan_placement(
            units, [*devices, DeviceSpec(2, "x", smaller, smaller - CUDA_CONTEXT_RESERVE)], context_length=8192
        )


def test_suggested_context_and_chunk_are_the_largest_that_fit():
    units = model_units(CHATGLM2_6B)
    peak = plan_placement(units, [gpu(0, 80)], context_length=32768).per_device[0].predicted_peak_bytes
    devices = [DeviceSpec(0, "tight", peak + CUDA_CONTEXT_RESERVE, peak - 100 * MiB)]
    with pytest.raises(NoFitError) as info:
        plan_placement(units, devices, context_length=32768)
    by_kind = {s.kind: s.value for s in info.value.suggestions}
    context, chunk = by_kind["context"], by_kind["prefill_chunk"]
    assert isinstance(context, int) and isinstance(chunk, int)
    check_plan(plan_placement(units, devices, context_length=context), units, devices)
    with pytest.raises(NoFitError):
        plan_placement(units, devices, context_length=context + 1)
    check_plan(plan_placement(units, devices, context_length=32768, prefill_chunk=chunk), units, devices)
    with pytest.raises(NoFitError):
        plan_placement(units, devices, context_length=32768, prefill_chunk=chunk + 1)
    assert f"--context {context}" in str(info.value) and f"--prefill-chunk {chunk}" in str(info.value)


def test_bad_inputs():
    units = model_units(CHATGLM2_6B)
    with pytest.raises(InvalidArgumentError):
        plan_placement(units, [], context_length=8)
    with pytest.raises(InvalidArgumentError):
        plan_placement(units, [gpu(0, 8), gpu(0, 8)], context_length=8)
    with pytest.raises(InvalidArgumentError):
        plan_from_assignment(units, [gpu(0, 8)], {"embedding": 0}, context_length=8)


def test_summary_and_json():
    units = model_units(CHATGLM2_6B)
    plan = plan_placement(units, [gpu(0, 8, 7.5), gpu(1, 12, 11.5)], context_length=8192)
    text = plan.summary()
    assert "cuda:0" in text and "cuda:1" in text and "embedding, layers 0-" in text and ", head" in text
    data = json.loads(json.dumps(plan.to_json()))
    assert data["fits"] is True and data["context_length"] == 8192
    assert [d["num_layers"] for d in data["devices"]] == [dp.num_layers for dp in plan.per_device]
    assert data["assignment"]["layers.27"] == 1


# -- user text ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("7.5GiB", 8_053_063_680),
        ("8GB", 8_000_000_000),
        ("512MiB", 512 * MiB),
        ("1024", 1024),
        (" 11.5 gib ", int(11.5 * GiB)),
        ("0.5TiB", 512 * GiB),
        ("100kb", 100_000),
        (".5GiB", GiB // 2),
    ],
)
def test_parse_memory(text, expected):
    assert parse_memory(text) == expected


@pytest.mark.parametrize("text", ["", "GiB", "8G", "8 gigs", "-1GiB", "0", "0.0GiB", "1.2.3GB", "7,5GiB", "nan"])
def test_parse_memory_errors_name_the_text(text):
    with pytest.raises(InvalidArgumentError) as info:
        parse_memory(text)
    assert repr(text) in str(info.value)


def test_parse_max_memory():
    assert parse_max_memory("0=7.5GiB,1=11.5GiB") == {0: int(7.5 * GiB), 1: int(11.5 * GiB)}
    assert parse_max_memory("cuda:1 = 8GB") == {1: 8_000_000_000}
    for bad, fragment in [
        ("0:7GiB", "'0:7GiB'"),
        ("0=", "'0='"),
        ("x=1GiB", "'x'"),
        ("0=1GiB,0=2GiB", "twice"),
        ("0=1GiB,", "''"),
        ("0=lots", "'lots'"),
    ]:
        with pytest.raises(InvalidArgumentError, match=fragment):
            parse_max_memory(bad)


def test_parse_devices():
    assert parse_devices("0,1") == [0, 1]
    assert parse_devices("cuda:1, 0") == [1, 0]
    for bad in ["", "0,,1", "a", "0,0", "-1", "1.5"]:
        with pytest.raises(InvalidArgumentError) as info:
            parse_devices(bad)
        assert repr(bad) in str(info.value) or "twice" in str(info.value)


# -- on a GPU: the predictions against torch's own peak readings ---------------------------------------


def _cuda():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    return torch


@pytest.mark.gpu
@pytest.mark.parametrize(
    ("context", "chunk", "rows", "bits"),
    [
        (8192, 2048, 1, None),
        (8192, 512, 1, None),
        (4096, 4096, 1, None),
        (16384, 2048, 1, None),
        (8192, 512, 8, None),
        (8192, 2048, 1, 8),
        (8192, 2048, 4, 4),
    ],
)
def test_predicted_peak_bounds_the_measured_one(context, chunk, rows, bits):
    """Prefill one sequence in chunks (as Engine.prefill), then decode a step of ``rows`` sequences."""
    torch = _cuda()
    from glmrun.cache import KVCache
    from glmrun.model import ChatGLMForCausalLM

    config = CHATGLM2_6B.replace(num_layers=4)
    dev = torch.device("cuda")
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    model = ChatGLMForCausalLM(config, device=dev, dtype=torch.float16).eval()
    if bits is not None:  # as a saved quantized checkpoint loads: the float weights are gone before the run
        from glmrun.quant import quantize_head_, quantize_model_

        spec = QuantSpec(bits)
        config = config.replace(quantization=spec)
        quantize_model_(model, spec, skip=lambda name: not name.startswith("transformer.encoder.layers."))
        quantize_head_(model, spec)  # the output layer too (INT8), as the plan and the loader have it
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    cache = KVCache(config, rows=rows, max_len=context, dtype=torch.float16, devices=[dev] * 4)
    with torch.inference_mode():
        for lo in range(0, context - 1, chunk):
            hi = min(lo + chunk, context - 1)
            tokens = torch.randint(0, 65000, (1, hi - lo), device=dev)
            model(tokens, torch.arange(lo, hi, device=dev)[None], cache, length=hi, logits="last")
        tokens = torch.randint(0, 65000, (rows, 1), device=dev)
        model(tokens, torch.full((rows, 1), context - 1, device=dev), cache, length=context)
    torch.cuda.synchronize()
    measured = torch.cuda.max_memory_allocated() - base
    plan = plan_placement(model_units(config), [gpu(0, 80)], context_length=context, batch=rows, prefill_chunk=chunk)
    dp = plan.per_device[0]
    print(
        f"measured {measured / MiB:.0f} MiB, predicted {dp.predicted_peak_bytes / MiB:.0f} MiB "
        f"(activations {dp.activation_bytes / MiB:.0f} MiB)"
    )
    assert measured <= dp.predicted_peak_bytes <= measured + 0.2 * dp.activation_bytes + 96 * MiB
