"""The runtimes that reach clients through Flower's `Grid`: rounds (`grid.py`), asynchronous
workers (`asynchronous.py`) and SecAgg+ rounds (`secagg.py`).

They are the in-process round loop (`Runtime`) with `_collect` going through Flower; nothing
here knows a method's math or how a run is configured — the Flower apps that build a run
and drive these runtimes are `fedsteer.flower`.
"""

from fedsteer.federation.flower.asynchronous import AsyncGridRuntime
from fedsteer.federation.flower.grid import CLIENT_INFO, GridRuntime, NodeInfo, discover_nodes

__all__ = ["CLIENT_INFO", "AsyncGridRuntime", "GridRuntime", "NodeInfo", "discover_nodes"]
