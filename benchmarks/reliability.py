"""Bad inputs and hostile replies, tried as a careless or hostile user would: each case's
outcome is classified, counted and written to benchmarks/results/reliability.{md,json}.

    python benchmarks/reliability.py                 # the cases (tiny model, ~5 min)
    python benchmarks/reliability.py --attacks       # + poisoned replies on the default model

Outcome classes. Good: "clear error" (exit 2, one line naming the thing, no traceback),
"rejected and logged" (the run goes on; the record lists the rejection), "identical result",
"warned" (the run goes on; the record and table carry the warning). Bad: "traceback",
"silent acceptance", "hang", "unclear error" (exit 2 but the message misses what it should
name). Every case runs `fedsteer` in a subprocess from an empty folder, with a time limit.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
GOOD = ("clear error", "rejected and logged", "identical result", "warned")
TINY = ["--model", "tiny-random", "--test-size", "8", "--clients", "3"]
IFED_TINY = ["-o", "demos_per_class=1", "-o", "calibration_per_class=1", "--rounds", "2"]


@dataclass
class Case:
    name: str
    run: Callable[[Path], tuple[str, str]]  # work dir -> (outcome class, what was seen)


def fedsteer(args: list[str], cwd: Path, timeout: float = 180, env: dict | None = None):
    """(exit code or None on timeout, stdout+stderr)."""
    full_env = {k: v for k, v in os.environ.items() if k != "FEDSTEER_DATA_DIR"}
    full_env.update({"HF_HUB_OFFLINE": "1", "COLUMNS": "200", **(env or {})})
    try:
        done = subprocess.run([sys.executable, "-m", "fedsteer", *args], cwd=cwd, env=full_env,
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None, ""
    return done.returncode, done.stdout + done.stderr


def expect_error(args: list[str], *needles: str, env: dict | None = None,
                 prepare: Callable[[Path], None] | None = None, timeout: float = 180,
                 forbid: tuple[str, ...] = ()):
    def run(work: Path) -> tuple[str, str]:
        if prepare:
            prepare(work)
        started = time.monotonic()
        code, output = fedsteer([a.replace("{w}", str(work)) for a in args], work, timeout, env)
        seen = " ".join(output.split())
        line = _error_line(output) or seen[-200:]
        if code is None:
            return "hang", f"no answer within {timeout:g} s"
        if "Traceback" in output:
            return "traceback", seen[-300:]
        if code == 0:
            return "silent acceptance", "exit 0"
        missing = [n.replace("{w}", str(work)) for n in needles
                   if n.replace("{w}", str(work)) not in seen]
        if missing:
            return "unclear error", f"{line.strip()} (does not name {missing})"
        said = [f for f in forbid if f in seen]
        if said:
            return "unclear error", f"{line.strip()} (also says {said})"
        return "clear error", f"{line.strip()} ({time.monotonic() - started:.0f} s)"

    return run


def _error_line(output: str) -> str | None:
    """Our "error: …" line, or the message inside typer's boxed usage error."""
    lines = [ln.strip(" │╭╮╰╯─") for ln in output.splitlines()]
    lines = [ln for ln in lines if ln and not ln.startswith(("Usage:", "Try ", "Error"))]
    return next((ln for ln in lines if ln.startswith("error:")), None) or (
        next((ln for ln in lines if "Invalid value" in ln or "recorded" in ln), None))


def _write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return path


def _jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


def _user_files(work: Path, test_rows: list[dict] | None = None) -> None:
    train = [{"text": f"row {i}", "label": "ab"[i % 2]} for i in range(12)]
    _write(work / "train.jsonl", _jsonl(train))
    _write(work / "test.jsonl", _jsonl(test_rows or train))


def _spec(work: Path, **keys) -> None:
    _user_files(work)
    spec = {"name": "t", "labels": ["a", "b"], "train": "train.jsonl", "test": "test.jsonl",
            **keys}
    _write(work / "t.yaml", "\n".join(f"{k}: {json.dumps(v)}" for k, v in spec.items()))


def _finished_run(work: Path, method: str = "ifed-icl") -> None:
    extra = IFED_TINY if method == "ifed-icl" else []
    code, output = fedsteer(["run", method, *TINY, *extra, "--out", str(work / "run")], work)
    assert code == 0, output


def _damaged_checkpoint(victim: str) -> Callable[[Path], None]:
    def prepare(work: Path) -> None:
        _finished_run(work)
        (work / "run" / "result.json").unlink()
        path = sorted((work / "run" / "checkpoint").glob("round-*"))[-1] / victim
        path.write_bytes(path.read_bytes()[: max(1, len(path.read_bytes()) // 3)])
    return prepare


def expect_identical_after_kill(work: Path) -> tuple[str, str]:
    """SIGKILL a real run mid-way, resume it, compare with an uninterrupted run."""
    args = ["run", "ifed-icl", *TINY, *IFED_TINY, "--rounds", "3"]
    code, output = fedsteer([*args, "--out", str(work / "clean")], work)
    if code != 0:
        return "traceback", output[-300:]
    env = {k: v for k, v in os.environ.items() if k != "FEDSTEER_DATA_DIR"}
    process = subprocess.Popen([sys.executable, "-m", "fedsteer", *args, "--out",
                                str(work / "killed")], cwd=work, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not list((work / "killed").glob("checkpoint/round-*")):
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    code, output = fedsteer(["run", "--resume", str(work / "killed")], work)
    if code != 0:
        return "traceback" if "Traceback" in output else "unclear error", output[-300:]
    clean = json.loads((work / "clean" / "result.json").read_text())
    resumed = json.loads((work / "killed" / "result.json").read_text())
    same = clean["metrics"] == resumed["metrics"]
    rounds = len(resumed["costs"]["rounds"])
    return ("identical result" if same else "silent acceptance",
            f"killed after {len(list((work / 'killed').glob('checkpoint/round-*')))} committed "
            f"round folder(s); resumed to {rounds} rounds; metrics {'equal' if same else 'DIFFER'}")


def expect_warning(work: Path) -> tuple[str, str]:
    _user_files(work, test_rows=[{"text": f"t{i}", "label": "b"} for i in range(8)])
    code, output = fedsteer(["run", "zero-shot", "--model", "tiny-random", "--clients", "2",
                             "--train", "train.jsonl", "--test", "test.jsonl", "--labels", "a,b",
                             "--out", str(work / "run")], work)
    record = json.loads((work / "run" / "result.json").read_text()) if code == 0 else {}
    if code == 0 and record.get("warnings") and "warning:" in output:
        return "warned", record["warnings"][0]
    return ("silent acceptance" if code == 0 else "traceback"), output[-200:]


def expect_rejected(attack: str) -> Callable[[Path], tuple[str, str]]:
    """A poisoned IFed-ICL client on the tiny model: the run goes on, the record names it."""
    def run(work: Path) -> tuple[str, str]:
        sys.path.insert(0, str(Path(__file__).parent))
        from poison import poisoned_run  # noqa: PLC0415 - this script's own helper

        record = poisoned_run("ifed-icl", "tiny-random", attack, work / "run", test_size=8,
                              clients=4, options={"demos_per_class": 1,
                                                  "calibration_per_class": 1, "rounds": 2})
        rejected = [x for r in record["costs"]["rounds"] for x in r["rejected"]]
        if rejected and {x["cid"] for x in rejected} == {1}:
            return "rejected and logged", f"{len(rejected)} × client 1: {rejected[0]['reason']}"
        return "silent acceptance", f"rejections: {rejected}"
    return run


def cases() -> list[Case]:
    run_tiny = ["run", "zero-shot", *TINY]
    return [
        Case("unknown method", expect_error(["run", "no-such", *TINY], "no-such")),
        Case("unknown task name", expect_error([*run_tiny, "--task", "nope"], "unknown task")),
        Case("data dir without the task", expect_error(
            ["tasks"], "{w}/empty/sst2", env={"FEDSTEER_DATA_DIR": "empty"})),
        Case("-o rank=abc", expect_error(["run", "fedavg-lora", *TINY, "-o", "rank=abc"],
                                         "option rank of fedavg-lora expects int")),
        Case("-o lr=abc", expect_error(["run", "fedavg-lora", *TINY, "-o", "lr=abc"],
                                       "option lr of fedavg-lora expects float")),
        Case("-o unknown option", expect_error(["run", "ifed-icl", *TINY, "-o", "colour=red"],
                                               "no option colour")),
        Case("--fraction -3", expect_error([*run_tiny, "--fraction", "-3"], "--fraction")),
        Case("--fraction 1.5", expect_error([*run_tiny, "--fraction", "1.5"], "--fraction")),
        Case("--test-size -1", expect_error(["run", "zero-shot", "--model", "tiny-random",
                                             "--test-size", "-1"], "--test-size")),
        Case("--clients 0", expect_error(["run", "zero-shot", "--model", "tiny-random",
                                          "--clients", "0"], "--clients")),
        Case("--alpha 0", expect_error([*run_tiny, "--alpha", "0"], "--alpha")),
        Case("CSV with a duplicate column", expect_error(
            [*run_tiny, "--train", "x.csv", "--test", "x.csv", "--labels", "a,b"],
            "x.csv, line 1, field 'label'", "twice",
            prepare=lambda w: _write(w / "x.csv", "text,label,label\nhi,a,b\nho,b,a\n"))),
        Case("duplicate label names", expect_error(
            [*run_tiny, "--train", "train.jsonl", "--test", "test.jsonl", "--labels", "a,a"],
            "label names must differ", prepare=_user_files)),
        Case("unknown label in a row", expect_error(
            [*run_tiny, "--train", "train.jsonl", "--test", "bad.jsonl", "--labels", "a,b"],
            "bad.jsonl, line 2, field 'label'",
            prepare=lambda w: (_user_files(w), _write(
                w / "bad.jsonl", _jsonl([{"text": "x", "label": "a"},
                                         {"text": "y", "label": "meh"}]))))),
        Case("non-UTF-8 data file", expect_error(
            [*run_tiny, "--train", "train.jsonl", "--test", "latin.jsonl", "--labels", "a,b"],
            "latin.jsonl, line 1", prepare=lambda w: (_user_files(w), _write(
                w / "latin.jsonl", b'{"text": "caf\xe9", "label": "a"}\n')))),
        Case("corrupt .jsonl.gz in a data dir", expect_error(
            ["run", "zero-shot", *TINY, "--task", "sst2"], "test.jsonl.gz", "gzip",
            env={"FEDSTEER_DATA_DIR": "mine"}, prepare=lambda w: (
                _write(w / "mine/sst2/meta.json", json.dumps({"labels": ["n", "p"]})),
                _write(w / "mine/sst2/train.jsonl.gz", gzip.compress(b'{"text":"a","label":0}')),
                _write(w / "mine/sst2/test.jsonl.gz", b"\x1f\x8b broken")))),
        Case("spec path leaving its folder", expect_error(
            [*run_tiny, "--task", "spec/t.yaml"], "leaves the spec's folder",
            prepare=lambda w: (_user_files(w / "data"), _write(
                w / "spec/t.yaml", 'name: t\nlabels: [a, b]\ntrain: "../data/train.jsonl"\n'
                'test: "../data/test.jsonl"\n')))),
        Case("spec with a YAML syntax error", expect_error(
            [*run_tiny, "--task", "t.yaml"], "t.yaml", "invalid YAML",
            prepare=lambda w: _write(w / "t.yaml", "name: [t\n"))),
        Case("spec with a YAML alias bomb", expect_error(
            [*run_tiny, "--task", "t.yaml"], "t.yaml", prepare=lambda w: _write(
                w / "t.yaml", "a: &a [x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a]\n"
                "c: &c [*b, *b, *b, *b, *b]\nd: [*c, *c, *c, *c, *c]\n"))),
        Case("spec with an unknown key", expect_error(
            [*run_tiny, "--task", "t.yaml"], "field 'colour'",
            prepare=lambda w: _spec(w, colour="red"))),
        Case("unknown model, offline", expect_error(
            ["run", "zero-shot", "--model", "no-org/no-model", "--test-size", "8"],
            "no-org/no-model", "local folder", timeout=30)),
        Case("resume with another task", expect_error(
            ["run", "--resume", "run", "--task", "sst2"], "task: recorded 'trec'",
            "asked 'sst2'", prepare=lambda w: (fedsteer(
                ["run", "zero-shot", *TINY, "--task", "trec", "--out", "run"], w)))),
        Case("resume with other methods", expect_error(
            ["run", "fedavg-lora", "--resume", "run"], "records methods ['zero-shot']",
            prepare=lambda w: fedsteer(["run", "zero-shot", *TINY, "--out", "run"], w))),
        Case("resume with another --clients", expect_error(
            ["run", "--resume", "run", "--clients", "5"], "clients: recorded 3",
            prepare=lambda w: fedsteer(["run", "zero-shot", *TINY, "--out", "run"], w))),
        Case("truncated server.safetensors", expect_error(
            ["run", "--resume", "run"], "server.safetensors", "previous complete round",
            prepare=_damaged_checkpoint("server.safetensors"))),
        Case("truncated progress.json", expect_error(
            ["run", "--resume", "run"], "progress.json", "previous complete round",
            prepare=_damaged_checkpoint("progress.json"))),
        Case("truncated result.json (show)", expect_error(
            ["show", "run"], "result.json", "not readable JSON", prepare=lambda w: (
                _finished_run(w, "zero-shot"), _write(w / "run/result.json", '{"method": ')))),
        Case("bench grid with an unknown key", expect_error(
            ["bench", "g.yaml"], "unknown key", prepare=lambda w: _write(
                w / "g.yaml", "name: g\nmodels: [tiny-random]\ntasks: [sst2]\n"
                "methods: [zero-shot]\ncolour: red\n"))),
        Case("Flower run with an empty data dir", expect_error(
            ["run", "zero-shot", *TINY, "--runtime", "flower"], "{w}/empty/sst2",
            env={"FEDSTEER_DATA_DIR": "empty"}, timeout=60)),
        Case("one-class test set", expect_warning),
        Case("resume after SIGKILL", expect_identical_after_kill),
        Case("NaN reply", expect_rejected("nan")),
        Case("wrong-shape reply", expect_rejected("shape")),
        Case("reply of norm 1e30", expect_rejected("norm1e30")),
        Case("reply 1e6 × the honest norm", expect_rejected("scale1e6")),
    ]


def _file(work: Path) -> None:
    _write(work / "f", "a file, not a folder")


def _file_and_grid(work: Path) -> None:
    _file(work)
    _write(work / "g.yaml", "name: g\nmodels: [tiny-random]\ntasks: [sst2]\n"
           "methods: [zero-shot]\n")


def _saved_steering(work: Path) -> None:
    """An IFed-ICL artifact made on sst2 with tiny-random, in work/steer."""
    code, output = fedsteer(["run", "ifed-icl", *TINY, *IFED_TINY, "--out", str(work / "run"),
                             "--save", str(work / "steer")], work)
    assert code == 0, output


def expect_one_of_two_at_once(work: Path) -> tuple[str, str]:
    """Two runs started together into one --out: one runs, the other refuses naming it."""
    args = [sys.executable, "-m", "fedsteer", "run", "ifed-icl", *TINY, *IFED_TINY,
            "--out", "run"]
    env = {k: v for k, v in os.environ.items() if k != "FEDSTEER_DATA_DIR"}
    runs = [subprocess.Popen([*args, "--seed", str(seed)], cwd=work, env=env, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            for seed in (0, 1)]
    outputs = [run.communicate(timeout=300)[0] for run in runs]
    codes = [run.returncode for run in runs]
    if any("Traceback" in out for out in outputs):
        return "traceback", " ".join(outputs[codes.index(max(codes))].split())[-300:]
    if sorted(codes) != [0, 2]:
        return "silent acceptance", f"exit codes {codes}"
    winner, loser = (0, 1) if codes[0] == 0 else (1, 0)
    line = _error_line(outputs[loser]) or outputs[loser][-200:]
    seed = json.loads((work / "run" / "result.json").read_text())["config"]["seed"]
    named = f"PID {runs[winner].pid}" in line or "already holds a run" in line  # it finished
    if not named or seed != winner:
        return "unclear error", f"{line.strip()} (the running one: PID {runs[winner].pid})"
    return "clear error", f"{line.strip()}; the other run finished alone (seed {seed})"


def expect_stale_lock_taken_over(work: Path) -> tuple[str, str]:
    dead = subprocess.Popen(["true"])
    dead.wait()
    _write(work / "run" / ".fedsteer.lock", f"{dead.pid}\n")
    code, output = fedsteer(["run", "zero-shot", *TINY, "--out", "run"], work)
    seen = " ".join(output.split())
    if code == 0 and f"PID {dead.pid}" in seen:
        return "warned", seen[seen.index("warning:"):][:160]
    return ("silent acceptance" if code == 0 else "traceback"), seen[-200:]


def expect_mixed_table_said(work: Path) -> tuple[str, str]:
    """`show` of a folder holding an sst2 and a trec run: a task column and a warning."""
    for task in ("sst2", "trec"):
        code, output = fedsteer(["run", "zero-shot", *TINY, "--task", task, "--out",
                                 f"runs/{task}"], work)
        assert code == 0, output
    code, output = fedsteer(["show", "runs"], work)
    header = next((ln for ln in output.splitlines() if "method" in ln), "")
    warning = next((ln for ln in output.splitlines() if "come from 2 tasks" in ln), "")
    if code == 0 and "task" in header and warning:
        return "warned", f"task column; {' '.join(warning.split())}"
    return "silent acceptance", f"header: {' '.join(header.split())[:80]}; no warning"


def _disagreeing_records(work: Path) -> None:
    _finished_run(work, "zero-shot")
    record = json.loads((work / "run" / "result.json").read_text())
    record["config"]["seed"] = 7  # another run's result beside this run's run.json
    _write(work / "run" / "result.json", json.dumps(record))


def run_folder_cases() -> list[Case]:
    """Issue 44: a run folder belongs to one run, an artifact to its task and model, and a
    hint names something the user can set."""
    run_tiny = ["run", "zero-shot", *TINY]
    spec_flags = ["--train", "train.jsonl", "--test", "train.jsonl", "--labels", "a,b"]
    return [
        Case("--out under a file", expect_error([*run_tiny, "--out", "f/out"], "--out f/out",
                                                "is a file", prepare=_file)),
        Case("--out at a file", expect_error([*run_tiny, "--out", "f"], "--out f",
                                             prepare=_file)),
        Case("--save at a file (ifed-icl)", expect_error(
            ["run", "ifed-icl", *TINY, *IFED_TINY, "--out", "o", "--save", "f"], "--save f",
            prepare=_file)),
        Case("--data-dir under a file", expect_error(["--data-dir", "f/x", "tasks"],
                                                     "--data-dir f/x", prepare=_file)),
        Case("bench --out under a file", expect_error(
            ["bench", "g.yaml", "--out", "f/x"], "--out f/x", prepare=_file_and_grid)),
        Case("two runs into one --out at once", expect_one_of_two_at_once),
        Case("a dead run's lock", expect_stale_lock_taken_over),
        Case("new run into a used folder", expect_error(
            [*run_tiny, "--task", "trec", "--out", "run"], "already holds a run", "--force",
            "--resume", prepare=lambda w: _finished_run(w, "zero-shot"))),
        Case("resume of a folder whose records disagree", expect_error(
            ["run", "--resume", "run"], "seed 7", "run.json says 0",
            prepare=_disagreeing_records)),
        Case("show of two tasks' runs", expect_mixed_table_said),
        Case("eval of an sst2 artifact on trec", expect_error(
            ["eval", "--artifact", "steer", "--task", "trec", "--test-size", "8"],
            "made on task 'sst2'", "--transfer", prepare=_saved_steering)),
        Case("eval of an artifact on another model", expect_error(
            ["eval", "--artifact", "steer", "--task", "sst2", "--model", "smollm2-135m"],
            "made on model 'tiny-random'", "--transfer", prepare=_saved_steering)),
        Case("-o on a method without options", expect_error(
            [*run_tiny, "-o", "multi_token=true"], "zero-shot takes no options",
            forbid=("known:",))),
        Case("label words sharing a first token", expect_error(
            [*run_tiny, *spec_flags, "--label-words", " xylophone, xylograph"],
            "--label-words", forbid=("multi_token",), prepare=_user_files)),
        Case("Dirichlet that cannot fill the clients", expect_error(
            ["run", "local-icl", *TINY, *spec_flags, "--clients", "6", "--alpha", "0.01"],
            "min_per_client", prepare=_user_files)),
        Case("--template without {text}", expect_error(
            [*run_tiny, *spec_flags, "--template", "Ticket: {body}"], "--template",
            forbid=("--train/--test/--labels",), prepare=_user_files)),
        Case("spec train path is a folder", expect_error(
            [*run_tiny, "--task", "t.yaml"], "a folder, not a data file",
            prepare=lambda w: (_spec(w), (w / "data").mkdir(), _write(
                w / "t.yaml", "name: t\nlabels: [a, b]\ntrain: data\ntest: test.jsonl\n")))),
        Case("--alpha inf", expect_error([*run_tiny, "--alpha", "inf"], "--alpha", "finite",
                                         forbid=("RuntimeWarning",))),
        Case("partition --alpha inf", expect_error(["partition", "--alpha", "inf"], "--alpha",
                                                   "finite", forbid=("RuntimeWarning",))),
        Case("partition --partition (run's flag)", expect_error(
            ["partition", "--partition", "nope"], "unknown scheme 'nope'")),
    ]


def expect_claim_rejected(claim: object) -> Callable[[Path], tuple[str, str]]:
    """Client 1 of a tiny IFed-ICL run reports `claim` examples, as a Flower client reports
    its own count: the reply must be rejected with its reason, the run go on."""
    def run(work: Path) -> tuple[str, str]:
        sys.path.insert(0, str(Path(__file__).parent))
        from poison import ATTACKER, poisoned_run  # noqa: PLC0415 - this script's own helper

        from fedsteer.federation.runtime import Runtime  # noqa: PLC0415

        honest = Runtime._accept

        def lying(self, method, message, cid, content, num_examples, cost):
            claimed = claim if cid == ATTACKER else num_examples
            return honest(self, method, message, cid, content, claimed, cost)

        Runtime._accept = lying
        try:
            record = poisoned_run("ifed-icl", "tiny-random", "none", work / "run", test_size=8,
                                  clients=4, options={"demos_per_class": 1,
                                                      "calibration_per_class": 1, "rounds": 2})
        finally:
            Runtime._accept = honest
        rejected = [x for r in record["costs"]["rounds"] for x in r["rejected"]]
        if rejected and {x["cid"] for x in rejected} == {ATTACKER}:
            return "rejected and logged", f"{len(rejected)} × client 1: {rejected[0]['reason']}"
        return "silent acceptance", f"rejections: {rejected}"
    return run


def hostile_reply_cases() -> list[Case]:
    """Issue 42: malformed replies and lying example counts (tiny model, in this process)."""
    return [
        *[Case(f"{name} reply", expect_rejected(name)) for name in
          ("complex64", "bool", "strings")],
        *[Case(f"claims {claim!r} examples", expect_claim_rejected(claim)) for claim in
          (-1000, 0, 2.5, float("nan"))],
    ]


def run_cases(selected: list[Case]) -> list[dict]:
    rows = []
    for case in selected:
        with tempfile.TemporaryDirectory(prefix="fedsteer-case-") as tmp:
            started = time.monotonic()
            try:
                outcome, seen = case.run(Path(tmp))
            except Exception as error:  # the harness itself must not hide a case
                outcome, seen = "traceback", f"harness: {error!r}"
            rows.append({"case": case.name, "outcome": outcome, "seen": seen,
                         "seconds": round(time.monotonic() - started, 1)})
            print(f"{outcome:>20}  {case.name}: {seen[:150]}", flush=True)
    return rows


def run_attacks(model: str, test_size: int) -> list[dict]:
    sys.path.insert(0, str(Path(__file__).parent))
    from poison import ATTACKS, poisoned_run

    budgets = {"ifed-icl": {"rounds": 2, "local_epochs": 1, "demos_per_class": 3,
                            "calibration_per_class": 3},
               "fedavg-lora": {"rounds": 2, "local_examples": 8}}
    rows = []
    for method, options in budgets.items():
        clean = poisoned_run(method, model, "none", RESULTS / "reliability" / method / "clean",
                             test_size=test_size, clients=10, options=options)
        for attack in ATTACKS:
            record = poisoned_run(method, model, attack,
                                  RESULTS / "reliability" / method / attack,
                                  test_size=test_size, clients=10, options=options)
            rejected = [x for r in record["costs"]["rounds"] for x in r["rejected"]]
            delta = 100 * (record["metrics"]["accuracy"] - clean["metrics"]["accuracy"])
            rows.append({"method": method, "attack": attack,
                         "clean": 100 * clean["metrics"]["accuracy"],
                         "attacked": 100 * record["metrics"]["accuracy"], "delta": delta,
                         "rejected": len(rejected),
                         "reason": rejected[0]["reason"] if rejected else ""})
            print(f"{method} {attack}: {rows[-1]}", flush=True)
    return rows


def markdown(rows: list[dict], attacks: list[dict], model: str, test_size: int,
             note: str = "") -> str:
    counts = Counter(r["outcome"] for r in rows)
    lines = ["# Reliability: bad inputs and hostile replies", "",
             "Produced by `benchmarks/reliability.py`; each case runs `fedsteer` in a "
             "subprocess from an empty folder.", *([note] if note else []), "",
             "| outcome | cases |", "|---|---:|"]
    lines += [f"| {k} | {v} |" for k, v in sorted(counts.items(), key=lambda kv: -kv[1])]
    lines += ["", "| case | outcome | what it said / did |", "|---|---|---|"]
    lines += [f"| {r['case']} | {r['outcome']} | {r['seen'].replace('|', '/')[:160]} |"
              for r in rows]
    if attacks:
        lines += ["", f"Poisoned replies: one of 10 clients, {model}, sst2, Dirichlet α = 0.5, "
                  f"{test_size} test rows, seed 0; accuracy in %.", "",
                  "| method | attack | clean | attacked | Δ | rejected replies | first reason |",
                  "|---|---|---:|---:|---:|---:|---|"]
        lines += [f"| {a['method']} | {a['attack']} | {a['clean']:.1f} | {a['attacked']:.1f} | "
                  f"{a['delta']:+.1f} | {a['rejected']} | {a['reason'][:80]} |" for a in attacks]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--attacks", action="store_true", help="also the real-model attacks")
    parser.add_argument("--no-cases", action="store_true")
    parser.add_argument("--model", default="qwen2.5-coder-0.5b")
    parser.add_argument("--test-size", type=int, default=200)
    parser.add_argument("--only", nargs="*", help="case names to run (substring match)")
    parser.add_argument("--shared-machine", action="store_true",
                        help="say in the record that other jobs ran meanwhile (the seconds)")
    args = parser.parse_args()
    every = cases() + run_folder_cases() + hostile_reply_cases()
    selected = [c for c in every if not args.only or any(o in c.name for o in args.only)]
    out = RESULTS / "reliability.json"
    previous = json.loads(out.read_text()) if out.exists() else {}
    rows = previous.get("cases", []) if args.no_cases else run_cases(selected)
    attacks = run_attacks(args.model, args.test_size) if args.attacks \
        else previous.get("attacks", [])
    out.write_text(json.dumps({"cases": rows, "attacks": attacks}, indent=2) + "\n")
    note = ("Seconds are wall time while other jobs shared the machine's 2 cores, not a "
            "timing of fedsteer alone." if args.shared_machine else "")
    (RESULTS / "reliability.md").write_text(
        markdown(rows, attacks, args.model, args.test_size, note))
    bad = [r for r in rows if r["outcome"] not in GOOD]
    print(f"{len(rows)} cases, {len(bad)} bad: {[r['case'] for r in bad]}")


if __name__ == "__main__":
    main()
