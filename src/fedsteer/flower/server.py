"""The ServerApp: builds the run named in Flower's run config and drives it over the Grid."""

from __future__ import annotations

import logging
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedsteer.eval.record import write_result
from fedsteer.experiment import (
    RunConfig,
    async_config,
    default_run_dir,
    run_experiment,
    runtime_config,
)
from fedsteer.federation.flower.asynchronous import AsyncGridRuntime
from fedsteer.federation.flower.grid import GridRuntime, discover_nodes
from fedsteer.federation.flower.secagg import SecureAggregationUnsupported
from fedsteer.flower import deploy, handback
from fedsteer.flower.config import FlowerRun, from_run_config, load_run_task
from fedsteer.methods import make_method
from fedsteer.methods.base import AsyncMethod, MethodBase

log = logging.getLogger(__name__)

server_app = ServerApp()


@server_app.main()
def serve(grid: Grid, context: Context) -> None:
    run = from_run_config(dict(context.run_config))
    config = run.config
    task = load_run_task(config.task, run.data_dir)
    method = make_method(config.method, **config.method_options())
    if config.secagg and not method.secure_mean:
        raise SecureAggregationUnsupported(
            f"{method.name} does not aggregate by a mean; secure aggregation would change it")
    wanted = 1 if method.centralized else config.clients
    nodes = discover_nodes(grid, wanted, run.node_wait) if _has_client_step(method) else {}
    if isinstance(method, AsyncMethod):
        runtime = AsyncGridRuntime(grid, {c: n.node_id for c, n in nodes.items()},
                                   async_config(method), timeout=run.round_timeout)
    else:
        runtime = GridRuntime(grid, nodes, runtime_config(config), timeout=run.round_timeout,
                              secure=config.secagg)
    out_dir, save_dir = _result_dirs(run, config)
    record = run_experiment(config, out_dir, task=task, runtime=runtime, save_dir=save_dir)
    if run.hand_back:
        _note_refused_nodes(record, out_dir)
        handback.emit(out_dir, with_artifacts=save_dir is not None)
    log.info("fedsteer %s on %s: accuracy %.4f", config.method, task.name,
             record["metrics"]["accuracy"])


def _note_refused_nodes(record: dict, out_dir: Path) -> None:
    """A federation's record names the SuperNodes its coordinator refused."""
    refused = deploy.refused_since_start()
    if refused is not None:
        record["federation"] = refused
        write_result(record, out_dir)


def _result_dirs(run: FlowerRun, config: RunConfig) -> tuple[Path | None, Path | None]:
    """Where the record and artifacts go. Handed back (a federation), they are written on the
    coordinator under the SuperLink's folder first: the submitter's paths are not here."""
    if run.hand_back:
        out_dir = default_run_dir(config).resolve()
        return out_dir, out_dir / handback.ARTIFACTS if run.hand_back_artifacts else None
    return (Path(run.out_dir) if run.out_dir else None,
            Path(run.save_dir) if run.save_dir else None)


def _has_client_step(method: MethodBase) -> bool:
    return type(method).client_step is not MethodBase.client_step
