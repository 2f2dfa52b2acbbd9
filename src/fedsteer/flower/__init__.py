"""fedsteer on Flower: a `ServerApp` and a `ClientApp` that run any method by name.

The methods' messages travel as the Flower `RecordDict`s they already are; the server
side is the same round loop as in-process (`fedsteer.federation.flower.GridRuntime`), the
client side calls the same `client_step`. Nothing here knows a method's math.

A node is one party: it reads `partition-id` (and optionally its own `data-file`) from its
node config and keeps its state in Flower's `context.state` between rounds. The run's
settings come from Flower's run config (`to_run_config` / `from_run_config`), which is how
`flwr run flower` (the App in the repository's `flower/`) and `fedsteer run --runtime
flower` both configure it. Rooms: `config.py` (run config), `server.py` (ServerApp),
`client.py` (ClientApp), `launch.py` (starting Flower's own processes on this machine).
This room sits above `experiment`: the apps build and run experiments.
"""

from fedsteer.flower.client import client_app, identify, step
from fedsteer.flower.config import FlowerRun, from_run_config, to_run_config
from fedsteer.flower.server import serve, server_app

__all__ = [
    "FlowerRun", "client_app", "from_run_config", "identify", "serve", "server_app", "step",
    "to_run_config",
]
