"""The Python API, the compat layer, generation rules and bad input, on a tiny random ChatGLM2 checkpoint."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import glmrun
import glmrun.compat
from glmrun.checkpoint import PRESETS, write_random_checkpoint
from glmrun.errors import (
    CheckpointNotFoundError,
    ConfigError,
    ContextOverflowError,
    CorruptCheckpointError,
    DeviceError,
    InvalidArgumentError,
    UnsupportedModelError,
    WeightsMismatchError,
)

TOKENIZER = Path(__file__).resolve().parents[1].parent / "shared/tokenizers/chatglm2/tokenizer.model"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    if not TOKENIZER.is_file():
        pytest.skip("the shared ChatGLM2 tokenizer is not present")
    out = tmp_path_factory.mktemp("tiny")
    write_random_checkpoint(out, PRESETS["tiny"], fmt="safetensors", shards=2, tokenizer_path=TOKENIZER, seed=11)
    return out


@pytest.fixture(scope="module")
def glm(folder):
    with glmrun.load(folder, device="cpu", progress=False) as model:
        yield model


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.iterdir()}


# Generation rules ------------------------------------------------------------------------------
def test_max_new_tokens_and_length_finish(glm):
    r = glm.generate("你好", max_new_tokens=5, do_sample=False)
    assert r.completion_tokens <= 5
    assert r.finish_reason in ("length", "stop")
    n_prompt = r.prompt_tokens
    r2 = glm.generate("你好", max_length=n_prompt + 3, do_sample=False)
    assert r2.completion_tokens <= 3


def test_seed_makes_sampling_reproducible(glm):
    a = glm.generate("你好", max_new_tokens=12, temperature=1.0, top_p=0.95, seed=5)
    b = glm.generate("你好", max_new_tokens=12, temperature=1.0, top_p=0.95, seed=5)
    c = glm.generate("你好", max_new_tokens=12, temperature=1.0, top_p=0.95, seed=6)
    assert a.token_ids == b.token_ids
    assert a.token_ids != c.token_ids


def test_eos_stops_generation(glm, monkeypatch):
    first = glm.generate("你好", max_new_tokens=3, do_sample=False).token_ids[0]
    monkeypatch.setattr(glm.tokenizer, "eos_token_ids", (*glm.tokenizer.eos_token_ids, first))
    r = glm.generate("你好", max_new_tokens=3, do_sample=False)
    assert r.finish_reason == "stop" and r.completion_tokens == 0 and r.text == ""


def test_stop_string_cuts_the_text(glm):
    full = glm.generate("你好", max_new_tokens=16, do_sample=False)
    assert len(full.text) > 4
    stop = full.text[2:4]
    r = glm.generate("你好", max_new_tokens=16, do_sample=False, stop=(stop,))
    assert r.finish_reason == "stop"
    assert r.text == full.text[: full.text.index(stop)]


def test_cancel_keeps_the_partial_answer(glm):
    conv = glm.conversation(max_new_tokens=30, do_sample=False)
    count = [0]

    def stop_after_three() -> bool:
        count[0] += 1
        return count[0] >= 3

    chunks = list(conv.stream("你好", should_stop=stop_after_three))
    result = chunks[-1].result
    assert result is not None and result.finish_reason == "cancelled" and result.completion_tokens == 3
    assert conv.history == [("你好", result.text)]


def test_repetition_penalty_changes_greedy_output(glm):
    plain = glm.generate("你好", max_new_tokens=24, do_sample=False)
    penalised = glm.generate("你好", max_new_tokens=24, do_sample=False, repetition_penalty=5.0)
    assert len(set(penalised.token_ids)) >= len(set(plain.token_ids))


def test_context_overflow_raises_with_counts_and_truncate_on_request(folder):
    with glmrun.load(folder, device="cpu", context=64, progress=False) as small:
        long_query = "你好" * 80
        with pytest.raises(ContextOverflowError) as info:
            small.chat(long_query, max_new_tokens=8)
        assert info.value.context_length == 64 and info.value.prompt_tokens > 56
        assert info.value.max_new_tokens == 8
        history = [("第一个问题" * 5, "回答" * 5)] * 3
        reply = small.chat("短问题", history, max_new_tokens=8, do_sample=False, truncate=True)
        assert reply.result.prompt_tokens + 8 <= 64
        assert len(reply.history) < len(history) + 1  # old turns were dropped, as asked


# Compat layer -------------------------------------------------------------------------------------
def test_compat_official_usage(folder):
    tokenizer = glmrun.compat.AutoTokenizer.from_pretrained(str(folder), trust_remote_code=True)
    assert tokenizer.encode("你好") == [64790, 64792, 36474, 54591]
    assert tokenizer.decode(tokenizer.encode("你好")) == "你好"
    assert (
        tokenizer.build_prompt("你好", [("a", "b")]) == "[Round 1]\n\n问：a\n\n答：b\n\n[Round 2]\n\n问：你好\n\n答："
    )
    batch = tokenizer(["你好", "晚上好"], return_tensors="pt")
    assert batch["input_ids"].shape == batch["attention_mask"].shape
    model = glmrun.compat.AutoModel.from_pretrained(str(folder), trust_remote_code=True).float()
    model = model.eval()
    response, history = model.chat(tokenizer, "你好", history=[], do_sample=False, max_new_tokens=6)
    assert history == [("你好", response)]
    streamed = list(model.stream_chat(tokenizer, "你好", history=[], do_sample=False, max_new_tokens=6))
    assert streamed[-1] == (response, [("你好", response)])
    out = model(torch.tensor([tokenizer.encode("你好")]), use_cache=True)
    assert out.logits.shape == (1, 4, 65024)
    step = model(torch.tensor([[int(out.logits[0, -1].argmax())]]), past_key_values=out.past_key_values)
    assert step.logits.shape == (1, 1, 65024)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without a GPU")
def test_compat_cuda_without_gpu_is_a_clear_error(folder):
    model = glmrun.compat.AutoModel.from_pretrained(str(folder), trust_remote_code=True)
    with pytest.raises(DeviceError, match="no CUDA GPU"):
        model.half().cuda()
    with pytest.raises(DeviceError):
        glmrun.compat.load_model_on_gpus(str(folder), num_gpus=2)


# Lifetime ------------------------------------------------------------------------------------------
def test_close_frees_and_later_calls_fail_clearly(folder):
    model = glmrun.load(folder, device="cpu", progress=False)
    model.close()
    model.close()  # twice is fine
    with pytest.raises(glmrun.errors.GlmrunError, match="closed"):
        model.chat("你好")


# Bad input -----------------------------------------------------------------------------------------
def test_missing_folder_and_files(tmp_path, folder):
    with pytest.raises(CheckpointNotFoundError, match="does not exist"):
        glmrun.load(tmp_path / "nope")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointNotFoundError, match="config.json"):
        glmrun.load(empty)
    no_tok = tmp_path / "no_tok"
    shutil.copytree(folder, no_tok)
    (no_tok / "tokenizer.model").unlink()
    with pytest.raises(CheckpointNotFoundError, match="tokenizer.model"):
        glmrun.load(no_tok, device="cpu")


def test_truncated_shard_is_named(tmp_path, folder):
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    shard = sorted(broken.glob("model-*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    before = snapshot(broken)
    with pytest.raises(CorruptCheckpointError, match=shard.name):
        glmrun.load(broken, device="cpu", progress=False)
    assert snapshot(broken) == before  # nothing written into the user's folder


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        ({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}, UnsupportedModelError, "llama"),
        ({"position_encoding_2d": True}, UnsupportedModelError, "first-generation"),
        ({"num_layers": None}, ConfigError, "num_layers"),
        ({"hidden_size": 128}, WeightsMismatchError, "wrong|expected"),
    ],
)
def test_wrong_architecture_or_config(tmp_path, folder, change, error, match):
    bad = tmp_path / "bad"
    shutil.copytree(folder, bad)
    raw = json.loads((bad / "config.json").read_text())
    for key, value in change.items():
        if value is None:
            raw.pop(key)
        else:
            raw[key] = value
    (bad / "config.json").write_text(json.dumps(raw))
    with pytest.raises(error, match=match):
        glmrun.load(bad, device="cpu", progress=False)


def test_bad_json_config(tmp_path, folder):
    bad = tmp_path / "bad"
    shutil.copytree(folder, bad)
    (bad / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        glmrun.load(bad, device="cpu")


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"device": "tpu"}, DeviceError),
        ({"dtype": "float8"}, InvalidArgumentError),
        ({"quantize": "int3"}, InvalidArgumentError),
    ],
)
def test_unknown_device_dtype_quantization(folder, kwargs, error):
    with pytest.raises(error):
        glmrun.load(folder, progress=False, **{"device": "cpu", **kwargs})


@pytest.mark.parametrize("query", ["", "   ", None, 42, b"bytes"])
def test_empty_or_non_text_query(glm, query):
    with pytest.raises(InvalidArgumentError):
        glm.chat(query)


def test_unknown_generation_option_is_named(glm):
    with pytest.raises(InvalidArgumentError, match="temprature"):
        glm.chat("你好", temprature=0.5)
    with pytest.raises(InvalidArgumentError, match="top_p"):
        glm.chat("你好", top_p=1.5)


def test_out_of_memory_is_a_clear_error_and_the_model_stays_usable(glm, monkeypatch):
    # The device is simulated to run out once (no GPU here); what is tested is glmrun's handling.
    real_head = glm.engine.model.head
    calls = [0]

    def failing_head(*args, **kwargs):
        calls[0] += 1
        if calls[0] == 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_head(*args, **kwargs)

    monkeypatch.setattr(glm.engine.model, "head", failing_head)
    with pytest.raises(glmrun.errors.OutOfMemoryError, match="still loaded and usable"):
        glm.generate("你好", max_new_tokens=4, do_sample=False)
    assert not glm.engine.lock.locked()
    assert glm.generate("你好", max_new_tokens=4, do_sample=False).completion_tokens >= 0
