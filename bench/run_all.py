"""Run every `bench/bench_*.py` and print one table of their figures.

    .venv/bin/python bench/run_all.py [--only engine,splunk_hec]

Run nothing else on the machine meanwhile: the relay, its peers and the load generators share the cores.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--only", help="comma-separated bench names (the part after bench_)")
    args = parser.parse_args()
    wanted = set(args.only.split(",")) if args.only else None
    rows: list[dict[str, object]] = []
    for script in sorted(HERE.glob("bench_*.py")):
        name = script.stem.removeprefix("bench_")
        if wanted and name not in wanted:
            continue
        print(f"running {script.name} ...", file=sys.stderr, flush=True)
        result = subprocess.run([sys.executable, str(script), "--json"], capture_output=True, text=True)
        for line in result.stderr.splitlines():
            if line.startswith("warning: the machine was"):
                print(f"{script.name}: {line}", file=sys.stderr, flush=True)
        if result.returncode != 0:
            rows.append({"bench": name, "metric": f"FAILED (exit {result.returncode})", "value": 0, "unit": ""})
            print(result.stderr[-2000:], file=sys.stderr)
            continue
        rows.extend(json.loads(line) for line in result.stdout.splitlines() if line.startswith("{"))
    labels = [f"{r['bench']}: {r['metric']}" for r in rows]
    width = max((len(label) for label in labels), default=20)
    print(f"\n{'figure'.ljust(width)}  {'value':>14}  unit")
    for label, r in zip(labels, rows, strict=True):
        value = float(r["value"])  # type: ignore[arg-type]
        shown = f"{value:,.0f}" if abs(value) >= 100 else f"{value:,.3f}"
        print(f"{label.ljust(width)}  {shown:>14}  {r['unit']}")


if __name__ == "__main__":
    main()
