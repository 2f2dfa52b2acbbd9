"""One hostile client in an otherwise honest federation, for the reliability benchmark.

`poisoned_run` runs a method end to end with client 1 corrupting every reply it sends; the
runtime, not the method, must keep the result clean. Used by benchmarks/reliability.py.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, RecordDict

import fedsteer.experiment as experiment
from fedsteer.eval.record import RESULT_FILE, read_result
from fedsteer.experiment import RunConfig, run_experiment

ATTACKER = 1
ATTACKS = ("norm1e30", "scale1e6", "signflip")
#: malformed replies: the honest values sent as another dtype (complex passed the check and
#: failed the norm; bool and strings were skipped by it)
DTYPE_ATTACKS = {"complex64": np.complex64, "bool": np.bool_, "strings": np.str_}


def corrupt(reply: RecordDict, attack: str) -> RecordDict:
    """The attacker's version of an honest reply."""
    names = [(rec, name) for rec, record in reply.array_records.items() for name in record]
    arrays = {key: reply[key[0]][key[1]].numpy().astype(np.float64) for key in names}
    norm = np.sqrt(sum(float(np.sum(a * a)) for a in arrays.values())) or 1.0
    for key, value in arrays.items():
        if attack == "norm1e30":
            value = value / norm * 1e30
        elif attack == "scale1e6":
            value = value * 1e6
        elif attack == "signflip":
            value = -value
        elif attack == "nan":
            value = value.copy()
            value.flat[0] = np.nan
        elif attack == "shape":
            value = np.zeros((*value.shape[:-1], value.shape[-1] + 1))
        arrays[key] = value
    out = RecordDict()
    for rec, record in reply.items():
        if rec in reply.array_records:
            dtype = DTYPE_ATTACKS.get(attack, np.float32)
            out[rec] = ArrayRecord({name: Array(arrays[(rec, name)].astype(dtype))
                                    for name in record})
        else:
            out[rec] = record
    return out


def poisoned(method, attack: str):
    """`method` with client ATTACKER's replies corrupted; everything else untouched."""
    base = type(method)

    class Poisoned(base):
        def client_step(self, message, client):
            reply = super().client_step(message, client)
            return corrupt(reply, attack) if client.cid == ATTACKER else reply

        def client_steps(self, message, clients):
            """Clients stepped together (IFed-ICL's calibration) are poisoned too."""
            batched = super().client_steps(message, clients)
            if batched is not None:
                batched.contents = [corrupt(c, attack) if client.cid == ATTACKER else c
                                    for c, client in zip(batched.contents, clients, strict=True)]
            return batched

    clone = object.__new__(Poisoned)
    clone.__dict__.update(vars(method))
    return clone


def poisoned_run(method: str, model: str, attack: str, out: Path, *, test_size: int,
                 clients: int, options: dict, task: str = "sst2") -> dict:
    """Run (or read back) one cell with the attack in place."""
    if (out / RESULT_FILE).exists():
        return read_result(out)
    config = RunConfig(method=method, task=task, model=model, clients=clients,
                       test_size=test_size, options=dict(options))
    real = experiment.make_method
    experiment.make_method = lambda name, **kw: (
        real(name, **kw) if attack == "none" else poisoned(real(name, **kw), attack))
    try:
        return run_experiment(config, out)
    finally:
        experiment.make_method = real


__all__ = ["ATTACKS", "DTYPE_ATTACKS", "corrupt", "poisoned", "poisoned_run"]
