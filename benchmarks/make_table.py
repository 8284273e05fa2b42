"""Print the README's benchmark table (Markdown) from the JSON results under benchmarks/results/.

python benchmarks/make_table.py            # prints the table
python benchmarks/make_table.py --write    # replaces the table between the README's markers
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def rows() -> list[str]:
    out = [
        "| run | card | dtype / quant | prompt / gen / batch | glmrun decode tok/s | TTFT | peak alloc. GB | "
        "transformers (same run) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for path in sorted(RESULTS.glob("*/*.json")):  # a card's own runs; its subfolders hold experiments and
        # superseded runs of older code (earlier/), which stay on disk, out of the table
        data = json.loads(path.read_text())
        if "glmrun" not in data or "environment" not in data:
            continue
        g, env = data["glmrun"], data["environment"]
        base = data.get("baseline_hf", {})
        parts = []
        if "prefill" in base:
            parts.append(
                f"prefill {base['prefill']['prefill_s']:.3f} s vs glmrun "
                f"{data['prompt_len'] * data['batch'] / g['prefill_tok_s']:.3f} s"
            )
        for name in ("eager", "static_compiled"):
            if name in base:
                parts.append(f"{name} {base[name]['decode_tok_s']:.1f} tok/s")
        quant = data.get("quantize") or "-"
        peak = ", ".join(f"{v:.2f}" for v in g["peak_allocated_gb"].values()) or "-"
        out.append(
            f"| {path.relative_to(RESULTS)} | {env.get('card')} | {data['dtype']} / {quant} | "
            f"{data['prompt_len']} / {data['gen_len']} / {data['batch']} | {g['decode_tok_s']:.1f} | "
            f"{g['ttft_s'] * 1000:.0f} ms | {peak} | {'; '.join(parts) or '-'} |"
        )
    return out


def write_readme(readme: Path) -> None:
    text = readme.read_text()
    start, end = "<!-- table:start -->\n", "<!-- table:end -->"
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    readme.write_text(head + start + "\n".join(rows()) + "\n" + end + tail)


if __name__ == "__main__":
    if "--write" in sys.argv[1:]:
        write_readme(RESULTS.parents[1] / "README.md")
    else:
        print("\n".join(rows()))
    sys.exit(0)
