"""Quality of weight-only quantization: INT8 / INT4 vs unquantized next-token predictions (CPU).

    python benchmarks/quant_quality.py --json benchmarks/results/quant_quality_cpu.json

On the real SmolLM2-135M weights (dequantized from its GGUF to float32) over the text of this repository's
README and CHANGELOG, and on random ChatGLM2-shaped weights (a small preset, real vocabulary) over the same
text: top-1 agreement and mean KL(reference || quantized) per position, from ``glmrun.quant.logit_agreement``.
Group size --group (default 32: the GGUF file's block, what ``--quantize`` picks for it; SmolLM2's 576-wide
layers are not a multiple of 128). INT8 is reported in glmrun's format (a zero per group) and, for
comparison, in the symmetric format of folders saved before zeros existed.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import torch

import glmrun
from glmrun.bench import random_model
from glmrun.cache import KVCache
from glmrun.checkpoint import PRESETS
from glmrun.config import QuantSpec
from glmrun.quant import logit_agreement, quantize_model_

ROOT = Path(__file__).resolve().parents[1]


def all_logits(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    cache = KVCache(model.config, rows=1, max_len=len(ids), dtype=torch.float32, devices=model.layer_devices())
    with torch.inference_mode():
        return model(torch.tensor([ids]), torch.arange(len(ids))[None], cache, logits="all")[0]


def compare(make_model, ids: list[int], group: int) -> dict:  # noqa: ANN001
    ref = all_logits(make_model(), ids)
    out = {}
    # int8: the format glmrun writes (a zero per group); int8_symmetric: the earlier format, for comparison.
    for name, spec in (
        ("int8", QuantSpec(8, group)),
        ("int8_symmetric", QuantSpec(8, group, int8_zero=False)),
        ("int4", QuantSpec(4, group)),
    ):
        model = make_model()
        quantize_model_(model, spec, skip=lambda n: not n.startswith("transformer.encoder"))
        out[name] = {k: round(v, 5) for k, v in logit_agreement(ref, all_logits(model, ids)).items()}
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", required=True)
    ap.add_argument("--positions", type=int, default=3000)
    ap.add_argument("--group", type=int, default=32, help="weights per scale (SmolLM2's widths: 576, 1536)")
    args = ap.parse_args()
    text = (ROOT / "README.md").read_text() + "\n" + (ROOT / "CHANGELOG.md").read_text()
    torch.manual_seed(0)
    result: dict = {
        "command": "python benchmarks/quant_quality.py " + " ".join(sys.argv[1:]),
        "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "group_size": args.group,
        "text": "README.md + CHANGELOG.md of this repository",
    }

    with glmrun.load(device="cpu", dtype="float32", progress=False) as smol:
        ids = smol.tokenizer.encode(text, add_special_tokens=False)
        while len(ids) < args.positions:
            ids = ids + ids
        ids = ids[: args.positions]
        path = smol.checkpoint.path

    def load_smol() -> torch.nn.Module:
        from glmrun.loader import load_model, resolve_checkpoint

        return load_model(resolve_checkpoint(path), dtype="float32", device="cpu", progress=False)[0]

    result["smollm2"] = {"positions": len(ids), **compare(load_smol, ids, args.group)}
    print("smollm2", result["smollm2"], flush=True)

    cfg = PRESETS["tiny"].replace(
        hidden_size=256, num_attention_heads=8, kv_channels=32, rotary_dim=16, ffn_hidden_size=512, num_layers=4
    )
    glm_ids = [i % 60000 + 100 for i in ids]  # token ids for the random ChatGLM2-shaped model

    def load_random() -> torch.nn.Module:
        return random_model(cfg, torch.device("cpu"), torch.float32, seed=3)

    result["random_chatglm2_small"] = {
        "positions": len(glm_ids),
        "shape": "hidden 256, 4 layers, vocab 65024",
        **compare(load_random, glm_ids, args.group),
    }
    print("random chatglm2", result["random_chatglm2_small"], flush=True)
    Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
