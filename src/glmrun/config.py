"""The model's shape: one frozen dataclass parsed from a checkpoint's own metadata.

Field names follow the official ChatGLM2-6B ``config.json`` so a reader can compare them line by line
with the checkpoint. Llama-family GGUF files are described with the same fields (their metadata is
mapped in :mod:`glmrun.gguf_file`), because both are the same decoder block with other settings.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import CheckpointNotFoundError, ConfigError, UnsupportedModelError

__all__ = ["ModelConfig", "QuantSpec", "load_chatglm_config"]

_DTYPES = ("float32", "float16", "bfloat16")


@dataclass(frozen=True)
class QuantSpec:
    """Weight-only quantization of the linear layers, recorded in a saved config."""

    bits: int  # 8 or 4
    group_size: int = 128
    # The output layer of a model with its own (untied) output matrix: INT8 with the same group size
    # (8), or kept in the compute dtype (None, as checkpoints saved before this field was added).
    head_bits: int | None = 8
    # INT8 codes on a group's own [min, max] with a float16 zero per group, as INT4 always is (True), or
    # symmetric around 0 with no zeros (False, as checkpoints saved before this field was added).
    int8_zero: bool = True

    def __post_init__(self) -> None:
        if self.bits not in (4, 8):
            raise ConfigError(f"quantization bits must be 4 or 8, got {self.bits}")
        if self.head_bits not in (None, 4, 8):
            raise ConfigError(f"quantization head_bits must be 4, 8 or null, got {self.head_bits}")
        if self.group_size <= 0 or self.group_size % 2:
            raise ConfigError(f"quantization group_size must be a positive even number, got {self.group_size}")

    @property
    def name(self) -> str:
        return f"int{self.bits}"

    def head_spec(self) -> QuantSpec | None:
        """How the output layer is quantized (None: kept in the compute dtype)."""
        if self.head_bits is None:
            return None
        return QuantSpec(self.head_bits, self.group_size, head_bits=None, int8_zero=self.int8_zero)

    @property
    def has_zero(self) -> bool:
        """Whether the weights carry a zero per group (INT4 always; INT8 unless saved symmetric)."""
        return self.bits == 4 or self.int8_zero


@dataclass(frozen=True)
class ModelConfig:
    """Everything the model code needs to know about a checkpoint's architecture."""

    hidden_size: int
    num_layers: int
    num_attention_heads: int
    kv_channels: int  # head dimension
    multi_query_group_num: int  # number of key/value heads
    ffn_hidden_size: int
    padded_vocab_size: int
    seq_length: int  # context window in tokens
    layernorm_epsilon: float = 1e-5
    rope_base: float = 10000.0  # before rope_ratio
    rope_ratio: float = 1.0  # ChatGLM2-6B-32K stretches the base by this factor
    rotary_dim: int = 64  # leading dims of each head that rotate; ChatGLM2 rotates half of them
    add_qkv_bias: bool = True
    add_bias_linear: bool = False
    tie_word_embeddings: bool = False
    torch_dtype: str = "float16"
    family: str = "chatglm"  # "chatglm" (ChatGLM2/3) or "llama" (GGUF Llama family)
    eos_token_ids: tuple[int, ...] = (2,)
    pad_token_id: int = 0
    quantization: QuantSpec | None = None
    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        for name in (
            "hidden_size",
            "num_layers",
            "num_attention_heads",
            "kv_channels",
            "multi_query_group_num",
            "ffn_hidden_size",
            "padded_vocab_size",
            "seq_length",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"config key {name!r} must be a positive integer, got {value!r}")
        if self.num_attention_heads % self.multi_query_group_num:
            raise ConfigError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"multi_query_group_num ({self.multi_query_group_num})"
            )
        if self.rotary_dim % 2 or not 0 < self.rotary_dim <= self.kv_channels:
            raise ConfigError(f"rotary_dim {self.rotary_dim} must be even and at most kv_channels {self.kv_channels}")
        if self.torch_dtype not in _DTYPES:
            raise ConfigError(f"torch_dtype must be one of {_DTYPES}, got {self.torch_dtype!r}")
        if self.family not in ("chatglm", "llama"):
            raise ConfigError(f"unknown model family {self.family!r}")

    # Derived sizes -------------------------------------------------------------------------
    @property
    def num_kv_heads(self) -> int:
        return self.multi_query_group_num

    @property
    def head_dim(self) -> int:
        return self.kv_channels

    @property
    def qkv_size(self) -> int:
        return (self.num_attention_heads + 2 * self.num_kv_heads) * self.head_dim

    @property
    def rope_theta(self) -> float:
        return self.rope_base * self.rope_ratio

    def kv_bytes_per_token(self, dtype_bytes: int = 2) -> int:
        return self.num_layers * 2 * self.num_kv_heads * self.head_dim * dtype_bytes

    def num_parameters(self) -> int:
        h, f, v = self.hidden_size, self.ffn_hidden_size, self.padded_vocab_size
        attn = h * self.qkv_size + (self.qkv_size if self.add_qkv_bias else 0)
        attn += self.num_attention_heads * self.head_dim * h
        mlp = h * 2 * f + f * h
        layer = attn + mlp + 2 * h
        out = 0 if self.tie_word_embeddings else v * h
        return v * h + self.num_layers * layer + h + out

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    # The official config.json ------------------------------------------------------------
    @classmethod
    def from_chatglm_dict(cls, raw: dict[str, Any], *, source: str = "config.json") -> ModelConfig:
        """Parse an official ChatGLM2/ChatGLM3 ``config.json`` (unknown keys are ignored on purpose)."""
        model_type = raw.get("model_type")
        archs = raw.get("architectures") or []
        if model_type != "chatglm":
            raise UnsupportedModelError(
                f"{source}: model_type is {model_type!r} (architectures {archs}); glmrun loads ChatGLM2-6B / "
                "ChatGLM3-6B folders (model_type 'chatglm') and Llama-family .gguf files"
            )
        if raw.get("position_encoding_2d") is not None or "inner_hidden_size" in raw:
            raise UnsupportedModelError(
                f"{source}: this is a first-generation ChatGLM-6B config (2D position encoding); glmrun runs "
                "ChatGLM2-6B and ChatGLM3-6B"
            )

        def need(key: str) -> Any:
            if key not in raw:
                raise ConfigError(f"{source}: required key {key!r} is missing")
            return raw[key]

        if not raw.get("rmsnorm", True):
            raise UnsupportedModelError(f"{source}: rmsnorm=false (LayerNorm) is not a ChatGLM2 setting glmrun runs")
        if not raw.get("post_layer_norm", True):
            raise UnsupportedModelError(f"{source}: post_layer_norm=false is not supported")
        if not raw.get("original_rope", True):
            raise UnsupportedModelError(f"{source}: original_rope=false is not supported")
        multi_query = bool(raw.get("multi_query_attention", False))
        heads = int(need("num_attention_heads"))
        hidden = int(need("hidden_size"))
        kv_channels = int(raw.get("kv_channels") or hidden // heads)
        quant = raw.get("glmrun_quantization")
        eos = raw.get("eos_token_id", 2)
        try:
            return cls(
                hidden_size=hidden,
                num_layers=int(need("num_layers")),
                num_attention_heads=heads,
                kv_channels=kv_channels,
                multi_query_group_num=int(need("multi_query_group_num")) if multi_query else heads,
                ffn_hidden_size=int(need("ffn_hidden_size")),
                padded_vocab_size=int(need("padded_vocab_size")),
                seq_length=int(need("seq_length")),
                layernorm_epsilon=float(raw.get("layernorm_epsilon", 1e-5)),
                rope_ratio=float(raw.get("rope_ratio", 1.0)),
                rotary_dim=kv_channels // 2,
                add_qkv_bias=bool(raw.get("add_qkv_bias", False)),
                add_bias_linear=bool(raw.get("add_bias_linear", False)),
                torch_dtype=str(raw.get("torch_dtype", "float16")),
                family="chatglm",
                eos_token_ids=tuple(eos) if isinstance(eos, list) else (int(eos),),
                pad_token_id=int(raw.get("pad_token_id", 0) or 0),
                quantization=QuantSpec(**{"head_bits": None, "int8_zero": False, **quant}) if quant else None,
                extra={k: raw[k] for k in ("architectures", "auto_map") if k in raw},
            )
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{source}: {exc}") from exc

    def to_chatglm_dict(self) -> dict[str, Any]:
        """The official ``config.json`` for this shape (what ``make-checkpoint`` and ``quantize`` write)."""
        if self.family != "chatglm":
            raise ConfigError("only ChatGLM configs can be written as config.json")
        out: dict[str, Any] = {
            "_name_or_path": "THUDM/chatglm2-6b",
            "model_type": "chatglm",
            "architectures": ["ChatGLMModel"],
            "auto_map": {
                "AutoConfig": "configuration_chatglm.ChatGLMConfig",
                "AutoModel": "modeling_chatglm.ChatGLMForConditionalGeneration",
                "AutoModelForCausalLM": "modeling_chatglm.ChatGLMForConditionalGeneration",
                "AutoModelForSeq2SeqLM": "modeling_chatglm.ChatGLMForConditionalGeneration",
            },
            "add_bias_linear": self.add_bias_linear,
            "add_qkv_bias": self.add_qkv_bias,
            "apply_query_key_layer_scaling": True,
            "apply_residual_connection_post_layernorm": False,
            "attention_dropout": 0.0,
            "attention_softmax_in_fp32": True,
            "bias_dropout_fusion": True,
            "ffn_hidden_size": self.ffn_hidden_size,
            "fp32_residual_connection": False,
            "hidden_dropout": 0.0,
            "hidden_size": self.hidden_size,
            "kv_channels": self.kv_channels,
            "layernorm_epsilon": self.layernorm_epsilon,
            "multi_query_attention": self.multi_query_group_num != self.num_attention_heads,
            "multi_query_group_num": self.multi_query_group_num,
            "num_attention_heads": self.num_attention_heads,
            "num_layers": self.num_layers,
            "original_rope": True,
            "padded_vocab_size": self.padded_vocab_size,
            "post_layer_norm": True,
            "rmsnorm": True,
            "seq_length": self.seq_length,
            "use_cache": True,
            "torch_dtype": self.torch_dtype,
            "transformers_version": "4.27.1",
            "tie_word_embeddings": False,
            "eos_token_id": self.eos_token_ids[0] if len(self.eos_token_ids) == 1 else list(self.eos_token_ids),
            "pad_token_id": self.pad_token_id,
        }
        if self.rope_ratio != 1.0:
            out["rope_ratio"] = self.rope_ratio
        if self.quantization is not None:
            q = self.quantization
            out["glmrun_quantization"] = {
                "bits": q.bits,
                "group_size": q.group_size,
                "head_bits": q.head_bits,
                "int8_zero": q.int8_zero,
            }
        return out


def load_chatglm_config(folder: Path) -> ModelConfig:
    """Read ``folder/config.json``; errors name the file and the problem."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise CheckpointNotFoundError(
            f"{path} not found: a ChatGLM2-6B folder holds config.json, the weight shards and tokenizer.model "
            "(download the whole THUDM/chatglm2-6b folder)"
        )
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path} is not valid JSON ({exc}); download it again") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must hold a JSON object")
    return ModelConfig.from_chatglm_dict(raw, source=str(path))
