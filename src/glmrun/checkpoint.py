"""Random checkpoints in the exact official ChatGLM2-6B folder layout, for tests and benchmarks.

One responsibility: write ``config.json``, the weight shards (named and indexed as Hugging Face
does), ``tokenizer.model`` and ``tokenizer_config.json`` for a given shape, filled with deterministic
random values. A folder written here loads through the same code path as a downloaded one, so tests
exercise the real loader, and the full 6B shape can be benchmarked without downloading 12.5 GB.

Writing streams: one shard's tensors are generated, saved and released before the next shard, so
the 6B preset needs about 2 GB of RAM, not 12.5 GB.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import json
import math
import os
import shutil
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file

from .config import ModelConfig
from .errors import CheckpointNotFoundError, InvalidArgumentError
from .weights import official_tensor_shapes

__all__ = [
    "DTYPES",
    "PRESETS",
    "add_parser",
    "default_tokenizer_path",
    "random_tensor",
    "run",
    "write_random_checkpoint",
]

DTYPES: dict[str, torch.dtype] = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}

_CHATGLM2_6B = ModelConfig(
    hidden_size=4096,
    num_layers=28,
    num_attention_heads=32,
    kv_channels=128,
    multi_query_group_num=2,
    ffn_hidden_size=13696,
    padded_vocab_size=65024,
    seq_length=32768,
    layernorm_epsilon=1e-5,
    rotary_dim=64,  # half of each head rotates (official config -> kv_channels // 2)
    add_qkv_bias=True,
    add_bias_linear=False,
    torch_dtype="float16",
)

PRESETS: dict[str, ModelConfig] = {
    # Every ratio of the real model kept (grouped-query attention with 2 KV heads, half of each head
    # rotating, gated MLP, qkv bias), sizes shrunk so a forward pass takes milliseconds. The real
    # vocabulary size keeps the real tokenizer usable.
    "tiny": ModelConfig(
        hidden_size=64,
        num_layers=2,
        num_attention_heads=4,
        kv_channels=16,
        multi_query_group_num=2,
        ffn_hidden_size=128,
        padded_vocab_size=65024,
        seq_length=2048,
        rotary_dim=8,
        add_qkv_bias=True,
        add_bias_linear=False,
        torch_dtype="float32",
    ),
    "chatglm2-6b": _CHATGLM2_6B,
    "chatglm2-6b-32k": _CHATGLM2_6B.replace(rope_ratio=16.0),
}

_DEFAULT_SHARD_BYTES = 2 * 10**9  # transformers' max_shard_size when THUDM saved the official shards

# As in THUDM/chatglm2-6b/tokenizer_config.json.
_TOKENIZER_CONFIG = {
    "name_or_path": "THUDM/chatglm2-6b",
    "remove_space": False,
    "do_lower_case": False,
    "tokenizer_class": "ChatGLMTokenizer",
    "auto_map": {"AutoTokenizer": ["tokenization_chatglm.ChatGLMTokenizer", None]},
    "padding_side": "left",
}


def default_tokenizer_path() -> Path | None:
    """``$GLMRUN_TOKENIZER`` if set, else the copy beside a source checkout, else None."""
    env = os.environ.get("GLMRUN_TOKENIZER")
    if env:
        return Path(env)
    repo = Path(__file__).resolve().parents[2]  # <repo>/src/glmrun/checkpoint.py
    candidate = repo.parent / "shared" / "tokenizers" / "chatglm2" / "tokenizer.model"
    return candidate if candidate.is_file() else None


def random_tensor(name: str, shape: tuple[int, ...], *, seed: int, dtype: torch.dtype) -> torch.Tensor:
    """The value ``name`` gets in a random checkpoint: a function of (seed, name, shape, dtype) only.

    Seeding per tensor makes the values independent of file format and shard count. Scales keep
    every layer's output near unit size whatever the model width, so logits are neither flat nor
    overflowing (float16 included): matrices N(0, 1/fan_in), norm weights 1 + N(0, 0.05), biases N(0, 0.02).
    """
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
    out = torch.empty(shape, dtype=dtype)
    if name.endswith("layernorm.weight"):
        return out.normal_(1.0, 0.05, generator=generator)
    if name.endswith(".bias"):
        return out.normal_(0.0, 0.02, generator=generator)
    if name.endswith("word_embeddings.weight"):
        return out.normal_(0.0, 1.0, generator=generator)
    return out.normal_(0.0, shape[-1] ** -0.5, generator=generator)  # rows = outputs, columns = fan-in


def _inv_freq(config: ModelConfig, dtype: torch.dtype) -> torch.Tensor:
    # What ChatGLM2's RotaryEmbedding stores: one frequency per rotating pair.
    exponents = torch.arange(0, config.rotary_dim, 2, dtype=torch.float32) / config.rotary_dim
    return (1.0 / config.rope_theta**exponents).to(dtype)


def _split_blocks(sizes: list[int], shards: int) -> list[tuple[int, int]]:
    """Cut blocks (in order) into ``shards`` contiguous, non-empty runs of about equal bytes."""
    total, prefix, cuts = sum(sizes), [0], [0]
    for size in sizes:
        prefix.append(prefix[-1] + size)
    for k in range(1, shards):
        cut = next(i for i in range(1, len(sizes) + 1) if prefix[i] * shards >= k * total)
        cuts.append(min(max(cut, cuts[-1] + 1), len(sizes) - (shards - k)))
    cuts.append(len(sizes))
    return list(zip(cuts[:-1], cuts[1:], strict=True))


def _shard_names(fmt: str, shards: int) -> tuple[list[str], str | None]:
    stem, ext = ("model", "safetensors") if fmt == "safetensors" else ("pytorch_model", "bin")
    if shards == 1:
        return [f"{stem}.{ext}"], None
    return [f"{stem}-{k:05d}-of-{shards:05d}.{ext}" for k in range(1, shards + 1)], f"{stem}.{ext}.index.json"


def _save_shard(tensors: dict[str, torch.Tensor], path: Path, fmt: str) -> None:
    if fmt == "safetensors":
        save_file(tensors, str(path), metadata={"format": "pt"})
    else:
        torch.save(tensors, path)


def _resolve_tokenizer(tokenizer_path: Path | None) -> Path | None:
    path = Path(tokenizer_path) if tokenizer_path is not None else default_tokenizer_path()
    if path is None:
        return None
    if path.is_dir():
        path = path / "tokenizer.model"
    if not path.is_file():
        raise CheckpointNotFoundError(f"tokenizer {path} not found: pass the path of a ChatGLM2 tokenizer.model")
    return path


def write_random_checkpoint(
    out: Path,
    config: ModelConfig,
    *,
    fmt: str = "safetensors",
    shards: int | None = None,
    tokenizer_path: Path | None = None,
    seed: int = 0,
    dtype: torch.dtype | None = None,
    include_inv_freq: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Write a random checkpoint of shape ``config`` into the new or empty folder ``out``; return ``out``.

    ``fmt`` is "safetensors" or "bin"; layers are split in order over ``shards`` files of about equal
    size (default: about 2 GB each, as in the official download, so the 6B shape in float16 gets 7).
    One shard is held in memory at a time (measured: 2.3 GB peak RSS for the 6B shape, either format).
    ``dtype`` overrides ``config.torch_dtype`` (config.json records the one written).
    ``include_inv_freq`` adds the rotary buffer the official .bin files carry. ``progress(done, total)``
    is called after each shard, in tensor bytes. Without a tokenizer (see :func:`default_tokenizer_path`)
    no tokenizer.model is written and a warning says so.
    """
    if fmt not in ("safetensors", "bin"):
        raise InvalidArgumentError(f"format must be 'safetensors' or 'bin', got {fmt!r}")
    dtype_name = config.torch_dtype if dtype is None else next((k for k, d in DTYPES.items() if d == dtype), None)
    if dtype_name is None:
        raise InvalidArgumentError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype}")
    config = config.replace(torch_dtype=dtype_name)
    torch_dtype = DTYPES[dtype_name]
    tokenizer = _resolve_tokenizer(tokenizer_path)
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InvalidArgumentError(
            f"{out} exists and is not an empty folder; choose a new folder (nothing overwritten)"
        )

    # Blocks are kept whole within a shard: the embedding, each layer, then the final norm and head.
    shapes = official_tensor_shapes(config)
    blocks: list[list[str]] = []
    last_key = ""
    for name in shapes:
        key = name.split(".")[3] if name.startswith("transformer.encoder.layers.") else name
        if key != last_key:
            blocks.append([])
            last_key = key
        blocks[-1].append(name)
    itemsize = torch.empty((), dtype=torch_dtype).element_size()
    sizes = [sum(itemsize * math.prod(shapes[n]) for n in block) for block in blocks]
    total = sum(sizes)
    if shards is None:
        shards = min(len(blocks), max(1, math.ceil(total / _DEFAULT_SHARD_BYTES)))
    if not 1 <= shards <= len(blocks):
        raise InvalidArgumentError(f"shards must be between 1 and {len(blocks)} for this shape, got {shards}")

    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config.to_chatglm_dict(), indent=2) + "\n", encoding="utf-8")
    file_names, index_name = _shard_names(fmt, shards)
    weight_map: dict[str, str] = {}
    done = 0
    for file_name, (start, stop) in zip(file_names, _split_blocks(sizes, shards), strict=True):
        names = [name for block in blocks[start:stop] for name in block]
        # Each tensor has its own generator, so they can be drawn in parallel (torch releases the GIL).
        with concurrent.futures.ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
            drawn = pool.map(lambda n: random_tensor(n, shapes[n], seed=seed, dtype=torch_dtype), names)
            tensors: dict[str, torch.Tensor] = dict(zip(names, drawn, strict=True))
        if include_inv_freq and "transformer.embedding.word_embeddings.weight" in tensors:
            tensors["transformer.rotary_pos_emb.inv_freq"] = _inv_freq(config, torch_dtype)
        _save_shard(tensors, out / file_name, fmt)
        weight_map.update(dict.fromkeys(tensors, file_name))
        done += sum(sizes[start:stop])
        del tensors  # release this shard before generating the next
        if progress is not None:
            progress(done, total)
    if index_name is not None:
        extra = itemsize * (config.rotary_dim // 2) if include_inv_freq else 0
        index = {"metadata": {"total_size": total + extra}, "weight_map": dict(sorted(weight_map.items()))}
        (out / index_name).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")

    (out / "tokenizer_config.json").write_text(json.dumps(_TOKENIZER_CONFIG, indent=2) + "\n", encoding="utf-8")
    if tokenizer is not None:
        shutil.copyfile(tokenizer, out / "tokenizer.model")
    else:
        warnings.warn(
            f"no tokenizer.model written to {out}: none found (pass tokenizer_path or set GLMRUN_TOKENIZER)",
            UserWarning,
            stacklevel=2,
        )
    return out


# CLI ------------------------------------------------------------------------------------------------
def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``glmrun make-checkpoint``."""
    p = subparsers.add_parser(
        "make-checkpoint",
        help="write a random checkpoint in the official ChatGLM2-6B folder layout (tests, benchmarks)",
        description="Write config.json, random weight shards, tokenizer.model and tokenizer_config.json "
        "into a new folder, laid out exactly like the official THUDM/chatglm2-6b download.",
    )
    p.add_argument("--preset", required=True, choices=sorted(PRESETS), help="model shape")
    p.add_argument("--out", required=True, type=Path, help="new or empty folder to write")
    p.add_argument("--format", dest="fmt", choices=("safetensors", "bin"), default="safetensors", help="shard format")
    p.add_argument("--shards", type=int, default=None, help="number of weight files (default: about 2 GB each)")
    p.add_argument("--tokenizer", type=Path, default=None, help="tokenizer.model to copy (default: $GLMRUN_TOKENIZER)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--dtype", choices=tuple(DTYPES), default=None, help="weight dtype (default: the preset's)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Write the checkpoint and print one line saying what was written. glmrun errors propagate."""
    config = PRESETS[args.preset]
    show = sys.stderr.isatty()

    def report(done: int, total: int) -> None:
        print(f"\rwriting {done / 1e9:.2f} / {total / 1e9:.2f} GB", end="", file=sys.stderr, flush=True)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the missing tokenizer is said in the summary line
        out = write_random_checkpoint(
            args.out,
            config,
            fmt=args.fmt,
            shards=args.shards,
            tokenizer_path=args.tokenizer,
            seed=args.seed,
            dtype=DTYPES[args.dtype] if args.dtype else None,
            progress=report if show else None,
        )
    if show:
        print("\r" + " " * 40 + "\r", end="", file=sys.stderr)
    size = sum(p.stat().st_size for p in out.iterdir())
    dtype = args.dtype or config.torch_dtype
    shards = len([p for p in out.iterdir() if p.suffix in (".bin", ".safetensors")])
    note = "" if (out / "tokenizer.model").is_file() else "; no tokenizer.model (pass --tokenizer)"
    print(
        f"wrote random {args.preset} checkpoint to {out}: {config.num_parameters():,} parameters, {dtype}, "
        f"{shards} {args.fmt} shard(s), {size / 1e9:.2f} GB, seed {args.seed}{note}"
    )
    return 0
