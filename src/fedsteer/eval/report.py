"""The table every run ends with: accuracy next to what it cost."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from rich.table import Table


def human_bytes(n: float) -> str:
    """Decimal units (1 KB = 1000 B), as the papers quote payload sizes."""
    if abs(n) < 1000:
        return f"{n:.0f} B"
    for unit in ("KB", "MB", "GB"):
        n /= 1000
        if abs(n) < 1000 or unit == "GB":
            break
    return f"{n:.1f} {unit}"


def _with_spread(metrics: dict[str, Any], key: str) -> str:
    value = f"{100 * metrics[key]:.1f}"
    if f"{key}_std" in metrics:
        value += f" ± {100 * metrics[f'{key}_std']:.1f}"
    return value


def with_interval(metrics: dict[str, Any]) -> str:
    """"81.0 (72–88)": the accuracy and its 95 % interval (older records: computed here)."""
    from fedsteer.eval.metrics import recorded_interval

    value = _with_spread(metrics, "accuracy")  # ± the clients' spread where they scored alone
    interval = recorded_interval(metrics)
    if interval is None:
        return value
    return f"{value} ({100 * interval[0]:.0f}–{100 * interval[1]:.0f})"


def same_rows(record: dict[str, Any]) -> tuple:
    """Records with the same key were scored on the same test rows by the same model."""
    config = record.get("config", {})
    return (record.get("model"), record.get("task"), config.get("test_size"),
            config.get("test_seed", 0))


def row_scores(record: dict[str, Any]) -> tuple[list[float], bool] | None:
    """A record's score on each test row and whether it is 0/1 (one evaluation) rather than a
    share of clients right (clients that evaluated on their own); None if it kept no rows."""
    rows = record.get("per_row") or {}
    if rows.get("correct"):
        return [float(x) for x in rows["correct"]], True
    if rows.get("correct_fraction"):
        return [float(x) for x in rows["correct_fraction"]], False
    return None


def paired_difference(record: dict[str, Any], base: dict[str, Any]) -> tuple[float, float, str]:
    """`record` minus `base` on the same rows: (accuracy points, two-sided p, test) — exact
    McNemar where both score rows 0/1, else Wilcoxon signed-rank ("W") on the rows' scores."""
    from fedsteer.eval.metrics import mcnemar_exact, paired_fraction_test

    mine, theirs = row_scores(record), row_scores(base)
    if mine is None or theirs is None:
        raise ValueError(f"{record['method']} vs {base['method']}: a record kept no rows")
    delta = 100 * (record["metrics"]["accuracy"] - base["metrics"]["accuracy"])
    if mine[1] and theirs[1]:
        return delta, mcnemar_exact(mine[0], theirs[0])[2], "McNemar"
    return delta, paired_fraction_test(mine[0], theirs[0])[1], "W"


def versus_zero_shot(records: Sequence[dict[str, Any]]) -> list[str]:
    """Per record: its accuracy minus zero-shot's on the same rows, with a paired test's p
    ("*" where p < 0.05): exact McNemar on rows right or wrong, or — where clients evaluated
    on their own (local ICL, AsynDBT) and a row's score is the share of them right — the
    Wilcoxon signed-rank test (marked W). "—" where there is nothing to pair."""
    zero = {same_rows(r): r for r in records
            if r["method"] == "zero-shot" and (r.get("per_row") or {}).get("correct")}
    out = []
    for rec in records:
        base = zero.get(same_rows(rec))
        if rec["method"] == "zero-shot" or base is None or row_scores(rec) is None:
            out.append("—")
            continue
        delta, p, test = paired_difference(rec, base)
        mark = ", W" if test == "W" else ""
        out.append(f"{delta:+.1f} (p={p:.2g}{mark}){' *' if p < 0.05 else ''}")
    return out


def comparison_table(records: Sequence[dict[str, Any]], title: str = "",
                     label: Callable[[dict[str, Any]], str] | None = None,
                     full: bool = False) -> Table:
    """One row per result record. By default what a person decides on, in 100 columns:
    accuracy and its interval, the paired difference from zero-shot, bytes over the whole
    run, client compute. `full`: also macro-F1, bytes per round (and per phase), rounds,
    waiting, evaluation time, peak memory and rejected replies (`fedsteer show --all`).

    `label(record)` names a row (default: the method), e.g. to tell seeds apart; a caller
    that labels its rows names what varies in them itself (`bench` adds the model where it
    differs), so the table adds no task/model columns of its own. Names wrap rather than
    squeeze the numbers: in a narrow terminal a p-value is never cut.
    """
    warnings = sorted({w for rec in records for w in rec.get("warnings") or ()})
    table = Table(title=title or None,
                  caption="\n".join(f"warning: {w}" for w in warnings) or None)
    table.add_column("method", overflow="fold")
    mixed = mixed_fields(records) if label is None else []
    for name in mixed:
        table.add_column(name, overflow="fold")
    columns = _columns(records, full)
    for name, _ in columns:
        table.add_column(name, justify="right", no_wrap=True)
    for rec, versus in zip(records, versus_zero_shot(records), strict=True):
        table.add_row(label(rec) if label else rec["method"],
                      *(str(rec.get(name)) for name in mixed),
                      *(cell(rec, versus) for _, cell in columns))
    return table


Cell = Callable[[dict[str, Any], str], str]


def whole_costs(record: dict[str, Any]) -> dict[str, Any]:
    """A record's costs, with a stacked run's totals over its whole pipeline (every stage it
    was trained on top of, `pipeline_costs`) in place of its last stage's own."""
    return {**record["costs"], **(record.get("pipeline_costs") or {})}


def _compute(rec: dict[str, Any]) -> str:
    costs = whole_costs(rec)
    return f"{costs.get('client_compute_seconds', costs['client_seconds']):.1f}"


def _columns(records: Sequence[dict[str, Any]], full: bool) -> list[tuple[str, Cell]]:
    """Each column's header and cell: by default the columns a person decides on (the rest
    is in `fedsteer show --all` and the report); optional ones only where a record has them."""
    private = any(rec.get("privacy") for rec in records)
    epsilon: list[tuple[str, Cell]] = (
        [("ε (δ)", lambda rec, _: _epsilon(rec.get("privacy")))] if private else [])
    head: list[tuple[str, Cell]] = [
        ("acc % (95 % CI)", lambda rec, _: with_interval(rec["metrics"])),
        ("vs zero-shot", lambda _, versus: versus)]
    if not full:
        return [*head, ("bytes, run", lambda rec, _: human_bytes(run_bytes(whole_costs(rec)))),
                ("client s", lambda rec, _: _compute(rec)), *epsilon]
    phased = any(rec["costs"].get("phases") for rec in records)
    waited = any(rec["costs"].get("client_wait_seconds") for rec in records)
    return [
        *head,
        ("macro-F1 %", lambda rec, _: _with_spread(rec["metrics"], "macro_f1")),
        ("up/round", lambda rec, _: human_bytes(rec["costs"]["bytes_up_per_round"])),
        ("down/round", lambda rec, _: human_bytes(rec["costs"]["bytes_down_per_round"])),
        *([("up/round by phase", lambda rec, _: by_phase(rec["costs"]))] if phased else []),
        ("rounds", lambda rec, _: str(rec["costs"]["num_rounds"])),
        ("client s", lambda rec, _: _compute(rec)),
        *([("wait s", lambda rec, _: f"{rec['costs'].get('client_wait_seconds', 0.0):.1f}")]
          if waited else []),
        ("eval s", lambda rec, _: f"{rec['costs'].get('eval_seconds', 0.0):.1f}"),
        ("peak mem", lambda rec, _: human_bytes(rec["costs"]["peak_rss_bytes"])),
        ("rejected", lambda rec, _: str(rejected_replies(rec["costs"]))),
        *epsilon,
    ]


def run_bytes(costs: dict[str, Any]) -> float:
    """Bytes up and down over the whole run, all clients (older records: per round × rounds)."""
    if "bytes_up" in costs:
        return costs["bytes_up"] + costs.get("bytes_down", 0)
    return ((costs.get("bytes_up_per_round", 0) + costs.get("bytes_down_per_round", 0))
            * costs.get("num_rounds", 1))


#: what makes two rows incomparable when they differ: each gets a column, and a warning
CONTEXT_FIELDS = ("task", "model")


def mixed_fields(records: Sequence[dict[str, Any]]) -> list[str]:
    """The context fields on which the records differ (a folder reused by another run)."""
    return [name for name in CONTEXT_FIELDS if len({rec.get(name) for rec in records}) > 1]


def mixed_rows(records: Sequence[dict[str, Any]]) -> list[str]:
    """One line per context field the rows differ on: their accuracies do not compare."""
    return [f"these rows come from {len(values)} {name}s ({', '.join(values)}): their "
            "accuracies are not comparable"
            for name in mixed_fields(records)
            for values in [sorted({str(rec.get(name)) for rec in records})]]


def by_phase(costs: dict[str, Any]) -> str:
    """"extract 1.7 MB · calibrate 6.0 KB": bytes up per round of each phase."""
    phases = costs.get("phases") or {}
    return " · ".join(f"{name} {human_bytes(p['bytes_up_per_round'])}"
                      for name, p in phases.items()) or "—"


def rejected_replies(costs: dict[str, Any]) -> int:
    """Replies (and aggregates) refused over the run; older records lack the total."""
    if "rejected" in costs:
        return int(costs["rejected"])
    return sum(len(r.get("rejected", [])) for r in costs.get("rounds", []))


def _epsilon(privacy: dict[str, Any] | None) -> str:
    """ε at δ of a DP run; "—" for a run without DP (no guarantee at all)."""
    if not privacy:
        return "—"
    return f"{privacy['epsilon']:.2f} ({privacy['delta']:.0e})"


def takeaways(records: Sequence[dict[str, Any]]) -> list[str]:
    """Three lines a person reads after a grid on one task: where steering beat zero-shot by
    a paired test on the same rows, where it did not, and what it cost. Without a zero-shot
    record that kept its rows there is nothing to pair with: then who is most accurate and
    how sure that is, and the cost in bytes and in client compute."""
    zero = {same_rows(r): r for r in records
            if r["method"] == "zero-shot" and (r.get("per_row") or {}).get("correct")}
    if not zero:
        return _unpaired_takeaways(records)
    helped, not_helped, unpaired = [], [], []
    for rec in records:
        base = zero.get(same_rows(rec))
        if rec["method"] == "zero-shot":
            continue
        if base is None or row_scores(rec) is None:
            unpaired.append(rec["method"])
            continue
        delta, p, test = paired_difference(rec, base)
        said = f"{rec['method']} {delta:+.1f} (p={p:.2g}{', W' if test == 'W' else ''}"
        if p < 0.05 and delta > 0:
            helped.append(said + ")")
        else:
            not_helped.append(said + (", worse)" if p < 0.05 else ")"))
    base = next(iter(zero.values()))
    versus = (f"zero-shot's {100 * base['metrics']['accuracy']:.1f} % on the same "
              f"{int(base['metrics']['num_test'])} rows, paired test p < 0.05")
    first = (f"Steering helped ({versus}): {', '.join(helped)}." if helped
             else f"Steering helped nowhere: no method beat {versus}.")
    second = "Did not help: " + (", ".join(not_helped) or "none")
    if unpaired:
        second += f"; not paired (other model or rows): {', '.join(unpaired)}"
    return [first, second + ".", _cost_line(records)]


def _cost_line(records: Sequence[dict[str, Any]]) -> str:
    """The range of bytes moved (whole run) and of client compute over the records."""
    total = {id(r): run_bytes(whole_costs(r)) for r in records}
    moved = sorted((r for r in records if total[id(r)] > 0), key=lambda r: total[id(r)])
    compute = sorted(records, key=_client_compute)
    parts = []
    if moved:
        parts.append(f"bytes from {human_bytes(total[id(moved[0])])} ({moved[0]['method']}) "
                     f"to {human_bytes(total[id(moved[-1])])} ({moved[-1]['method']})")
    parts.append(f"client compute from {_client_compute(compute[0]):.0f} s "
                 f"({compute[0]['method']}) to {_client_compute(compute[-1]):.0f} s "
                 f"({compute[-1]['method']})")
    return "Cost, whole run: " + "; ".join(parts) + "."


def _client_compute(record: dict[str, Any]) -> float:
    costs = whole_costs(record)
    return costs.get("client_compute_seconds", costs["client_seconds"])


def _unpaired_takeaways(records: Sequence[dict[str, Any]]) -> list[str]:
    """Who is most accurate and how sure that is, what the accuracy cost in bytes, and what it
    cost in client compute (records with no zero-shot rows to pair with)."""
    from fedsteer.eval.metrics import recorded_interval

    if not records:
        return []
    best = max(records, key=lambda r: r["metrics"]["accuracy"])
    m = best["metrics"]
    n = int(m["num_test"])
    zero = [r for r in records if r["method"] == "zero-shot" and r is not best]
    versus = f" vs zero-shot {100 * zero[0]['metrics']['accuracy']:.1f} %" if zero else ""
    if "per_client" in m:
        sure = f"the mean of {len(m['per_client'])} clients, each on {n} rows"
        inside = ""
    else:
        low, high = recorded_interval(m)
        sure = f"95 % interval {100 * low:.0f}–{100 * high:.0f} on {n} rows"
        others = [r for r in records if r is not best]
        within = sum(low <= r["metrics"]["accuracy"] <= high for r in others)
        inside = f"; {within} of the other {len(others)} fall inside that interval"
    lines = [f"Most accurate: {best['method']} at {100 * m['accuracy']:.1f} % ({sure})"
             f"{versus}{inside}."]
    total = {id(r): run_bytes(whole_costs(r)) for r in records}
    moved = [r for r in records if total[id(r)] > 0]
    if moved:
        low_b, high_b = (min(moved, key=lambda r: total[id(r)]),
                         max(moved, key=lambda r: total[id(r)]))
        lines.append(f"Bytes moved: from {human_bytes(total[id(low_b)])} ({low_b['method']}) "
                     f"to {human_bytes(total[id(high_b)])} ({high_b['method']}), whole run.")
    seconds = _client_compute
    compute = sorted(records, key=seconds)
    lines.append(f"Client compute: from {seconds(compute[0]):.0f} s ({compute[0]['method']}) "
                 f"to {seconds(compute[-1]):.0f} s ({compute[-1]['method']}).")
    return lines
