"""The federation's commands: `federation init`, `coordinator` and `party` (cli.py mounts them).

Thin, as cli.py is: each parses, calls `fedsteer.flower.keys` or `fedsteer.flower.deploy`,
prints. A user error is one line on stderr and exit code 2; nothing secret is printed.
"""

from __future__ import annotations

import contextlib
import re
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import typer

from fedsteer.flower import deploy, keys
from fedsteer.run_folder import check_writable_folder

federation_app = typer.Typer(help="Make a federation's keys and certificates.",
                             no_args_is_help=True, add_completion=False)

#: What each built-in method's client sends the coordinator; the rows themselves never do.
#: Every reply also carries the party's row count (it weighs the mean), the seconds its
#: step took and its peak memory.
LEAVES = {
    "ifed-icl": "once: context vectors (each layer's mean activation over a few of its "
                "demonstrations); then each round: coefficient updates and a loss",
    "fedavg-lora": "each round: the LoRA adapter's weights after local training, and a loss",
    "fedpt": "each round: the small proxy model's LoRA weights after local training, "
             "and a loss",
    "bdpl": "each round: the prompt's token distribution after local steps, a loss and "
            "the black-box calls made",
    "asyndbt": "each message: its prompt vector, a loss and the calls made; at the end its "
               "accuracy on the shared test rows (its demonstrations stay here)",
    "sync-dbt": "as asyndbt, in rounds",
    "local-icl": "its accuracy on the shared test rows (its demonstrations stay here)",
}
CENTRAL = "not a federated method: it needs every row in one place; do not run it here"


def stop_on_signals() -> None:
    """SIGTERM (a service manager's stop) and SIGINT (Ctrl-C, even when a shell started us in
    the background with it ignored) unwind the stack, so every Flower process started is
    stopped by PID on the way out instead of left running without us."""
    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)
    signal.signal(signal.SIGINT, interrupt)


@contextlib.contextmanager
def one_line_errors() -> Iterator[None]:
    """A user error is one line and exit code 2, as everywhere in fedsteer."""
    try:
        yield
    except (ValueError, OSError, deploy.PartyError, deploy.FlowerRunFailed) as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(code=2) from None


@federation_app.command("init")
def init(
    folder: Annotated[Path, typer.Argument(help="a new folder for the federation's files")],
    parties: Annotated[int, typer.Option(help="how many parties", min=1)],
    host: Annotated[str, typer.Option(
        help="the coordinator's DNS names and IP addresses the parties dial, comma-separated "
             "(the first is the address written for them)")],
    port: Annotated[int, typer.Option(help="the coordinator's port")] = keys.DEFAULT_PORT,
) -> None:
    """A CA, the coordinator's TLS certificate, one key pair per party, and a README saying
    which file goes to which machine."""
    with one_line_errors():
        check_writable_folder(folder, "FOLDER")
        federation = keys.init_federation(
            folder, parties, [h.strip() for h in host.split(",") if h.strip()], port)
    typer.echo(f"federation of {parties} parties, coordinator at {federation.address}: "
               f"{federation.folder}")
    typer.echo(f"read {federation.folder / 'README.txt'} before copying anything: "
               "each party-N.key goes to party N only")


def coordinator(
    folder: Annotated[Path, typer.Argument(help="the folder `federation init` wrote")],
    bind: Annotated[str, typer.Option(help="the interface to listen on")] = "0.0.0.0",
    insecure: Annotated[bool, typer.Option(
        "--insecure", help="no TLS and no node authentication (a test bench only)")] = False,
) -> None:
    """Run the federation's SuperLink: TLS, only registered parties admitted, its state in
    FOLDER/superlink.db (a restart keeps the federation)."""
    stop_on_signals()
    with one_line_errors(), deploy.coordinator(folder, insecure, bind) as running:
        for line in running.registered:
            typer.echo(f"  {line}")
        typer.echo(f"coordinator listening on {bind}, parties dial "
                   f"{running.federation.address}; log: {running.log_path}")
        with contextlib.suppress(KeyboardInterrupt):
            running.process.wait()
    typer.echo("coordinator stopped")


def party(
    coordinator_address: Annotated[str, typer.Option(
        "--coordinator", help="HOST:PORT of the coordinator, as its certificate names it")],
    task: Annotated[str, typer.Option(help="the federation's task: a built-in name or a "
                                           "spec file")],
    data: Annotated[Path, typer.Option(help="this party's own rows (CSV or JSONL)")],
    ca: Annotated[Path | None, typer.Option(help="the federation's ca.crt")] = None,
    key: Annotated[Path | None, typer.Option(help="this party's private key, party-N.key")]
    = None,
    partition_id: Annotated[int | None, typer.Option(
        help="this party's number [default: N of party-N.key]", min=0)] = None,
    insecure: Annotated[bool, typer.Option(
        "--insecure", help="join a coordinator started with --insecure")] = False,
    work_dir: Annotated[Path, typer.Option(help="where the SuperNode's log goes")]
    = Path("fedsteer-party"),
    max_wait: Annotated[float, typer.Option(
        help="seconds to keep trying to reach the coordinator before giving up")] = 600.0,
) -> None:
    """Take part: check this party's rows, say what leaves the machine, then run a SuperNode
    with TLS and this party's key until it is stopped."""
    from fedsteer.data import load_task
    from fedsteer.data.loading import load_examples

    with one_line_errors():
        settings = _party_settings(coordinator_address, task, data, ca, key, partition_id,
                                   insecure, work_dir, max_wait)
        spec = load_task(task).spec
        rows = load_examples(data, spec.labels, pair=spec.is_pair, max_chars=2000)
        _print_what_leaves(len(rows), data)
        stop_on_signals()
        typer.echo(deploy.run_party(settings))


def _party_settings(address: str, task: str, data: Path, ca: Path | None, key: Path | None,
                    partition_id: int | None, insecure: bool, work_dir: Path,
                    max_wait: float) -> deploy.PartySettings:
    """The SuperNode's settings; a flag combination that cannot work is refused here."""
    deploy.split_address(address)
    check_writable_folder(work_dir, "--work-dir")  # before the rows are read and shown
    if insecure and (ca is not None or key is not None):
        raise ValueError("--insecure: give neither --ca nor --key (no TLS, no node key)")
    if not insecure and (ca is None or key is None):
        raise ValueError("give --ca ca.crt and --key party-N.key (or --insecure for a "
                         "coordinator started with --insecure)")
    if partition_id is None:
        number = re.search(r"(\d+)", key.stem) if key is not None else None
        if number is None:
            raise ValueError("--partition-id: not given and not in the key's file name")
        partition_id = int(number.group(1))
    return deploy.PartySettings(address, ca, key, partition_id, data, task, work_dir, max_wait)


def _print_what_leaves(rows: int, data: Path) -> None:
    from fedsteer.methods import METHODS

    typer.echo(f"{data}: {rows} rows checked. They never leave this machine; what does, "
               "for the method the coordinator runs:")
    for name in METHODS:
        central = getattr(METHODS[name], "centralized", False)
        typer.echo(f"  {name}: {CENTRAL if central else LEAVES.get(name, 'its reply records')}")
    typer.echo("  every method: this party's row count, and each step's seconds and memory")
