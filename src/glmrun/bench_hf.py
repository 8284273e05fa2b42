"""The transformers baseline of ``glmrun bench --baseline hf``: ``GlmForCausalLM`` on glmrun's own weights.

The baseline shares glmrun's weight tensors (views, no copy), so both stacks run the same numbers in
the same process on the same card. Timed: one prefill forward (last logits only), eager greedy
``generate()``, and ``generate(cache_implementation="static")``, whose first call compiles the step
(reported as warm-up, excluded from its speed).
"""

from __future__ import annotations

import time
from typing import Any

import torch

from .bench import GB, RunStats, bench_prompts
from .model import ChatGLMForCausalLM

__all__ = ["hf_model_sharing_weights", "time_transformers"]


def hf_model_sharing_weights(model: ChatGLMForCausalLM) -> torch.nn.Module:
    import transformers
    from transformers.models.glm.modeling_glm import GlmRotaryEmbedding

    c = model.config
    dev = model.output_weight().device
    dtype = model.output_weight().dtype
    hc = transformers.GlmConfig(
        vocab_size=c.padded_vocab_size,
        hidden_size=c.hidden_size,
        intermediate_size=c.ffn_hidden_size,
        num_hidden_layers=c.num_layers,
        num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_kv_heads,
        head_dim=c.head_dim,
        rms_norm_eps=c.layernorm_epsilon,
        attention_bias=c.add_qkv_bias,
        max_position_embeddings=c.seq_length,
        tie_word_embeddings=False,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": c.rope_theta,
            "partial_rotary_factor": c.rotary_dim / c.head_dim,
        },
        pad_token_id=0,
        eos_token_id=2,
        bos_token_id=None,
        dtype=dtype,
    )
    hc._attn_implementation = "sdpa"
    with torch.device("meta"):
        hf = transformers.GlmForCausalLM(hc)
    q, kv = c.num_attention_heads * c.head_dim, c.num_kv_heads * c.head_dim
    state: dict[str, torch.Tensor] = {
        "model.embed_tokens.weight": model.transformer.embedding.word_embeddings.weight,
        "model.norm.weight": model.transformer.encoder.final_layernorm.weight,
        "lm_head.weight": model.output_weight(),
    }
    for i, layer in enumerate(model.blocks()):
        p = f"model.layers.{i}."
        att = layer.self_attention
        for kind in ("weight", "bias"):
            t = getattr(att.query_key_value, kind)
            if t is not None:
                for proj, part in zip(("q_proj", "k_proj", "v_proj"), t.split([q, kv, kv]), strict=True):
                    state[f"{p}self_attn.{proj}.{kind}"] = part
        state[p + "self_attn.o_proj.weight"] = att.dense.weight
        state[p + "input_layernorm.weight"] = layer.input_layernorm.weight
        state[p + "post_attention_layernorm.weight"] = layer.post_attention_layernorm.weight
        state[p + "mlp.gate_up_proj.weight"] = layer.mlp.dense_h_to_4h.weight
        state[p + "mlp.down_proj.weight"] = layer.mlp.dense_4h_to_h.weight
    hf.load_state_dict(state, assign=True, strict=True)
    with torch.device(dev):  # its inv_freq buffer was left on meta
        hf.model.rotary_emb = GlmRotaryEmbedding(config=hc)
    return hf.eval()


def _timed_generate(hf: torch.nn.Module, ids: torch.Tensor, gen_len: int, t_prefill: float, **kw: Any) -> dict:
    dev = ids.device
    torch.cuda.reset_peak_memory_stats(dev) if dev.type == "cuda" else None
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    t0 = time.perf_counter()
    generate: Any = hf.generate
    out = generate(ids, max_new_tokens=gen_len, min_new_tokens=gen_len, do_sample=False, **kw)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    total = time.perf_counter() - t0
    decode = max(total - t_prefill, 1e-9)
    return {
        "total_s": round(total, 3),
        "decode_tok_s": round(ids.shape[0] * (gen_len - 1) / decode, 2),
        "peak_allocated_gb": round(torch.cuda.max_memory_allocated(dev) / GB, 3) if dev.type == "cuda" else None,
        "tokens": out[0, ids.shape[1] :].tolist(),
    }


def time_transformers(
    model: ChatGLMForCausalLM, ours: RunStats, *, prompt_len: int, gen_len: int, batch: int, generate: bool = True
) -> dict[str, Any]:
    hf = hf_model_sharing_weights(model)
    dev = model.output_weight().device
    ids = bench_prompts(batch, prompt_len, vocab=model.config.padded_vocab_size).to(dev)
    result: dict[str, Any] = {}
    with torch.inference_mode():
        for _ in range(2):  # the first is warm-up
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
                torch.cuda.reset_peak_memory_stats(dev)
            t0 = time.perf_counter()
            hf(ids, logits_to_keep=1)
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            t_prefill = time.perf_counter() - t0
        result["prefill"] = {
            "prefill_s": round(t_prefill, 4),
            "prefill_tok_s": round(batch * prompt_len / t_prefill, 1),
            "peak_allocated_gb": round(torch.cuda.max_memory_allocated(dev) / GB, 3) if dev.type == "cuda" else None,
        }
        result["prefill"]["speedup_glmrun_over_this"] = round(
            ours.prefill_tok_s / result["prefill"]["prefill_tok_s"], 2
        )
        if not generate:
            return result
        eager = _timed_generate(hf, ids, gen_len, t_prefill)
        result["eager"] = eager
        t0 = time.perf_counter()
        _timed_generate(hf, ids, gen_len, t_prefill, cache_implementation="static")  # compiles: warm-up
        warm = time.perf_counter() - t0
        static = _timed_generate(hf, ids, gen_len, t_prefill, cache_implementation="static")
        static["warmup_s"] = round(warm, 1)
        result["static_compiled"] = static
    ours_tokens = ours.tokens
    for name in ("eager", "static_compiled"):
        theirs = result[name].pop("tokens")
        same = 0
        while same < min(len(theirs), len(ours_tokens)) and theirs[same] == ours_tokens[same]:
            same += 1
        result[name]["greedy_tokens_equal_to_glmrun"] = same
        result[name]["speedup_glmrun_over_this"] = round(ours.decode_tok_s / result[name]["decode_tok_s"], 2)
    return result
