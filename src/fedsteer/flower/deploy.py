"""A federation parties run for real: the coordinator's SuperLink, a party's SuperNode, a run.

Everything on the wire is Flower's: TLS on every link (the certificates of
`fedsteer.flower.keys`), SuperNode authentication (`--enable-supernode-auth`, each party's
public key registered with `flwr supernode register`), the run submitted with `flwr run`.
fedsteer only starts the roles with the right flags, checks what it can before a party
connects, and turns Flower's exit codes and endless retries into one line a party's operator
can act on.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import logging
import os
import re
import socket
import ssl
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomli_w
from cryptography.hazmat.primitives import serialization

from fedsteer.flower.keys import SERVER_CERT, SERVER_KEY, Federation, read_federation
from fedsteer.flower.launch import (
    FlowerRunFailed,
    Processes,
    _executable,
    _toml_value,
    flower_processes,
    free_port,
    wait_for_port,
)

log = logging.getLogger(__name__)

CONNECTION = "fedsteer"  # the SuperLink connection's name in each FLWR_HOME/config.toml
DATABASE = "superlink.db"
#: Flower's exit code for a SuperNode that could not open its connection (refused key,
#: unreachable SuperLink): it says only "Exit Code: 305"; we say why
SUPERNODE_CONNECTION_ERROR = 305
INSECURE_WARNING = ("WARNING: --insecure: no TLS and no node authentication. Anyone who reaches "
                    "the port can join as a party, read every message and send replies.")


class PartyError(RuntimeError):
    """A party cannot take part; the message is one line its operator can act on."""


def split_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"--coordinator {address!r}: expected HOST:PORT")
    return host.strip("[]"), int(port)


def write_connection(flwr_home: Path, address: str, ca_cert: Path | None) -> None:
    """The `flwr` CLI's config: one SuperLink connection, TLS with the federation's CA."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    link: dict[str, Any] = {"address": address}
    if ca_cert is None:
        link["insecure"] = True
    else:
        link["root-certificates"] = str(Path(ca_cert).resolve())
    config = {"superlink": {"default": CONNECTION, CONNECTION: link}}
    (flwr_home / "config.toml").write_text(tomli_w.dumps(config))


# ------------------------------------------------------------------ coordinator
@dataclass
class Coordinator:
    """A running SuperLink for a federation folder."""

    federation: Federation
    processes: Processes
    process: subprocess.Popen
    insecure: bool
    #: what registration did to each party's key at this start ("registered", "registered
    #: before": a restart from the database)
    registered: list[str]

    @property
    def log_path(self) -> Path:
        return self.processes.work_dir / "superlink.log"


def coordinator_env(folder: Path) -> dict[str, str]:
    """The SuperLink's environment: its own FLWR_HOME under the federation folder."""
    return {"FLWR_HOME": str(folder / "flwr-home")}


@contextlib.contextmanager
def coordinator(folder: Path, insecure: bool = False, bind: str = "0.0.0.0",
                startup: float = 60.0) -> Iterator[Coordinator]:
    """Start the federation's SuperLink (its state in `folder/superlink.db`, so a restart
    keeps who is registered) and register every party's public key; stop it on the way out.
    """
    federation = read_federation(folder)
    _, port = split_address(federation.address)
    with flower_processes(federation.folder) as processes:
        processes.env.update(coordinator_env(federation.folder))
        log_path = processes.work_dir / "superlink.log"
        processes.env[LOG_ENV] = str(log_path)
        processes.env[LOG_FROM_ENV] = str(log_path.stat().st_size if log_path.exists() else 0)
        if insecure:
            log.warning(INSECURE_WARNING)
        process = processes.start("superlink", _superlink_args(federation, bind, port, insecure))
        wait_for_port(port, process, startup, log_path)
        # this machine dials its own SuperLink as the parties do: by the certificate's name
        write_connection(Path(processes.env["FLWR_HOME"]), federation.address,
                         None if insecure else federation.ca_cert)
        # without TLS Flower has no node authentication to register with
        registered = [] if insecure else register_parties(federation, processes)
        yield Coordinator(federation, processes, process, insecure, registered)


def _superlink_args(federation: Federation, bind: str, port: int, insecure: bool) -> list[str]:
    folder = federation.folder
    args = [_executable("flower-superlink"), "--isolation", "subprocess",
            "--host", bind, "--port", str(port), "--database", str(folder / DATABASE),
            "--disable-runtime-dependency-installation"]
    if insecure:
        return [*args, "--insecure"]
    return [*args, "--ssl-ca-certfile", str(federation.ca_cert),
            "--ssl-certfile", str(folder / SERVER_CERT), "--ssl-keyfile", str(folder / SERVER_KEY),
            "--enable-supernode-auth"]


def register_parties(federation: Federation, processes: Processes) -> list[str]:
    """`flwr supernode register` each party's public key; a key registered before (a restart
    from the database) is kept as it is. Returns what happened to each, for the operator."""
    done = []
    for public_key in federation.public_keys():
        if not public_key.is_file():
            done.append(f"{public_key.name}: missing, not registered")
            continue
        result = subprocess.run(
            [_executable("flwr"), "supernode", "register", str(public_key), CONNECTION],
            env=processes.env, capture_output=True, text=True, timeout=60, check=False)
        output = result.stdout + result.stderr
        if result.returncode == 0:
            done.append(f"{public_key.name}: registered")
        elif "already in use" in output:
            done.append(f"{public_key.name}: registered before")
        else:
            raise FlowerRunFailed(f"flwr supernode register {public_key} failed: "
                                  f"{_last_line(output)}")
    return done


def _last_line(text: str) -> str:
    lines = [line.strip(" │╭╮╰╯─") for line in text.splitlines()]
    lines = [line for line in lines if line]
    return lines[-1] if lines else "no output"


# ------------------------------------------------------------------ refused nodes
#: set on the SuperLink (and so on its ServerApps): its log and where this start began in it
LOG_ENV, LOG_FROM_ENV = "FEDSTEER_SUPERLINK_LOG", "FEDSTEER_SUPERLINK_LOG_FROM"
_REFUSED = re.compile(r"Attempted to register SuperNode with public key: b'(-----BEGIN PUBLIC"
                      r" KEY-----.*?-----END PUBLIC KEY-----)\\n'")


def refused_keys(log_text: str) -> dict[str, int]:
    """SuperNodes the SuperLink refused (key not registered), by the SHA-256 fingerprint of
    their public key as `ssh-keygen -lf party-N.pub` prints it, with how often each tried.

    Flower's Grid shows a ServerApp only the admitted nodes; the SuperLink's log is the one
    place a refused node leaves a trace, so that is what is read."""
    counts: dict[str, int] = {}
    for match in _REFUSED.finditer(log_text):
        pem = match.group(1).replace("\\n", "\n").encode()
        fingerprint = key_fingerprint(serialization.load_pem_public_key(pem))
        counts[fingerprint] = counts.get(fingerprint, 0) + 1
    return counts


def key_fingerprint(public_key) -> str:
    blob = public_key.public_bytes(serialization.Encoding.OpenSSH,
                                   serialization.PublicFormat.OpenSSH).split()[1]
    digest = hashlib.sha256(base64.b64decode(blob)).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


def refused_since_start() -> dict[str, Any] | None:
    """For the record: the nodes this coordinator refused since it started, if it is ours."""
    log_path = os.environ.get(LOG_ENV)
    if not log_path or not Path(log_path).is_file():
        return None
    with open(log_path, "rb") as log_file:
        log_file.seek(int(os.environ.get(LOG_FROM_ENV, "0") or 0))
        text = log_file.read().decode(errors="replace")
    refused = refused_keys(text)
    return {"refused_nodes": [{"key": k, "attempts": n} for k, n in sorted(refused.items())],
            "refused_nodes_source": "the SuperLink's log since the coordinator started (a "
                                    "refused node never reaches the ServerApp)"}


# ------------------------------------------------------------------ party
def check_coordinator(address: str, ca_cert: Path | None, timeout: float = 10.0) -> None:
    """Open one TLS handshake to the coordinator before anything else: a wrong CA, a
    coordinator without TLS or an unreachable one is named here, and nothing is sent."""
    host, port = split_address(address)
    try:
        sock = socket.create_connection((host, port), timeout)
    except OSError as error:
        raise PartyError(f"cannot reach the coordinator at {address}: "
                         f"{error.strerror or error}") from None
    with sock:
        if ca_cert is None:
            _refuse_tls_speaker(sock, address)
            return
        context = ssl.create_default_context(cafile=str(ca_cert))
        try:
            context.wrap_socket(sock, server_hostname=host).close()
        except ssl.SSLCertVerificationError as error:
            raise PartyError(_verification_failure(error, address, host, ca_cert)) from None
        except (ssl.SSLError, OSError) as error:
            raise PartyError(
                f"the coordinator at {address} does not speak TLS ({_reason(error)}): it was "
                "started with --insecure, or this is not the coordinator; nothing was sent"
            ) from None


def _verification_failure(error: ssl.SSLCertVerificationError, address: str, host: str,
                          ca_cert: Path) -> str:
    if "hostname" in str(error.verify_message) or "IP address mismatch" in str(error):
        return (f"the coordinator's certificate does not name {host}: dial it by a name or "
                f"address given to `federation init --host`; nothing was sent")
    return (f"the coordinator at {address} has a certificate not signed by {ca_cert} "
            f"({error.verify_message}): another federation's CA, or not your coordinator; "
            "nothing was sent")


def _refuse_tls_speaker(sock: socket.socket, address: str) -> None:
    """A party told --insecure must not fall back silently against a TLS coordinator."""
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    with contextlib.suppress(ssl.SSLError, OSError):
        context.wrap_socket(sock).close()
        raise PartyError(f"the coordinator at {address} speaks TLS but this party was started "
                         "with --insecure: pass --ca ca.crt and --key party-N.key instead")


def _reason(error: Exception) -> str:
    return getattr(error, "reason", None) or str(error) or type(error).__name__


@dataclass
class PartySettings:
    """What a party's SuperNode is started with."""

    coordinator: str
    ca_cert: Path | None
    key: Path | None
    partition_id: int
    data_file: Path
    task: str
    work_dir: Path
    max_wait: float = 600.0
    nodes_on_machine: int | None = None

    def node_config(self) -> dict[str, Any]:
        from fedsteer.federation.threads import NODES_ON_MACHINE
        from fedsteer.flower.client import NODE_TASK

        task = Path(self.task)  # a spec file absolute: Flower's processes run elsewhere
        config: dict[str, Any] = {"partition-id": self.partition_id,
                                  "data-file": str(self.data_file.resolve()),
                                  NODE_TASK: str(task.resolve()) if task.is_file() else self.task}
        if self.nodes_on_machine:
            config[NODES_ON_MACHINE] = self.nodes_on_machine
        return config


def supernode_args(party: PartySettings) -> list[str]:
    config = " ".join(f"{k}={_toml_value(v)}" for k, v in party.node_config().items())
    args = [_executable("flower-supernode"), "--superlink", party.coordinator,
            "--host", "127.0.0.1", "--port", str(free_port()), "--node-config", config,
            "--max-wait-time", f"{party.max_wait:g}"]
    if party.ca_cert is None:
        return [*args, "--insecure"]
    return [*args, "--root-certificates", str(party.ca_cert.resolve()),
            "--auth-supernode-private-key", str(party.key.resolve())]


def start_party(processes: Processes, party: PartySettings, name: str) -> subprocess.Popen:
    """The party's SuperNode, after the bounded TLS check (which raises `PartyError`)."""
    check_coordinator(party.coordinator, party.ca_cert)
    return processes.start(name, supernode_args(party))


def party_exit_reason(returncode: int, log_text: str, party: PartySettings) -> str:
    """One line for a SuperNode that stopped: why, in words its operator can act on."""
    flower_says = _flower_error(log_text)
    said = re.findall(r"Exit Code: (\d+)", log_text)  # the code Flower meant to exit with
    returncode = int(said[-1]) if said else returncode
    if returncode == SUPERNODE_CONNECTION_ERROR:
        if "2004" in flower_says or "activate" in flower_says.lower():
            return (f"the coordinator refused this party's key {party.key}: its public key is "
                    "not registered there (ask the coordinator to register the matching .pub "
                    f"and restart it). Flower: {flower_says}")
        return (f"no connection to the coordinator at {party.coordinator} within "
                f"{party.max_wait:g} s. Flower: {flower_says}")
    if returncode == 0:
        return "the party stopped"
    return f"the party's SuperNode exited with code {returncode}. Flower: {flower_says}"


def _flower_error(log_text: str) -> str:
    codes = re.findall(r"\[code: \d+\][^\n]*", log_text)
    if codes:
        return codes[-1].strip()
    errors = [line for line in log_text.splitlines() if "ERROR" in line or "Error" in line]
    return re.sub(r"\x1b\[[0-9;]*m", "", errors[-1]).strip() if errors else "(no message)"


def run_party(party: PartySettings) -> str:
    """Run the SuperNode until it stops; raise `PartyError` (one line) if it failed."""
    with flower_processes(party.work_dir) as processes:
        process = start_party(processes, party, "supernode")
        try:
            process.wait()
        except KeyboardInterrupt:
            return "the party stopped (interrupted)"
        log_text = (party.work_dir / "supernode.log").read_text(errors="replace")
    reason = party_exit_reason(process.returncode, log_text, party)
    if process.returncode != 0:
        raise PartyError(f"{reason} (log: {party.work_dir / 'supernode.log'})")
    return reason


# ------------------------------------------------------------------ runs
def submit_to_federation(federation: Federation, app_dir: Path, work_dir: Path,
                         timeout: float, on_wait=None, insecure: bool = False) -> Path:
    """`flwr run` to the federation's coordinator over TLS; returns the `flwr run` log."""
    from fedsteer.flower.launch import submit

    with flower_processes(work_dir) as processes:
        write_connection(Path(processes.env["FLWR_HOME"]), federation.address,
                         None if insecure else federation.ca_cert)
        submit(processes, app_dir, None, timeout, on_wait)
    return work_dir / "flwr-run.log"


def run_on_federation(config, out_dir: Path, folder: Path, save_dir: Path | None,
                      round_timeout: float, on_wait=None, insecure: bool = False,
                      timeout: float = 7200.0) -> dict[str, Any]:
    """Submit `config` to the federation's coordinator; its record (and artifacts, with
    `save_dir`) come back through `flwr run`'s stream into `out_dir` on this machine."""
    from fedsteer.eval.record import read_result
    from fedsteer.flower import handback, to_run_config
    from fedsteer.flower.launch import first_failure, write_app
    from fedsteer.methods import make_method

    federation = read_federation(folder)
    central = make_method(config.method, **config.method_options()).centralized
    if config.clients != federation.parties and not central:
        raise ValueError(f"--clients {config.clients}, but the federation in {folder} has "
                         f"{federation.parties} parties: pass --clients {federation.parties}")
    run_config = to_run_config(config, round_timeout=round_timeout, hand_back=True,
                               hand_back_artifacts=save_dir is not None)
    work_dir = out_dir / "flower"
    app_dir = write_app(work_dir / "app", run_config)
    log_path = submit_to_federation(federation, app_dir, work_dir, timeout, on_wait, insecure)
    try:
        handback.collect(log_path.read_text(errors="replace"), out_dir,
                         Path(save_dir).resolve() if save_dir else None)
    except handback.HandbackMissing as error:
        where, line = first_failure(work_dir) or (log_path, "no error in the run's log")
        raise FlowerRunFailed(f"{error}: {line}; see {where}") from None
    return read_result(out_dir)
