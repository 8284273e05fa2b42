"""Summarise the runs of ``ab_bench.sh``: per quantization and side, the decode tok/s of every round, their mean,
range and the ratio of the means; the card, torch version and command come from the runs' own JSON.

    python3 benchmarks/ab_summary.py RUNS_DIR --old-rev REV --new-rev REV --out SUMMARY.json
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from pathlib import Path

_NAME = re.compile(r"^(?P<quant>\w+?)_(?P<side>old|new)_r(?P<round>\d+)\.json$")


def summarise(runs: Path) -> dict[str, object]:
    by: dict[str, dict[str, list[float]]] = {}
    commands: dict[str, str] = {}
    meta: dict[str, object] = {}
    for path in sorted(runs.glob("*.json")):
        m = _NAME.match(path.name)
        if m is None:
            continue
        data = json.loads(path.read_text())
        by.setdefault(m["quant"], {}).setdefault(m["side"], []).append(float(data["glmrun"]["decode_tok_s"]))
        meta.setdefault("environment", data.get("environment"))
        commands.setdefault(m["quant"], re.sub(r" --json \S+", "", data.get("command", "")))
    if not by:
        raise SystemExit(f"no runs named QUANT_old|new_rROUND.json in {runs}")
    table: dict[str, object] = {}
    for quant, sides in by.items():
        row: dict[str, object] = {"command": commands[quant]}
        for side, values in sides.items():
            row[side] = {
                "decode_tok_s": values,
                "mean": round(statistics.fmean(values), 2),
                "min": min(values),
                "max": max(values),
            }
        if "old" in sides and "new" in sides:
            old, new = statistics.fmean(sides["old"]), statistics.fmean(sides["new"])
            row["new_over_old"] = round(new / old, 4)
            # the means differ by no more than the wider side's own range: no decision
            spread = max(max(v) - min(v) for v in sides.values())
            row["within_spread"] = abs(new - old) <= spread
        table[quant] = row
    return {**meta, "results": table}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("runs", type=Path)
    p.add_argument("--old-rev", required=True)
    p.add_argument("--new-rev", required=True)
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args()
    summary = {"old_rev": a.old_rev, "new_rev": a.new_rev, **summarise(a.runs)}
    a.out.write_text(json.dumps(summary, indent=1) + "\n")
    json.dump(summary["results"], sys.stdout, indent=1)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
