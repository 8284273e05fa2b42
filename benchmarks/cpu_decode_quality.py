"""Quality of the CPU decoder's int4 products: next-token predictions against float32, on real text.

    python benchmarks/cpu_decode_quality.py --json benchmarks/results/cpu_decode_quality.json

The embedded SmolLM2-135M-Instruct (Q4_1 layers, a Q8_0 embedding/output matrix) over this repository's
README and CHANGELOG. The reference is the float32 model (``dtype="float32"``: the file's blocks
dequantized to float32, float32 products), all positions in one forward. Compared with it, position by
position (top-1 agreement and mean KL(reference || test), ``glmrun.quant.logit_agreement``):

- ``cpu_decoder_int4``: what ``glmrun.load(device="cpu")`` decodes with: the CPU decoder, one token a
  step (teacher-forced), its layer products from the file's 4-bit codes with bfloat16 rows;
- ``cpu_decoder_float16``: the same decoder with ``int4=False`` (fbgemm's float16 copies, float32
  arithmetic: the decoder before the int4 products);
- ``forward_float16``: the default model's own forward (float16 matrices, all positions at once).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import torch

import glmrun
from glmrun.cache import KVCache
from glmrun.cpu_decode import CpuDecoder
from glmrun.quant import logit_agreement

ROOT = Path(__file__).resolve().parents[1]


def forward_logits(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    cache = KVCache(model.config, rows=1, max_len=len(ids), dtype=torch.float32, devices=model.layer_devices())
    with torch.inference_mode():
        return model(torch.tensor([ids]), torch.arange(len(ids))[None], cache, logits="all")[0]


def decoder_logits(model: torch.nn.Module, ids: list[int], *, int4: bool) -> torch.Tensor:
    """Logits of every position, one decode step each (teacher-forced)."""
    cache = KVCache(model.config, rows=1, max_len=len(ids), dtype=torch.float32, devices=model.layer_devices())
    decoder = CpuDecoder(model, cache, int4=int4)
    out = torch.empty(len(ids), model.config.padded_vocab_size)
    with torch.inference_mode():
        for pos, token in enumerate(ids):
            out[pos] = decoder.step(torch.tensor([[token]]), torch.tensor([[pos]]), pos + 1)[0]
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", required=True)
    ap.add_argument("--positions", type=int, default=3000)
    args = ap.parse_args()
    text = (ROOT / "README.md").read_text() + "\n" + (ROOT / "CHANGELOG.md").read_text()
    with glmrun.load(device="cpu", dtype="float32", progress=False) as ref_model:
        ids = ref_model.tokenizer.encode(text, add_special_tokens=False)
        while len(ids) < args.positions:
            ids = ids + ids
        ids = ids[: args.positions]
        assert ref_model.engine is not None
        ref = forward_logits(ref_model.engine.model, ids)
    result: dict = {
        "command": "python benchmarks/cpu_decode_quality.py " + " ".join(sys.argv[1:]),
        "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "text": "README.md + CHANGELOG.md of this repository",
        "positions": len(ids),
        "reference": "float32 model (dtype='float32'), one forward over all positions",
    }
    with glmrun.load(device="cpu", progress=False) as glm:
        assert glm.engine is not None
        model = glm.engine.model
        result["int4_matrices"] = sum(hasattr(m, "int4") for m in model.modules())
        tests = {
            "cpu_decoder_int4": lambda: decoder_logits(model, ids, int4=True),
            "cpu_decoder_float16": lambda: decoder_logits(model, ids, int4=False),
            "forward_float16": lambda: forward_logits(model, ids),
        }
        for name, run in tests.items():
            result[name] = {k: round(v, 6) for k, v in logit_agreement(ref, run()).items()}
            print(name, result[name], flush=True)
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
