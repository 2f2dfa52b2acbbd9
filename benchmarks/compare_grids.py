"""Two runs of one grid, cell by cell: did a refactor change any number it should not?

    python benchmarks/compare_grids.py benchmarks/results/quick /tmp/quick-again \
        > benchmarks/results/quick/refactor-check.md

Cells are matched by their path under each folder; for each: both accuracies, and where
both records hold per-row scores, on how many rows they disagree.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from fedsteer.eval.record import RESULT_FILE, read_result


def cells(root: Path) -> dict[str, dict]:
    return {str(p.parent.relative_to(root)): read_result(p.parent)
            for p in sorted(root.rglob(RESULT_FILE)) if "checkpoint" not in p.parts}


def disagreements(a: dict, b: dict) -> str:
    rows_a = (a.get("per_row") or {}).get("correct")
    rows_b = (b.get("per_row") or {}).get("correct")
    if rows_a is None or rows_b is None:
        return "—"
    return str(sum(x != y for x, y in zip(rows_a, rows_b, strict=True)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("before", type=Path)
    parser.add_argument("after", type=Path)
    args = parser.parse_args()
    before, after = cells(args.before), cells(args.after)
    print(f"# {args.before} vs {args.after}\n")
    print("| cell | accuracy before | accuracy after | same | rows that differ |")
    print("|---|---:|---:|---|---:|")
    for name in sorted(set(before) | set(after)):
        a, b = before.get(name), after.get(name)
        if a is None or b is None:
            print(f"| {name} | {'—' if a is None else a['metrics']['accuracy']} | "
                  f"{'—' if b is None else b['metrics']['accuracy']} | missing | — |")
            continue
        acc_a, acc_b = a["metrics"]["accuracy"], b["metrics"]["accuracy"]
        print(f"| {name} | {100 * acc_a:.2f} | {100 * acc_b:.2f} | "
              f"{'yes' if acc_a == acc_b else 'NO'} | {disagreements(a, b)} |")


if __name__ == "__main__":
    main()
