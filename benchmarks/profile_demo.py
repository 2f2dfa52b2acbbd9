"""Profile one cell of the demo grid (benchmarks/quick.yaml) with pyinstrument.

Runs the cell of `--method` exactly as `make demo` would (same RunConfig, a fresh output
directory, the model loaded before profiling starts) and writes the call tree as text and
HTML next to the other results, so a before/after pair can be compared line by line.

    .venv/bin/python benchmarks/profile_demo.py --method local-icl --tag before
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from common import RESULTS
from pyinstrument import Profiler

from fedsteer.bench import BenchConfig, expand
from fedsteer.data import load_task
from fedsteer.experiment import run_experiment
from fedsteer.models import load_model

GRID = Path(__file__).parent / "quick.yaml"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", required=True)
    parser.add_argument("--tag", default="before")
    parser.add_argument("--out", type=Path, default=RESULTS / "profile")
    args = parser.parse_args()
    cell = next(c for c in expand(BenchConfig.load(GRID)) if c.config.method == args.method)
    lm, task = load_model(cell.config.model), load_task(cell.config.task)
    profiler = Profiler(interval=0.01)
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        profiler.start()
        record = run_experiment(cell.config, Path(tmp) / "run", lm=lm, task=task)
        profiler.stop()
        seconds = time.perf_counter() - started
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"{args.method}-{args.tag}"
    text = profiler.output_text(unicode=True, color=False, show_all=False)
    header = (f"{args.method} ({cell.config.model}, quick.yaml cell): {seconds:.1f} s, "
              f"accuracy {record['metrics']['accuracy']:.4f}\n\n")
    stem.with_suffix(".txt").write_text(header + text)
    stem.with_suffix(".html").write_text(profiler.output_html())
    print(header + text)


if __name__ == "__main__":
    main()
