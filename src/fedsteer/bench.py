"""`fedsteer bench CONFIG.yaml`: a grid of runs, each cell a result.json, resumable.

Every method is measured on the same data, partitions, seeds, test rows and model. A
finished cell is never recomputed, so a killed grid continues where it stopped; a cell
killed mid-run resumes from its last round's checkpoint. Models load once per model. A
finished cell recorded with other settings than the grid now asks for is refused by name,
never silently reused.

    name: quick
    out: results/quick                     # relative to the config file
    models: [qwen2.5-coder-0.5b]
    tasks: [sst2]
    methods: [zero-shot, local-icl, ifed-icl]
    seeds: [0]
    alphas: [0.5]                          # Dirichlet; "iid" for IID
    clients: [10]
    test_size: 100
    run: {local-icl: {fraction: 0.5}}      # RunConfig fields (even `model`), per method
    options: {ifed-icl: {local_epochs: 1}} # method options, per method

A method entry `bdpl+ifed-icl+fedpt` is a stack trained stage by stage in place: the cell of
`bdpl` (saving its artifact), then `ifed-icl` on top of it (`--on-top-of`), then `fedpt` on
top of both, each stage a cell of its own with its method's `run` and `options`. The last
stage's cell is the stack's row: its accuracy is the whole stack's, its bytes and client
compute the whole pipeline's (`pipeline_costs`, the sum over its stages).
"""

from __future__ import annotations

import itertools
import json
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from fedsteer.eval.record import PROVENANCE_FILE, RESULT_FILE, read_result
from fedsteer.experiment import RunConfig, result_settings, run_experiment
from fedsteer.methods import METHODS, check_options, make_method

KNOWN_KEYS = {"name", "out", "models", "tasks", "methods", "seeds", "alphas", "clients",
              "test_size", "run", "options", "dtype", "device"}


@dataclass
class BenchConfig:
    name: str
    out: Path
    models: list[str]
    tasks: list[str]
    methods: list[str]
    seeds: list[int] = field(default_factory=lambda: [0])
    alphas: list[float | str] = field(default_factory=lambda: [0.5])
    clients: list[int] = field(default_factory=lambda: [10])
    test_size: int | None = 300
    run: dict[str, dict[str, Any]] = field(default_factory=dict)
    options: dict[str, dict[str, Any]] = field(default_factory=dict)
    dtype: str = "float32"  # every cell's model (`--dtype` overrides)
    device: str = "auto"

    @classmethod
    def load(cls, path: Path) -> BenchConfig:
        path = Path(path)
        raw = yaml.safe_load(path.read_text()) or {}
        unknown = sorted(set(raw) - KNOWN_KEYS)
        if unknown:
            raise ValueError(f"{path}: unknown key(s) {unknown}; known: {sorted(KNOWN_KEYS)}")
        for key in ("models", "tasks", "methods"):
            if not raw.get(key):
                raise ValueError(f"{path}: '{key}' must list at least one entry")
        bad = [m for entry in raw["methods"] for m in stages(entry) if m not in METHODS]
        if bad:
            raise ValueError(f"{path}: unknown method(s) {bad}; known: {', '.join(METHODS)}")
        for entry in raw["methods"]:
            check_stages(entry)
        named = {m for entry in raw["methods"] for m in stages(entry)}
        for section in ("options", "run"):
            strays = sorted(set(raw.get(section) or {}) - named)
            if strays:
                raise ValueError(f"{path}: {section}: {strays} not in this grid's methods "
                                 f"{raw['methods']}")
        for method, options in (raw.get("options") or {}).items():
            check_options([method], options)
        settable = {f.name for f in fields(RunConfig)} - {"method", "task", "options"}
        for method, run in (raw.get("run") or {}).items():
            wrong = sorted(set(run) - settable)
            if wrong:
                raise ValueError(f"{path}: run.{method}: unknown RunConfig field(s) {wrong}; "
                                 f"known: {sorted(settable)}")
        out = Path(raw.get("out", f"runs/bench-{raw.get('name', path.stem)}"))
        return cls(
            name=raw.get("name", path.stem), out=out if out.is_absolute() else path.parent / out,
            models=list(raw["models"]), tasks=list(raw["tasks"]), methods=list(raw["methods"]),
            seeds=list(raw.get("seeds", [0])), alphas=list(raw.get("alphas", [0.5])),
            clients=list(raw.get("clients", [10])), test_size=raw.get("test_size", 300),
            run=dict(raw.get("run") or {}), options=dict(raw.get("options") or {}),
            dtype=str(raw.get("dtype", "float32")), device=str(raw.get("device", "auto")),
        )


def stages(entry: str) -> list[str]:
    """A grid's method entry as the methods trained in turn: `bdpl+ifed-icl` is two."""
    return entry.split("+")


#: where a stage may stand in a stack: before the last only points a later method can be
#: trained through (`fedsteer.models.adapted.IN_PLACE_KINDS`: a prompt, steering vectors)
THROUGH = ("input", "activations")


def check_stages(entry: str) -> None:
    """Refuse a stack no run could train: a stage that saves nothing, one that later stages
    cannot be trained through (a proxy, an adapter: they come last), a point steered twice."""
    names = stages(entry)
    if len(names) == 1:
        return
    points = [METHODS[m].steers for m in names]
    for name, point in zip(names, points, strict=True):
        if point is None:
            raise ValueError(f"methods: {entry!r}: {name} saves no artifact to stack")
    for name, point in zip(names[:-1], points[:-1], strict=True):
        if point not in THROUGH:
            raise ValueError(f"methods: {entry!r}: {name} steers the {point}, which later "
                             "stages cannot be trained through; put it last")
    if len(set(points)) < len(points):
        raise ValueError(f"methods: {entry!r}: two stages steer the same point "
                         f"({', '.join(points)}); a stack takes one per point")


#: inside a stage's cell: the artifact the stages after it are trained on top of
ARTIFACT_DIR = "artifact"


@dataclass
class Cell:
    config: RunConfig
    path: Path
    #: the grid's method entry (a stack: `bdpl+ifed-icl`); default the config's method
    name: str = ""
    save: bool = False  # a stage of a stack: its artifact is kept for the stages after it
    depth: int = 0  # stages before it (they run first)

    @property
    def done(self) -> bool:
        return (self.path / RESULT_FILE).exists() and (
            not self.save or (self.artifact / PROVENANCE_FILE).exists())

    @property
    def artifact(self) -> Path:
        return self.path / ARTIFACT_DIR


class StaleCell(ValueError):
    """A finished cell's result was recorded with settings the grid no longer asks for."""


def recorded_differences(cell: Cell) -> dict[str, tuple[Any, Any]]:
    """{field: (recorded, asked)} where a finished cell's record disagrees with its config.

    Execution choices (client batching, threads) are not counted: they change no number.
    RunConfig fields the record lacks (added after it was written) are not counted; a method
    option it lacks is (a new option may change what the old name meant, as ICL's `shots`
    becoming per class did)."""
    recorded = read_result(cell.path)["config"]
    asked = json.loads(json.dumps(result_settings(cell.config)))  # compare as it reads back
    diff = {key: (recorded[key], value) for key, value in asked.items()
            if key in recorded and recorded[key] != value}
    if "method_options" in recorded:  # every option of the method as it ran, defaults too
        options = make_method(cell.config.method, **cell.config.method_options()).options()
        options = json.loads(json.dumps(options))
        diff.update({f"method_options.{key}": (recorded["method_options"].get(key, ABSENT), value)
                     for key, value in options.items()
                     if recorded["method_options"].get(key, ABSENT) != value})
    return diff


#: what a record lacks: an option added since it was written (its meaning may have changed)
ABSENT = "(absent)"


def check_finished(cells: list[Cell]) -> None:
    """Refuse a grid whose finished cells were run with other settings: their numbers would
    be reported as if the grid had produced them."""
    stale = [(cell, diff) for cell in cells if cell.done and (diff := recorded_differences(cell))]
    if stale:
        cell, diff = stale[0]
        raise StaleCell(f"{cell.path / RESULT_FILE} was run with other settings "
                        f"({describe(diff)}); {len(stale)} finished cell(s) differ. Move them "
                        "away or set another `out` to run the grid as written.")


def reuse_finished(path: Path, config: RunConfig) -> dict | None:
    """The record at `path` if it was run with `config`, None if there is none; a record of
    other settings is refused by name (benchmark scripts share cells, never blindly)."""
    cell = Cell(config, path)
    if not cell.done:
        return None
    diff = recorded_differences(cell)
    if diff:
        raise StaleCell(f"{path / RESULT_FILE} was run with other settings ({describe(diff)}); "
                        "move it away to rerun the cell as asked")
    return read_result(path)


def describe(diff: dict[str, tuple[Any, Any]]) -> str:
    return "; ".join(f"{key}: recorded {old!r}, asked {new!r}" for key, (old, new) in diff.items())


def path_component(name: str) -> str:
    """`name` as one folder name any file system and tool accepts: a model such as
    `emulator:12:qwen2.5-coder-0.5b` or a local path becomes `emulator-12-qwen2.5-coder-0.5b`."""
    return re.sub(r"[^A-Za-z0-9._+-]+", "-", name).strip("-.") or "model"


def cell_path(out: Path, config: RunConfig, name: str | None = None) -> Path:
    """Where a cell's result lives (`name`: its grid entry, a stack's `bdpl+ifed-icl`);
    a record written before names were made portable (the raw model name as a folder) is
    still found there, so old grids stay readable."""
    # a stack's folder `bdpl_ifed-icl`: no "+", which joins the paths of `--on-top-of`
    rest = Path(Path(config.task).stem) / (name or config.method).replace("+", "_") / \
        cell_dir(config)
    path = out / path_component(config.model) / rest
    legacy = out / config.model / rest
    if not (path / RESULT_FILE).exists() and _is_file(legacy / RESULT_FILE):
        return legacy
    return path


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except (OSError, ValueError):  # a name this file system cannot even hold
        return False


def cell_dir(config: RunConfig) -> str:
    skew = "iid" if config.partition == "iid" else f"alpha{config.alpha:g}"
    return f"{skew}-clients{config.clients}-seed{config.seed}"


def expand(bench: BenchConfig) -> list[Cell]:
    """Every (model, task, method, α, clients, seed) cell, in the order they will run.

    Methods that do not depend on the seed or the partition (zero-shot) get one cell.
    """
    cells: dict[Path, Cell] = {}
    grid = itertools.product(bench.models, bench.tasks, bench.methods, bench.alphas,
                             bench.clients, bench.seeds)
    for model, task, entry, alpha, clients, seed in grid:
        below: list[Cell] = []  # a stack's earlier stages, each a cell that keeps its artifact
        names = stages(entry)
        for depth, method in enumerate(names):
            cell = _cell(bench, model, task, method, alpha, clients, seed, below,
                         "+".join(names[: depth + 1]))
            cell = cells.setdefault(cell.path, cell)
            cell.save = cell.save or depth < len(names) - 1
            below.append(cell)
    return list(cells.values())


def _cell(bench: BenchConfig, model: str, task: str, method: str, alpha, clients: int,
          seed: int, below: list[Cell], name: str) -> Cell:
    """One run of the grid: `method` on top of the artifacts of the cells `below` it."""
    partition = {"partition": "iid"} if str(alpha).lower() == "iid" else {"alpha": alpha}
    if method == "zero-shot" and not below:  # deterministic: one cell per model and task
        partition, clients, seed = {"alpha": 0.5}, 1, 0
    fields = {"method": method, "task": task, "model": model, "clients": clients,
              "seed": seed, "test_size": bench.test_size, "dtype": bench.dtype,
              "device": bench.device, **partition}
    # a method's own settings win, even over the grid's (e.g. FedPT's small device model)
    fields.update(bench.run.get(method, {}))
    if below:
        fields["on_top_of"] = "+".join(str(c.artifact) for c in below)
    config = RunConfig(**fields, options=dict(bench.options.get(method, {})))
    return Cell(config, cell_path(bench.out, config, name), name, depth=len(below))


def run_grid(bench: BenchConfig, progress=None,
             on_cell: Callable[[Cell, dict], None] | None = None) -> list[dict]:
    """Run every unfinished cell (models loaded once each); return all the records."""
    from fedsteer.data import load_task
    from fedsteer.models import load_placed

    cells = expand(bench)
    check_finished(cells)
    todo = [c for c in cells if not c.done]
    bar = progress.add_task(f"bench {bench.name}", total=len(cells),
                            completed=len(cells) - len(todo)) if progress else None
    for model, group in _by_model(todo):
        lm = load_placed(model, dtype=bench.dtype, device=bench.device)
        for cell in group:
            if bar is not None:
                progress.update(bar, description=f"bench {bench.name} · {cell_label(cell)}")
            started = time.perf_counter()
            record = run_experiment(cell.config, cell.path, lm=lm,
                                    task=load_task(cell.config.task), resume=True,
                                    progress=progress,
                                    save_dir=cell.artifact if cell.save else None)
            record["bench_seconds"] = time.perf_counter() - started
            if on_cell is not None:
                on_cell(cell, record)
            if bar is not None:
                progress.advance(bar)
        del lm
    return [read_result(c.path) for c in cells]


def cell_label(cell: Cell) -> str:
    """A cell as a progress line names it: "ifed-icl on sst2 (seed 0)"."""
    config = cell.config
    return f"{cell.name or config.method} on {Path(config.task).stem} (seed {config.seed})"


def _by_model(cells: list[Cell]) -> Iterator[tuple[str, list[Cell]]]:
    """Cells by model (one load each), a stack's stages before the stages on top of them."""
    order: dict[tuple[int, str], list[Cell]] = {}
    for cell in sorted(cells, key=lambda c: c.depth):
        order.setdefault((cell.depth, cell.config.model), []).append(cell)
    for (_, model), group in order.items():
        yield model, group
