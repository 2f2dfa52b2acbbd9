"""The example method, run end to end on a tiny random model (no download, seconds)."""

from __future__ import annotations

from fedsteer.experiment import RunConfig, run_experiment
from fedsteer.methods import METHODS


def test_my_method_is_found_and_runs_in_process(tmp_path):
    assert "my-method" in METHODS  # found through its entry point, once installed
    record = run_experiment(RunConfig("my-method", "sst2", "tiny-random", clients=3,
                                      test_size=20, options={"demos_per_class": 1}), tmp_path)
    assert record["method"] == "my-method" and 0.0 <= record["metrics"]["accuracy"] <= 1.0
    (extract,) = record["costs"]["rounds"]
    assert extract["clients"] == [0, 1, 2] and extract["rejected"] == []
    assert extract["bytes_up"] > 3 * 2 * 4 * 64  # three clients' 2·L·d float32 vectors
