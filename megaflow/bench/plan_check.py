"""`python -m megaflow.bench.plan_check PLAN.json BENCH.json [...]`: `megaflow plan`'s per-rank GPU
memory against the peak `megaflow bench train` measured on a GPU for the same layout (the bench's
`peak_<phase>_gib_allocated`, `torch.cuda.max_memory_allocated` over the whole process), as a
markdown table. `bench/gpu.sh` runs it after planning and benchmarking the same layouts."""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

#: The bench row's absolute peaks, one per phase (GiB; None on a CPU).
PHASES = ("rollout", "update", "decode")


def compare(plan: dict[str, Any], bench: dict[str, Any]) -> dict[str, Any]:
    """One comparison row from a `megaflow plan --json` report and a `megaflow bench train --json`
    file: the plan's device total and the measured peak over the phases (GiB), and the error."""
    row = bench["rows"][0]
    peaks = [row.get(f"peak_{p}_gib_allocated") for p in PHASES]
    peaks = [p for p in peaks if p is not None]
    if not peaks:
        raise ValueError(f"the bench row of {row.get('recipe')} has no GPU peak (peak_<phase>_gib_allocated): it ran "
                         "on a CPU; compare CPU runs with tests/test_plan.py's tensor-byte measurement instead")
    estimate = plan["device_total"] / 2**30
    measured = max(peaks)
    return {"recipe": row["recipe"], "model": row["model_path"], "video": "x".join(map(str, row["video"])),
            "estimate_gib": estimate, "measured_gib": measured, "error": estimate / measured - 1.0}


def markdown(rows: list[dict[str, Any]]) -> str:
    """The rows as a markdown section."""
    lines = ["## `megaflow plan` against measured GPU peaks", "",
             "| recipe | model | video | plan GiB | measured GiB | error |", "|---|---|---|---:|---:|---:|"]
    lines += [f"| {r['recipe']} | {r['model']} | {r['video']} | {r['estimate_gib']:.2f} | {r['measured_gib']:.2f} | "
              f"{100 * r['error']:+.1f} % |" for r in rows]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m megaflow.bench.plan_check", description=__doc__)
    parser.add_argument("pairs", nargs="+", type=Path, help="PLAN.json BENCH.json, repeated")
    parser.add_argument("--markdown", type=Path, help="append the table to this file")
    args = parser.parse_args(argv)
    if len(args.pairs) % 2:
        parser.error("give PLAN.json BENCH.json pairs")
    rows = [compare(json.loads(p.read_text()), json.loads(b.read_text()))
            for p, b in zip(args.pairs[::2], args.pairs[1::2])]
    text = markdown(rows)
    print(text)
    if args.markdown:
        with args.markdown.open("a") as f:
            f.write("\n" + text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
