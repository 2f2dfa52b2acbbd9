"""Table formatting: bytes in decimal units, spreads where clients evaluated alone."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console

from fedsteer.eval.costs import peak_rss_bytes, reset_peak_rss
from fedsteer.eval.report import comparison_table, human_bytes


def test_human_bytes():
    assert human_bytes(0) == "0 B"
    assert human_bytes(999) == "999 B"
    assert human_bytes(172_398) == "172.4 KB"
    assert human_bytes(2.5e9) == "2.5 GB"
    assert human_bytes(3e12) == "3000.0 GB"


def test_table_shows_spread_and_costs():
    record = {
        "method": "local-icl",
        "metrics": {"accuracy": 0.8, "accuracy_std": 0.05, "macro_f1": 0.7},
        "costs": {"bytes_up_per_round": 380, "bytes_down_per_round": 230, "num_rounds": 1,
                  "client_seconds": 1.5, "eval_seconds": 0.0, "peak_rss_bytes": 3.1e9},
    }
    console = Console(width=150, record=True)
    console.print(comparison_table([record], full=True))
    text = console.export_text()
    assert "80.0 ± 5.0" in text and "70.0" in text and "380 B" in text and "3.1 GB" in text


def test_the_default_table_fits_100_columns_uncut():
    """What a person decides on — method, accuracy and interval, vs zero-shot with its p,
    bytes, client time — whole in a 100-column terminal (the full table cut the p-values to
    "-2.5 (p=0.…"); the rest is in `fedsteer show --all`."""
    zero = _scored("zero-shot", [1] * 50 + [0] * 50)
    rivals = [_scored(name, [1] * 50 + [1] * 15 + [0] * 35)
              for name in ("central-icl", "fedavg-lora", "ifed-icl")]
    clients = _scored("local-icl", [1] * 60 + [0] * 40)
    clients["per_row"] = {"correct_fraction": [0.5] * 100}
    clients["metrics"].update(accuracy_std=0.05, per_client=[{"accuracy": a}
                                                              for a in (0.5, 0.6, 0.7)])
    for rec in (zero, *rivals, clients):
        rec["costs"].update(bytes_up=43_700_000, bytes_down=1_000_000, client_seconds=1234.5)
    console = Console(width=100, record=True)
    console.print(comparison_table([zero, *rivals, clients]))
    lines = console.export_text().splitlines()
    assert max(map(len, lines)) <= 100
    text = "\n".join(lines)
    assert "+15.0 (p=6.1e-05) *" in text and "fedavg-lora" in text and "…" not in text
    assert "44.7 MB" in text and "1234.5" in text and "macro-F1" not in text


def test_the_comparison_plot_gains_a_panel_when_every_round_was_evaluated(tmp_path):
    import matplotlib.pyplot as plt

    from fedsteer.eval.costs import round_accuracy
    from fedsteer.eval.plots import plot_comparison

    def record(method: str, curve: list) -> dict:
        return {"method": method, "metrics": {"accuracy": 0.8},
                "costs": {"bytes_up_per_round": 100,
                          "rounds": [{"round": i, "accuracy": a} for i, a in enumerate(curve)]}}

    plain = [record("zero-shot", []), record("ifed-icl", [0.7, None])]  # not every round
    assert round_accuracy(plain[1]["costs"]) == []
    narrow = plt.imread(plot_comparison(plain, tmp_path / "a.png")).shape[1]
    curves = [record("zero-shot", []), record("ifed-icl", [0.7, 0.75, 0.8])]
    assert round_accuracy(curves[1]["costs"]) == [0.7, 0.75, 0.8]
    wide = plt.imread(plot_comparison(curves, tmp_path / "b.png")).shape[1]
    assert wide > 1.4 * narrow


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="Linux only")
def test_peak_memory_restarts_per_run_so_a_bench_s_cells_report_their_own():
    ballast = bytearray(300 * 2**20)
    ballast[::4096] = b"x" * len(ballast[::4096])  # touch every page: resident
    with_ballast = peak_rss_bytes()
    del ballast
    assert reset_peak_rss()
    assert peak_rss_bytes() < with_ballast - 200 * 2**20


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="Linux only")
def test_a_child_process_reports_its_own_peak_not_its_parent_s():
    """Linux's ru_maxrss survives fork + exec: a scale point started from a bench that had
    loaded a 4 GB model reported 4 GB whatever it used. VmHWM is the child's own."""
    ballast = bytearray(600 * 2**20)
    ballast[::4096] = b"x" * len(ballast[::4096])
    parent = peak_rss_bytes()
    child = subprocess.run(
        [sys.executable, "-c",
         "from fedsteer.eval.costs import peak_rss_bytes; print(peak_rss_bytes())"],
        capture_output=True, text=True, check=True).stdout
    del ballast
    assert int(child) < parent - 500 * 2**20


def test_wilson_interval_matches_the_closed_form():
    from math import sqrt

    from fedsteer.eval.metrics import wilson_interval

    k, n, z = 81, 100, 1.959963984540054
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    low, high = wilson_interval(k, n)
    assert abs(low - (centre - half)) < 1e-9 and abs(high - (centre + half)) < 1e-9


def _record(method, accuracy, up, seconds, n=100, per_client=None):
    metrics = {"accuracy": accuracy, "macro_f1": accuracy, "num_test": n}
    if per_client:
        metrics["per_client"] = per_client
    return {"method": method, "metrics": metrics,
            "costs": {"bytes_up": up, "bytes_down": up, "client_seconds": seconds}}


def test_takeaways_name_the_best_with_its_interval_and_the_cost_ranges():
    from fedsteer.eval.report import takeaways

    lines = takeaways([_record("zero-shot", 0.78, 0, 0.0), _record("ifed-icl", 0.83, 1000, 40.0),
                       _record("fedavg-lora", 0.80, 5_000_000, 120.0)])
    assert len(lines) == 3
    assert lines[0].startswith("Most accurate: ifed-icl at 83.0 % (95 % interval 74–89 on 100")
    assert "vs zero-shot 78.0 %" in lines[0]
    assert lines[0].endswith("; 2 of the other 2 fall inside that interval.")
    assert "2.0 KB (ifed-icl)" in lines[1] and "10.0 MB (fedavg-lora)" in lines[1]
    assert "0 s (zero-shot)" in lines[2] and "120 s (fedavg-lora)" in lines[2]


def test_a_per_client_mean_gets_no_single_run_interval():
    from fedsteer.eval.report import takeaways

    (line, *_) = takeaways([_record("local-icl", 0.8, 10, 1.0, per_client=[{}, {}])])
    assert "mean of 2 clients, each on 100 rows" in line and "95 % interval" not in line


def test_mcnemar_exact_counts_only_the_rows_the_methods_disagree_on():
    from scipy.stats import binomtest

    from fedsteer.eval.metrics import mcnemar_exact

    a = [1] * 50 + [1] * 12 + [0] * 3 + [0] * 35
    b = [1] * 50 + [0] * 12 + [1] * 3 + [0] * 35
    only_a, only_b, p = mcnemar_exact(a, b)
    assert (only_a, only_b) == (12, 3)
    assert p == pytest.approx(binomtest(12, 15, 0.5).pvalue) and p < 0.05
    assert mcnemar_exact([1, 0], [1, 0]) == (0, 0, 1.0)
    with pytest.raises(ValueError, match="paired test on 2 vs 3 rows"):
        mcnemar_exact([1, 0], [1, 0, 1])


def _scored(method, correct, model="m"):
    n = len(correct)
    return {"method": method, "model": model, "task": "sst2",
            "config": {"test_size": n, "test_seed": 0},
            "metrics": {"accuracy": sum(correct) / n, "macro_f1": 0.0, "num_test": n},
            "per_row": {"correct": correct},
            "costs": {"bytes_up_per_round": 0, "bytes_down_per_round": 0, "num_rounds": 1,
                      "client_seconds": 0.0, "peak_rss_bytes": 0}}


def test_takeaways_say_where_steering_beat_zero_shot_by_the_paired_test_and_where_not():
    """The closing lines of a grid: a gain counts only where the paired test on the same rows
    supports it; a loss the test supports is called worse; a record on another model is not
    paired at all (it used to say only who was most accurate, e.g. zero-shot on sst2)."""
    from fedsteer.eval.report import takeaways

    zero = _scored("zero-shot", [1] * 50 + [0] * 50)
    better = _scored("ifed-icl", [1] * 50 + [1] * 15 + [0] * 35)  # 15 rows gained, none lost
    noise = _scored("central-icl", [1] * 48 + [0] * 2 + [1] * 3 + [0] * 47)  # +1 row net
    worse = _scored("bdpl", [1] * 30 + [0] * 70)  # 20 rows lost
    other_model = _scored("fedpt", [1] * 100, model="emulator")
    better["costs"].update(bytes_up=3000, bytes_down=500, client_seconds=40.0)
    worse["costs"].update(bytes_up=10, bytes_down=0, client_seconds=2.0)
    for rec in (zero, noise, other_model):
        rec["costs"].update(bytes_up=0, bytes_down=0)
    lines = takeaways([zero, better, noise, worse, other_model])
    assert lines[0] == ("Steering helped (zero-shot's 50.0 % on the same 100 rows, paired test "
                        "p < 0.05): ifed-icl +15.0 (p=6.1e-05).")
    assert lines[1] == ("Did not help: central-icl +1.0 (p=1), bdpl -20.0 (p=1.9e-06, worse); "
                        "not paired (other model or rows): fedpt.")
    assert lines[2] == ("Cost, whole run: bytes from 10 B (bdpl) to 3.5 KB (ifed-icl); client "
                        "compute from 0 s (zero-shot) to 40 s (ifed-icl).")
    assert takeaways([zero, noise])[0].startswith("Steering helped nowhere: no method beat")


def test_the_table_marks_a_difference_from_zero_shot_only_where_the_paired_test_does():
    zero = _scored("zero-shot", [1] * 50 + [0] * 50)
    better = _scored("ifed-icl", [1] * 50 + [1] * 15 + [0] * 35)  # 15 rows gained, none lost
    noise = _scored("bdpl", [1] * 48 + [0] * 2 + [1] * 3 + [0] * 47)  # +1 row net
    other_model = _scored("central-icl", [1] * 100, model="other")  # no zero-shot to pair
    from fedsteer.eval.report import versus_zero_shot

    assert versus_zero_shot([zero, better, noise, other_model]) == [
        "—", "+15.0 (p=6.1e-05) *", "+1.0 (p=1)", "—"]
    console = Console(width=200, record=True)
    console.print(comparison_table([zero, better]))
    text = console.export_text()
    assert "65.0 (55–74)" in text and "+15.0 (p=6.1e-05) *" in text


def test_clients_evaluating_on_their_own_are_paired_by_the_share_of_them_right():
    """Local ICL and AsynDBT score each row as the share of their clients right: paired
    with zero-shot by Wilcoxon on those shares (was left unpaired, "—")."""
    from fedsteer.eval.report import versus_zero_shot

    zero = _scored("zero-shot", [1] * 50 + [0] * 50)
    local = _scored("local-icl", [0] * 100)
    local["per_row"] = {"correct_fraction": [1.0] * 50 + [2 / 3] * 40 + [0.0] * 10}
    local["metrics"]["accuracy"] = (50 + 40 * 2 / 3) / 100
    flat = _scored("asyndbt", [0] * 100)
    flat["per_row"] = {"correct_fraction": [1.0] * 50 + [0.0] * 50}
    flat["metrics"]["accuracy"] = 0.5
    marks = versus_zero_shot([zero, local, flat])
    assert marks[1].startswith("+26.7 (p=") and marks[1].endswith(", W) *")
    assert marks[2] == "+0.0 (p=1, W)"


def test_every_result_records_its_interval_and_rows(tmp_path, tiny_lm):
    from fedsteer.eval.metrics import wilson_interval
    from fedsteer.experiment import RunConfig, run_experiment

    record = run_experiment(RunConfig(method="zero-shot", model="tiny-random", test_size=30),
                            tmp_path, lm=tiny_lm)
    m = record["metrics"]
    assert len(record["per_row"]["correct"]) == 30 and "correct" not in m
    assert sum(record["per_row"]["correct"]) == round(m["accuracy"] * 30)
    assert m["accuracy_ci95"] == list(wilson_interval(round(m["accuracy"] * 30), 30))


def test_clients_scored_on_the_same_rows_keep_a_per_row_share_for_paired_tests():
    """Personalised evaluation (AsynDBT) averages workers; the per-row share of workers right
    is what lets two such records be compared on the same rows (issue 16)."""
    from fedsteer.eval.metrics import paired_fraction_test, summarize_clients

    clients = [{"cid": 0, "accuracy": 0.5, "macro_f1": 0.5, "correct": [1, 0, 1, 0]},
               {"cid": 1, "accuracy": 0.75, "macro_f1": 0.7, "correct": [1, 1, 1, 0]}]
    out = summarize_clients(clients)
    assert out["correct_fraction"] == [1.0, 0.5, 1.0, 0.0]
    assert all("correct" not in c for c in out["per_client"])
    better = [1.0] * 30
    worse = [0.0] * 25 + [1.0] * 5
    diff, p = paired_fraction_test(better, worse)
    assert diff > 0.8 and p < 1e-4
    assert paired_fraction_test(better, better) == (0.0, 1.0)


def test_show_prints_the_decision_columns_and_every_column_with_all(tmp_path):
    import json

    from typer.testing import CliRunner

    from fedsteer.cli import app

    record = _scored("zero-shot", [1] * 50 + [0] * 50)
    record["costs"].update(bytes_up=0, bytes_down=0, eval_seconds=1.0)
    record["env"] = {}
    (tmp_path / "zero-shot").mkdir()
    (tmp_path / "zero-shot" / "result.json").write_text(json.dumps(record))
    short = CliRunner().invoke(app, ["show", str(tmp_path)], env={"COLUMNS": "100"})
    full = CliRunner().invoke(app, ["show", str(tmp_path), "--all"], env={"COLUMNS": "200"})
    assert short.exit_code == 0 and full.exit_code == 0, short.output + full.output
    assert "bytes, run" in short.output and "macro-F1" not in short.output
    assert "macro-F1" in full.output and "peak mem" in full.output


def test_a_grid_s_labelled_rows_fit_100_columns_with_a_long_model_name():
    """`make demo`'s table: FedPT's row on an emulator model, labelled with it by the grid,
    got a second model column and every number cut ("76.2 (66…", "+35.0 (p=0.…")."""
    zero = _scored("zero-shot", [1] * 50 + [0] * 50, model="qwen2.5-coder-0.5b")
    better = _scored("fedavg-lora", [1] * 50 + [1] * 15 + [0] * 35, model="qwen2.5-coder-0.5b")
    emulated = _scored("fedpt", [1] * 40 + [0] * 60, model="emulator:12:qwen2.5-coder-0.5b")
    for rec in (zero, better, emulated):
        rec["costs"].update(bytes_up=43_700_000, bytes_down=0, client_seconds=103.2)
    console = Console(width=100, record=True)
    console.print(comparison_table(
        [zero, better, emulated],
        label=lambda r: r["method"] + ("" if r["model"] == zero["model"] else f" · {r['model']}")))
    text = console.export_text()
    assert max(map(len, text.splitlines())) <= 100
    assert "…" not in text and "+15.0 (p=6.1e-05) *" in text and "65.0 (55–74)" in text
