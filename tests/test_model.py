"""Golden tests: glmrun's ChatGLM2 against transformers' native GlmForCausalLM, same random weights.

GlmForCausalLM (transformers, written independently from THUDM's remote code) has the same
architecture: RMSNorm, half-head interleaved rotary, grouped KV heads, QKV bias, SwiGLU. The weights
come from a checkpoint glmrun writes in the official folder layout; the mapping to transformers'
names is written here, in the test, so the loader under test does not check itself.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import glmrun
import glmrun.compat
from glmrun.checkpoint import PRESETS, write_random_checkpoint
from glmrun.engine import common_prefix
from glmrun.weights import iter_tensors

transformers = pytest.importorskip("transformers")

TOKENIZER = Path(__file__).resolve().parents[1].parent / "shared/tokenizers/chatglm2/tokenizer.model"
CONFIG = PRESETS["tiny"].replace(num_layers=3, seq_length=512)


def hf_model_from_folder(folder: Path, rope_ratio: float = 1.0) -> torch.nn.Module:
    c = CONFIG
    hc = transformers.GlmConfig(
        vocab_size=c.padded_vocab_size,
        hidden_size=c.hidden_size,
        intermediate_size=c.ffn_hidden_size,
        num_hidden_layers=c.num_layers,
        num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.multi_query_group_num,
        head_dim=c.kv_channels,
        rms_norm_eps=c.layernorm_epsilon,
        attention_bias=True,
        max_position_embeddings=c.seq_length,
        tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0 * rope_ratio, "partial_rotary_factor": 0.5},
        pad_token_id=0,
        eos_token_id=2,
        bos_token_id=None,
    )
    hf = transformers.GlmForCausalLM(hc).eval()
    q, kv = c.num_attention_heads * c.kv_channels, c.multi_query_group_num * c.kv_channels
    state: dict[str, torch.Tensor] = {}
    for name, t in iter_tensors(folder):
        t = t.float()
        if name == "transformer.embedding.word_embeddings.weight":
            state["model.embed_tokens.weight"] = t
        elif name == "transformer.output_layer.weight":
            state["lm_head.weight"] = t
        elif name == "transformer.encoder.final_layernorm.weight":
            state["model.norm.weight"] = t
        elif name.startswith("transformer.encoder.layers."):
            i, rest = name.removeprefix("transformer.encoder.layers.").split(".", 1)
            p = f"model.layers.{i}."
            if rest.startswith("self_attention.query_key_value."):
                kind = rest.rsplit(".", 1)[1]
                for proj, part in zip(("q_proj", "k_proj", "v_proj"), t.split([q, kv, kv]), strict=True):
                    state[f"{p}self_attn.{proj}.{kind}"] = part
            else:
                hf_name = {
                    "input_layernorm.weight": "input_layernorm.weight",
                    "post_attention_layernorm.weight": "post_attention_layernorm.weight",
                    "self_attention.dense.weight": "self_attn.o_proj.weight",
                    "mlp.dense_h_to_4h.weight": "mlp.gate_up_proj.weight",
                    "mlp.dense_4h_to_h.weight": "mlp.down_proj.weight",
                }[rest]
                state[p + hf_name] = t
    hf.load_state_dict(state, strict=True)
    return hf


@pytest.fixture(scope="module", params=["bin", "safetensors"])
def folders(request, tmp_path_factory):
    if not TOKENIZER.is_file():
        pytest.skip("the shared ChatGLM2 tokenizer is not present")
    out = tmp_path_factory.mktemp(f"ckpt-{request.param}")
    write_random_checkpoint(out, CONFIG, fmt=request.param, shards=2, tokenizer_path=TOKENIZER, seed=7)
    glm = glmrun.load(out, device="cpu", dtype="float32", progress=False)
    yield out, glm, hf_model_from_folder(out)
    glm.close()


def test_prefill_and_cached_decode_logits_match_transformers(folders):
    folder, glm, hf = folders
    ids = glm.tokenizer.encode("[Round 1]\n\n问：你好，请介绍一下你自己\n\n答：")
    compat = glmrun.compat.CompatModel(glm)
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]
        out = compat(torch.tensor([ids]), use_cache=True)
        assert out.logits.shape == (1, len(ids), 65024)
        assert (out.logits[0] - ref).abs().max().item() < 1e-4
        past, seq = out.past_key_values, list(ids)
        hf_out = hf(torch.tensor([ids]), use_cache=True)
        hf_past, step_ref = hf_out.past_key_values, ref[-1]
        for _ in range(3):
            nxt = int(step_ref.argmax())
            seq.append(nxt)
            out = compat(torch.tensor([[nxt]]), past_key_values=past, use_cache=True)
            past = out.past_key_values
            hf_out = hf(torch.tensor([[nxt]]), past_key_values=hf_past, use_cache=True)
            hf_past = hf_out.past_key_values
            step_ref = hf_out.logits[0, -1]
            assert (out.logits[0, -1] - step_ref).abs().max().item() < 1e-4
        # the cached path equals one full forward over the whole sequence
        full = hf(torch.tensor([seq])).logits[0, -1]
        assert (out.logits[0, -1] - full).abs().max().item() < 1e-4


def test_32_greedy_tokens_identical(folders):
    _, glm, hf = folders
    ids = glm.tokenizer.encode("[Round 1]\n\n问：写一首诗\n\n答：")
    vocab = glm.tokenizer.vocab_size  # glmrun never samples the output layer's padding rows
    with torch.no_grad():
        ref = hf.generate(
            torch.tensor([ids]),
            max_new_tokens=32,
            min_new_tokens=32,
            do_sample=False,
            suppress_tokens=list(range(vocab, 65024)) + [2],
        )[0, len(ids) :].tolist()
    eos_free = glm.tokenizer.eos_token_ids
    result = glm.generate(ids, max_new_tokens=32, do_sample=False)
    # glmrun stops at EOS; transformers was told never to emit it, so compare up to a possible stop
    assert result.token_ids == ref[: len(result.token_ids)]
    assert len(result.token_ids) == 32 or ref[len(result.token_ids)] in eos_free


def test_rope_ratio_matches_transformers(tmp_path):
    if not TOKENIZER.is_file():
        pytest.skip("the shared ChatGLM2 tokenizer is not present")
    cfg = CONFIG.replace(rope_ratio=16.0)
    write_random_checkpoint(tmp_path / "c", cfg, fmt="safetensors", shards=1, tokenizer_path=TOKENIZER, seed=3)
    with glmrun.load(tmp_path / "c", device="cpu", dtype="float32", progress=False) as glm:
        hf = hf_model_from_folder(tmp_path / "c", rope_ratio=16.0)
        ids = torch.randint(0, 60000, (1, 40), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            diff = (glmrun.compat.CompatModel(glm)(ids).logits - hf(ids).logits).abs().max().item()
    assert diff < 1e-4


def test_stream_chat_ends_with_what_chat_returns(folders):
    _, glm, _ = folders
    reply = glm.chat("你好", max_new_tokens=12, do_sample=False)
    chunks = list(glm.stream_chat("你好", max_new_tokens=12, do_sample=False))
    assert "".join(c.delta for c in chunks) == reply.text
    assert chunks[-1].text == reply.text
    assert chunks[-1].history == reply.history == [("你好", reply.text)]
    text, history = reply  # the official unpacking works
    assert text == reply.text and history == reply.history


def test_turn_two_prefills_only_new_tokens(folders):
    _, glm, _ = folders
    conv = glm.conversation(max_new_tokens=8, do_sample=False)
    first = conv.send("第一个问题")
    assert first.prefilled_tokens == first.prompt_tokens
    cached = list(conv.session.tokens)  # turn 1's prompt and the answer tokens fed back so far
    ids2 = conv.prompt_ids("第二个问题")
    second = conv.send("第二个问题")
    reused = common_prefix(cached, ids2)
    assert second.prompt_tokens == len(ids2)
    assert second.prefilled_tokens == len(ids2) - reused
    assert reused >= first.prompt_tokens  # the whole first prompt came from the cache
    new_text_tokens = len(glm.tokenizer.encode("\n\n[Round 2]\n\n问：第二个问题\n\n答：", add_special_tokens=False))
    assert second.prefilled_tokens <= new_text_tokens + first.completion_tokens
