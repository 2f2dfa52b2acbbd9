"""The thread budget: each process that runs a model gets its share of the machine's cores.

torch starts with one intra-op thread per core in every process, so ten SuperNodes' client
processes on two cores run twenty spinning OpenMP threads that fight over them. Every
process that runs a model sets its share here, and nowhere else: `max(1, cores // the
processes running at once on this machine)`, or the run's `--threads` when given.

Who runs at once, per runtime: in process, one process (all cores); in Flower's simulation,
the Ray actors that fit on this machine (cores // the CPUs each actor was given, the
backend's `client-resources-num-cpus`); in a deployment, the SuperNodes that the launcher
started on this machine (node config `nodes-on-machine`), else one.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator, Mapping
from typing import Any

log = logging.getLogger(__name__)

#: node-config key: how many SuperNodes (client processes) share this machine's cores
NODES_ON_MACHINE = "nodes-on-machine"


def machine_cores() -> int:
    """The cores this process may run on (its CPU affinity, where the OS tells)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def thread_share(processes: int = 1, threads: int | None = None,
                 cores: int | None = None) -> int:
    """Intra-op threads for one of `processes` processes running at once: `threads` when the
    run sets it, else an equal share of the cores, at least one."""
    if threads is not None:
        if int(threads) < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        return int(threads)
    cores = machine_cores() if cores is None else cores
    return max(1, cores // max(1, int(processes)))


def apply_threads(processes: int = 1, threads: int | None = None) -> int:
    """Set torch's intra-op threads to this process's share; return it."""
    import torch

    share = thread_share(processes, threads)
    if torch.get_num_threads() != share:
        log.debug("torch intra-op threads: %d -> %d", torch.get_num_threads(), share)
        torch.set_num_threads(share)
    return share


@contextlib.contextmanager
def thread_budget(processes: int = 1, threads: int | None = None) -> Iterator[int]:
    """`apply_threads` for a block, then torch's previous count again (a library call must
    not leave the caller's process changed)."""
    import torch

    before = torch.get_num_threads()
    try:
        yield apply_threads(processes, threads)
    finally:
        torch.set_num_threads(before)


def current_threads() -> int:
    """torch's intra-op threads now (what a client step runs with)."""
    import torch

    return torch.get_num_threads()


def simulation_actors() -> int | None:
    """Ray actors sharing this machine in Flower's simulation (cores // the CPUs this actor
    was given); None outside a Ray actor. Ray is never imported here, only asked if loaded."""
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return None
    try:
        cpus = float(ray.get_runtime_context().get_assigned_resources().get("CPU", 0))
    except Exception:  # noqa: BLE001 - the driver, or an older Ray: not an actor we know
        return None
    if cpus <= 0:
        return None
    return max(1, int(machine_cores() // cpus))


def client_processes(node_config: Mapping[str, Any]) -> int:
    """How many client processes run at once on this machine, as a ClientApp can tell: the
    simulation's actors, else the SuperNodes its launcher started here, else one."""
    actors = simulation_actors()
    if actors is not None:
        return actors
    nodes = node_config.get(NODES_ON_MACHINE)
    return max(1, int(nodes)) if nodes not in (None, "") else 1
