"""Start Flower's own processes for a run, and stop every one of them afterwards.

`simulate` starts a SuperLink in simulation mode and submits the run with `flwr run`;
`deploy` starts a SuperLink and one SuperNode per client on 127.0.0.1 (each told its
partition through `--node-config`), as a real deployment would, and submits the same run.
Each launch gets its own FLWR_HOME and free ports, so it never touches a user's Flower
configuration, and every process it starts is stopped by PID (with its children) on the
way out, even when the run fails.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import tomli_w

from fedsteer import settings
from fedsteer.federation.threads import NODES_ON_MACHINE

if TYPE_CHECKING:
    from fedsteer.experiment import RunConfig

log = logging.getLogger(__name__)

APP_COMPONENTS = {
    "serverapp": "fedsteer.flower:server_app",
    "clientapp": "fedsteer.flower:client_app",
}


class FlowerRunFailed(RuntimeError):
    """`flwr run` did not complete; the message names the log to read."""


def write_app(app_dir: Path, run_config: dict[str, Any]) -> Path:
    """A Flower App that is only a pyproject: the code is the installed fedsteer package."""
    app_dir.mkdir(parents=True, exist_ok=True)
    pyproject = {
        "build-system": {"requires": ["hatchling"], "build-backend": "hatchling.build"},
        "project": {"name": "fedsteer-run", "version": "1.0.0", "dependencies": [],
                    "description": "a fedsteer run on Flower", "license": "Apache-2.0"},
        "tool": {"flwr": {"app": {"publisher": "fedsteer", "components": APP_COMPONENTS,
                                  "config": run_config}}},
    }
    (app_dir / "pyproject.toml").write_text(tomli_w.dumps(pyproject))
    return app_dir


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, process: subprocess.Popen, timeout: float, log_path: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise FlowerRunFailed(f"{process.args[0]} exited with {process.returncode}; "
                                  f"see {log_path}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return
        time.sleep(0.2)
    raise FlowerRunFailed(f"nothing listened on port {port} within {timeout:g} s; see {log_path}")


class Processes:
    """Processes started in their own session, so each is stopped with all its children."""

    def __init__(self, work_dir: Path, env: dict[str, str]) -> None:
        self.work_dir, self.env = work_dir, env
        self.started: list[subprocess.Popen] = []

    def start(self, name: str, args: Sequence[str]) -> subprocess.Popen:
        log_path = self.work_dir / f"{name}.log"
        with log_path.open("ab") as out:
            process = subprocess.Popen(
                list(args), stdout=out, stderr=subprocess.STDOUT, env=self.env,
                cwd=self.work_dir, start_new_session=True,
            )
        log.info("started %s (pid %d), log %s", name, process.pid, log_path)
        self.started.append(process)
        return process

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM every process group, then SIGKILL what is left after `timeout` s."""
        for process in self.started:
            _signal_group(process, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for process in self.started:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(max(deadline - time.monotonic(), 0.1))
            _signal_group(process, signal.SIGKILL)
            process.wait()
        self.started.clear()


def _signal_group(process: subprocess.Popen, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, sig)


def _executable(name: str) -> str:
    """Flower's console scripts sit beside this interpreter (a venv's bin)."""
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.exists() else name


@contextlib.contextmanager
def flower_processes(work_dir: Path) -> Iterator[Processes]:
    work_dir.mkdir(parents=True, exist_ok=True)
    ray_tmp = tempfile.mkdtemp(prefix="ray")  # Ray's socket paths must stay short
    env = {
        **os.environ,
        "FLWR_HOME": str(work_dir / "flwr-home"),
        "RAY_TMPDIR": ray_tmp,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "RAY_USAGE_STATS_ENABLED": "0",  # no phoning home from a machine without internet
        # nor from Flower: its exit waits on a telemetry request that, offline, kept a
        # refused SuperNode alive after "Exit Code: 305" instead of exiting
        "FLWR_TELEMETRY_ENABLED": "0",
        "PYTHONUNBUFFERED": "1",
    }
    processes = Processes(work_dir, env)
    try:
        yield processes
    finally:
        processes.stop()
        shutil.rmtree(ray_tmp, ignore_errors=True)


def start_superlink(processes: Processes, simulation: bool) -> int:
    """A SuperLink serving its Control, Fleet and Runtime APIs on one free port."""
    port = free_port()
    args = [
        _executable("flower-superlink"), "--insecure", "--isolation", "subprocess",
        "--host", "127.0.0.1", "--port", str(port),
        "--database", str(processes.work_dir / "superlink.db"),
        "--disable-runtime-dependency-installation",
    ]
    process = processes.start("superlink", [*args, "--simulation"] if simulation else args)
    wait_for_port(port, process, 60, processes.work_dir / "superlink.log")
    _write_connection(Path(processes.env["FLWR_HOME"]), port)
    return port


def start_supernode(processes: Processes, superlink_port: int, node_config: dict[str, Any]):
    config = " ".join(f"{k}={_toml_value(v)}" for k, v in node_config.items())
    name = f"supernode{node_config.get('partition-id', len(processes.started))}"
    return processes.start(name, [
        _executable("flower-supernode"), "--insecure",
        "--superlink", f"127.0.0.1:{superlink_port}",
        "--host", "127.0.0.1", "--port", str(free_port()),
        "--node-config", config,
    ])


def _toml_value(value: Any) -> str:
    return f'"{value}"' if isinstance(value, str) else str(value)


def _write_connection(flwr_home: Path, control_port: int) -> None:
    flwr_home.mkdir(parents=True, exist_ok=True)
    connection = {"superlink": {"default": "fedsteer",
                                "fedsteer": {"address": f"127.0.0.1:{control_port}",
                                             "insecure": True}}}
    (flwr_home / "config.toml").write_text(tomli_w.dumps(connection))


def submit(processes: Processes, app_dir: Path, federation_config: str | None,
           timeout: float, on_wait: Callable[[], None] | None = None) -> None:
    """`flwr run APP fedsteer --stream`: blocks until the ServerApp has finished."""
    args = [_executable("flwr"), "run", str(app_dir), "fedsteer", "--stream"]
    if federation_config:
        args += ["--federation-config", federation_config]
    log_path = processes.work_dir / "flwr-run.log"
    process = processes.start("flwr-run", args)
    deadline = time.monotonic() + timeout
    while process.poll() is None:
        if time.monotonic() > deadline:
            raise FlowerRunFailed(f"flwr run did not finish within {timeout:g} s; see {log_path}")
        if on_wait is not None:
            on_wait()
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(1.0)
    failure = app_failure(log_path.read_text(errors="replace"))
    if process.returncode != 0 or failure:
        raise FlowerRunFailed(f"flwr run failed (exit {process.returncode}): {failure or '?'}; "
                              f"see {log_path}")


def app_failure(log_text: str) -> str | None:
    """`flwr run` exits 0 even when the app raised ("ServerApp raised an exception" in a
    deployment, "Simulation raised an exception" in the simulation): the first error line."""
    if "raised an exception" not in log_text:
        return None
    return _first_error_line(log_text) or "an app raised an exception"


def _first_error_line(text: str) -> str | None:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    errors = [line for line in lines if re.match(r"^[\w.]+(Error|Exception|Mismatch)\b", line)]
    return errors[0] if errors else None


def first_failure(work_dir: Path) -> tuple[Path, str] | None:
    """The first error in any of Flower's logs under `work_dir`, with the log's path: what
    to show when a run ended without its result."""
    for log_path in sorted(work_dir.glob("*.log")):
        line = _first_error_line(log_path.read_text(errors="replace"))
        if line:
            return log_path, line
    return None


def simulate(run_config: dict[str, Any], supernodes: int, work_dir: Path,
             timeout: float = 7200.0, on_wait: Callable[[], None] | None = None,
             cpus_per_client: int | None = None) -> None:
    """Run in Flower's simulation engine: `supernodes` virtual nodes, one per partition.

    `cpus_per_client`: the CPUs each Ray actor is given (Flower's default: 2), so cores //
    it actors run clients at once, each with that share of the cores as its threads."""
    app_dir = write_app(work_dir / "app", run_config)
    federation = f"num-supernodes={supernodes}"
    if cpus_per_client is not None:
        federation += f" client-resources-num-cpus={int(cpus_per_client)}"
    with flower_processes(work_dir) as processes:
        start_superlink(processes, simulation=True)
        submit(processes, app_dir, federation, timeout, on_wait)


def deploy(run_config: dict[str, Any], node_configs: Sequence[dict[str, Any]], work_dir: Path,
           timeout: float = 7200.0, on_wait: Callable[[], None] | None = None) -> None:
    """A real deployment on 127.0.0.1: a SuperLink plus one SuperNode per node config."""
    app_dir = write_app(work_dir / "app", run_config)
    with flower_processes(work_dir) as processes:
        port = start_superlink(processes, simulation=False)
        for node_config in node_configs:
            start_supernode(processes, port, node_config)
        submit(processes, app_dir, None, timeout, on_wait)


def run_on_flower(
    config: RunConfig, out_dir: Path, *, deployment: bool = False,
    save_dir: Path | None = None, round_timeout: float = 3600.0,
    on_wait: Callable[[], None] | None = None, cpus_per_client: int | None = None,
    federation: Path | None = None, insecure: bool = False,
) -> dict[str, Any]:
    """Run `config` on Flower (simulation, a localhost deployment, or the coordinator of the
    `federation` folder over TLS); return its record.

    The ServerApp writes the same `result.json` as an in-process run, into `out_dir` (from a
    federation's coordinator it comes back through `flwr run`'s stream, artifacts too);
    Flower's own logs and state go to `out_dir/flower/`.
    """
    from fedsteer.data import load_task
    from fedsteer.eval.record import RESULT_FILE, read_result
    from fedsteer.experiment import refuse_a_rule_that_is_not_the_mean
    from fedsteer.flower import to_run_config
    from fedsteer.methods import make_method

    out_dir = Path(out_dir).resolve()
    method = make_method(config.method, **config.method_options())
    refuse_a_rule_that_is_not_the_mean(config, method)  # before any process starts
    if Path(config.task).is_file():  # a user's spec file: Flower's processes run elsewhere
        config = dataclasses.replace(config, task=str(Path(config.task).resolve()))
    if federation is not None:
        from fedsteer.flower.deploy import run_on_federation

        load_task(config.task)  # a missing or malformed task fails here, before any link
        return run_on_federation(config, out_dir, Path(federation), save_dir, round_timeout,
                                 on_wait, insecure)
    run_config = to_run_config(
        config, out_dir=out_dir, save_dir=save_dir.resolve() if save_dir else "",
        data_dir=_absolute_data_dir(), round_timeout=round_timeout,
    )
    load_task(config.task)  # a missing or malformed task fails here, before Flower starts
    nodes = 1 if method.centralized else config.clients
    work_dir = out_dir / "flower"
    if deployment:
        node_configs = [{"partition-id": i, "num-partitions": nodes, NODES_ON_MACHINE: nodes}
                        for i in range(nodes)]  # all here: each client process's share
        deploy(run_config, node_configs, work_dir, on_wait=on_wait)
    else:
        simulate(run_config, nodes, work_dir, on_wait=on_wait, cpus_per_client=cpus_per_client)
    if not (out_dir / RESULT_FILE).is_file():
        where, line = first_failure(work_dir) or (work_dir, "no error found in Flower's logs")
        raise FlowerRunFailed(f"Flower finished without a {RESULT_FILE}: {line}; see {where}")
    return read_result(out_dir)


def _absolute_data_dir() -> str:
    """Pass the data directory on absolute, so Flower's processes find it from any cwd."""
    return str(settings.data_dir().resolve())
