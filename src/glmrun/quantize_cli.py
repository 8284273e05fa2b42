"""``glmrun quantize``: write a weight-only INT8/INT4 copy of a ChatGLM2 folder that loads directly.

The output is an official-layout folder (config.json, safetensors shards with their index,
tokenizer files) whose config records the format under ``glmrun_quantization``; ``glmrun.load`` sees
it and builds quantized layers before reading the packed tensors. The source folder is only read.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch

from .checkpoint import _save_shard, _shard_names, _split_blocks
from .errors import InvalidArgumentError

__all__ = ["add_parser", "run", "save_quantized"]

_SHARD_BYTES = 2 * 10**9


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "quantize",
        help="save a weight-only INT8/INT4 copy of a ChatGLM2 folder",
        description="Quantize a ChatGLM2/3 folder's linear layers (group-wise scales) and save a folder that "
        "glmrun loads directly. The source folder is never modified.",
    )
    p.add_argument("--model", required=True, help="the ChatGLM2/3 folder to read")
    p.add_argument("--to", required=True, choices=["int8", "int4"], help="the format to write")
    p.add_argument("--out", required=True, help="a new (or empty) folder to write")
    p.add_argument("--group-size", type=int, default=128, help="weights per scale (default 128)")
    p.add_argument(
        "--dtype",
        default="float16",
        choices=["float16", "bfloat16", "float32"],
        help="dtype of the unquantized parts (embedding, norms, biases); the output layer is saved as INT8",
    )
    p.add_argument("--device", default="cpu", help="where to quantize (cuda is faster)")
    p.set_defaults(func=run)


def save_quantized(
    model: torch.nn.Module, config_dict: dict, source: Path, out: Path, dtype: torch.dtype | None = None
) -> int:
    """Write ``model``'s state (packed weights included) as safetensors shards plus config and tokenizer.

    ``dtype``: the float tensors' dtype on disk (the embedding, norms, biases; scales and zeros stay float16). A
    model loaded on the CPU computes in float32 whatever its dtype, so without it a float16 folder would be written
    in float32. Tiled INT4 layers (quantized on CUDA) are put back in the canonical order in place first, so the
    state needs no second copy of the codes on the GPU."""
    from .quant import QuantLinear

    for module in model.modules():
        if isinstance(module, QuantLinear):
            module.untile_()
    state = {name: _on_disk(name, t.detach(), dtype) for name, t in model.state_dict().items()}
    names = list(state)
    sizes = [state[n].numel() * state[n].element_size() for n in names]
    shards = max(1, min(len(names), -(-sum(sizes) // _SHARD_BYTES)))
    files, index_name = _shard_names("safetensors", shards)
    weight_map: dict[str, str] = {}
    for (lo, hi), file in zip(_split_blocks(sizes, shards), files, strict=True):
        chunk = {n: state[n] for n in names[lo:hi]}
        _save_shard(chunk, out / file, "safetensors")
        weight_map.update(dict.fromkeys(chunk, file))
    if index_name:
        index = {"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map}
        (out / index_name).write_text(json.dumps(index, indent=2), encoding="utf-8")
    (out / "config.json").write_text(json.dumps(config_dict, indent=2, ensure_ascii=False), encoding="utf-8")
    for extra in ("tokenizer.model", "tokenizer_config.json"):
        if (source / extra).is_file():
            shutil.copyfile(source / extra, out / extra)
    return sum(sizes)


def _on_disk(name: str, t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    side = name.endswith(("weight_scale", "weight_zero"))  # quantized side data: float16 by format
    if dtype is not None and t.is_floating_point() and not side:
        t = t.to(dtype)
    return t.to("cpu").contiguous()


def run(args: argparse.Namespace) -> int:
    from .api import parse_quantize
    from .loader import load_model, resolve_checkpoint

    ckpt = resolve_checkpoint(args.model)
    if ckpt.kind != "chatglm":
        raise InvalidArgumentError(f"{ckpt.path} is a GGUF file: glmrun quantize reads ChatGLM2/3 folders")
    out = Path(args.out)
    if out.resolve() == ckpt.path.resolve():
        raise InvalidArgumentError("--out is the model folder itself: glmrun never writes into a model folder")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InvalidArgumentError(f"--out {out} exists and is not an empty folder; choose a new folder")
    spec = parse_quantize(args.to, group_size=args.group_size)
    assert spec is not None
    model, _ = load_model(ckpt, dtype=args.dtype, device=args.device, quantize=spec, progress=True)
    out.mkdir(parents=True, exist_ok=True)
    config = model.config.replace(torch_dtype=args.dtype)
    total = save_quantized(model, config.to_chatglm_dict(), ckpt.path, out, getattr(torch, args.dtype))
    print(
        f"wrote {spec.name} (group {spec.group_size}) copy of {ckpt.path} to {out}: {total / 1e9:.2f} GB",
        file=sys.stdout,
    )
    return 0
