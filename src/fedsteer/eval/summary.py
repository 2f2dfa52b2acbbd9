"""`fedsteer report DIR`: every result.json under DIR as tables and plots a person can read.

Rows are (model, task, method, skew, clients) with mean ± std over seeds. Plots: accuracy
vs total bytes (log scale, the Pareto front drawn), accuracy vs client compute, accuracy
per round (cells run with `eval_every`), training loss per round and accuracy vs α.
"""

from __future__ import annotations

import html
import statistics
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from fedsteer.eval.costs import round_accuracy  # noqa: E402
from fedsteer.eval.metrics import mean_interval, recorded_interval  # noqa: E402
from fedsteer.eval.papers import paper_rows  # noqa: E402
from fedsteer.eval.record import RESULT_FILE, read_result  # noqa: E402
from fedsteer.eval.report import human_bytes, versus_zero_shot, whole_costs  # noqa: E402


@dataclass
class Row:
    model: str
    task: str
    method: str
    skew: str
    clients: int
    seeds: int
    accuracy: float
    accuracy_std: float
    macro_f1: float
    bytes_up_round: float
    bytes_down_round: float
    bytes_total: float
    client_seconds: float
    peak_rss: float
    api_calls: float | None
    train_loss: list[float]
    round_accuracy: list[float]  # after each round, when the runs evaluated every round
    ci95: tuple[float, float] | None = None  # Wilson for one run, t over seeds for several
    versus_zero_shot: str = "—"  # Δ accuracy and the exact McNemar p, for one-seed rows


def collect(results_dir: Path) -> list[dict]:
    """Every result record under `results_dir` (cells of a bench grid, or any runs)."""
    return [read_result(p.parent) for p in sorted(Path(results_dir).rglob(RESULT_FILE))]


def _skew(config: dict) -> str:
    return "iid" if config.get("partition") == "iid" else f"α={config.get('alpha', 0.5):g}"


def summarize(records: Sequence[dict]) -> list[Row]:
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in records:
        config = r["config"]
        key = (r["model"], r["task"], r["method"], _skew(config), r["metrics"]["num_clients"])
        groups[key].append(r)
    versus = dict(zip(map(id, records), versus_zero_shot(records), strict=True))
    rows = []
    for (model, task, method, skew, clients), recs in sorted(groups.items()):
        acc = [r["metrics"]["accuracy"] for r in recs]
        ci95 = mean_interval(acc) if len(recs) > 1 else recorded_interval(recs[0]["metrics"])
        costs = [whole_costs(r) for r in recs]  # a stacked run: its whole pipeline's totals
        api = [r["metrics"].get("api_training_calls", r["metrics"].get("api_calls"))
               for r in recs]
        losses = [r["metrics"].get("train_loss") for r in recs if r["metrics"].get("train_loss")]
        curves = [curve for curve in map(round_accuracy, costs) if curve]
        rows.append(Row(
            model, task, method, skew, clients, len(recs),
            statistics.mean(acc), statistics.pstdev(acc),
            statistics.mean(r["metrics"]["macro_f1"] for r in recs),
            statistics.mean(c["bytes_up_per_round"] for c in costs),
            statistics.mean(c["bytes_down_per_round"] for c in costs),
            statistics.mean(c["bytes_up"] + c["bytes_down"] for c in costs),
            statistics.mean(c.get("client_compute_seconds", c["client_seconds"]) for c in costs),
            max(c["peak_rss_bytes"] for c in costs),
            statistics.mean(api) if all(a is not None for a in api) else None,
            [statistics.mean(x) for x in zip(*losses, strict=False)] if losses else [],
            [statistics.mean(x) for x in zip(*curves, strict=False)] if curves else [],
            ci95, versus[id(recs[0])] if len(recs) == 1 else "—",
        ))
    return rows


HEADER = ["model", "method", "skew", "clients", "seeds", "acc %", "95 % CI", "vs zero-shot",
          "macro-F1 %", "up/round", "down/round", "bytes total", "client s", "peak mem",
          "API calls"]


def _cells(r: Row) -> list[str]:
    interval = "—" if r.ci95 is None else f"{100 * r.ci95[0]:.1f}–{100 * r.ci95[1]:.1f}"
    return [r.model, r.method, r.skew, str(r.clients), str(r.seeds),
            f"{100 * r.accuracy:.1f} ± {100 * r.accuracy_std:.1f}", interval,
            r.versus_zero_shot, f"{100 * r.macro_f1:.1f}",
            human_bytes(r.bytes_up_round), human_bytes(r.bytes_down_round),
            human_bytes(r.bytes_total), f"{r.client_seconds:.0f}", human_bytes(r.peak_rss),
            "—" if r.api_calls is None else f"{r.api_calls:.0f}"]


def tables(rows: Sequence[Row]) -> dict[str, list[list[str]]]:
    by_task: dict[str, list[list[str]]] = defaultdict(list)
    for r in rows:
        by_task[r.task].append(_cells(r))
    return dict(by_task)


SUBTITLE = ("Mean ± std over seeds; the 95 % CI is Wilson's over the test rows for one "
            "run (for one run whose clients all scored those rows, local ICL and AsynDBT, "
            "widened by the t half-width over the clients), Student's t over seeds for "
            "several; \"vs zero-shot\" is "
            "the accuracy difference on the same rows with the exact McNemar p (* where "
            "p < 0.05; one-seed rows only). Bytes are payloads as Flower serializes them; "
            "client s is the summed compute of the clients.")
PAPERS_TITLE = "Published numbers (other models and setups — compare orderings, not values)"
PAPER_HEADER = ("paper", "model", "task", "method", "acc %")


def sections(rows: Sequence[Row]) -> list[tuple[str, Sequence[str], list[list[str]]]]:
    """(title, header, body) of every table a report shows: one per task, then the papers'
    published numbers in a block of their own."""
    out = [(task, HEADER, body) for task, body in tables(rows).items()]
    published = paper_rows({r.task for r in rows})
    if published:
        out.append((PAPERS_TITLE, PAPER_HEADER, [
            [p["paper"], p["model"], p["task"], p["method"], f"{p['accuracy']:.1f}"]
            for p in published]))
    return out


def markdown(rows: Sequence[Row], plots: Sequence[Path], title: str) -> str:
    lines = [f"# {title}", "", SUBTITLE, ""]
    for heading, header, body in sections(rows):
        lines += [f"## {heading}", "", "| " + " | ".join(header) + " |",
                  "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(cells) + " |" for cells in body]
        lines.append("")
    lines += [f"![{p.stem}]({p.name})" for p in plots]
    return "\n".join(lines) + "\n"


def html_page(rows: Sequence[Row], plots: Sequence[Path], title: str) -> str:
    parts = [f"<html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             "<style>body{font-family:sans-serif}td,th{padding:2px 8px;text-align:right}"
             "td:first-child,th:first-child{text-align:left}</style></head><body>",
             f"<h1>{html.escape(title)}</h1><p>{html.escape(SUBTITLE)}</p>"]
    for heading, header, body in sections(rows):
        parts.append(f"<h2>{html.escape(heading)}</h2><table><tr>"
                     + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>")
        parts += ["<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>"
                  for cells in body]
        parts.append("</table>")
    parts += [f"<p><img src='{p.name}' width='720'></p>" for p in plots]
    return "\n".join(parts) + "</body></html>\n"


# ------------------------------------------------------------------ plots
def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of points no other point beats on both (fewer bytes, higher accuracy)."""
    front = []
    for i, (cost, acc) in enumerate(points):
        dominated = any(c <= cost and a >= acc and (c, a) != (cost, acc) for c, a in points)
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: points[i][0])


def plot_all(rows: Sequence[Row], out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for task in sorted({r.task for r in rows}):
        task_rows = [r for r in rows if r.task == task]
        paths.append(_plot_cost(task_rows, out_dir / f"{task}-accuracy-vs-bytes.png", task,
                                "bytes_total", "total bytes exchanged (log; none drawn at 1)",
                                pareto=True))
        paths.append(_plot_cost(task_rows, out_dir / f"{task}-accuracy-vs-compute.png", task,
                                "client_seconds", "client compute, s (log)"))
        if any(r.round_accuracy for r in task_rows):
            paths.append(_plot_rounds(task_rows, out_dir / f"{task}-accuracy-per-round.png",
                                      task))
        if any(r.train_loss for r in task_rows):
            paths.append(_plot_loss(task_rows, out_dir / f"{task}-loss-per-round.png", task))
        if lines := alpha_lines(task_rows):
            paths.append(_plot_alpha(lines, out_dir / f"{task}-accuracy-vs-alpha.png", task))
    return paths


MARKERS = "osD^v"  # ten colours per marker: up to fifty points stay distinguishable


def point_labels(rows: Sequence[Row]) -> list[str]:
    """Each row's method, plus only what tells it apart from the plot's other rows of that
    method (skew, client count, model): short labels that do not pile onto each other."""
    labels = []
    for r in rows:
        same = [o for o in rows if o.method == r.method]
        extra = [text for attribute, text in (("skew", r.skew), ("clients", f"{r.clients} cl."),
                                              ("model", r.model))
                 if len({getattr(o, attribute) for o in same}) > 1]
        labels.append(r.method + (f" ({', '.join(extra)})" if extra else ""))
    return labels


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _plot_cost(rows, path: Path, task: str, attribute: str, xlabel: str,
               pareto: bool = False) -> Path:
    labels = point_labels(rows)
    crowded = len(rows) > 10 or max(map(len, labels)) > 24  # a legend, not piled-up notes
    fig, ax = plt.subplots(figsize=(10 if crowded else 7, 4.5))
    points = [(max(getattr(r, attribute), 1.0), 100 * r.accuracy) for r in rows]
    for i, (r, label, (x, y)) in enumerate(zip(rows, labels, points, strict=True)):
        ax.errorbar(x, y, yerr=100 * r.accuracy_std, fmt=MARKERS[i // 10 % len(MARKERS)],
                    capsize=3, label=label if crowded else None)
        if not crowded:
            ax.annotate(label, (x, y), fontsize=7, xytext=(4, 4), textcoords="offset points")
    if pareto and points:
        front = pareto_front(points)
        ax.plot([points[i][0] for i in front], [points[i][1] for i in front], "--",
                color="grey", label="Pareto front")
    if crowded:
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=7)
    elif pareto and points:
        ax.legend(loc="best", fontsize=8)
    ax.margins(x=0.2, y=0.08)  # room for the rightmost point's label
    ax.set(xscale="log", xlabel=xlabel, ylabel="accuracy (%)", title=task)
    return _save(fig, path)


def _per_round_axes(ylabel: str, title: str):
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.set(xlabel="round", ylabel=ylabel, title=title)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    return fig, ax


def _plot_loss(rows, path: Path, task: str) -> Path:
    fig, ax = _per_round_axes("mean client training loss", f"{task}: loss per round")
    for r, label in zip(rows, point_labels(rows), strict=True):
        if r.train_loss:
            ax.plot(range(1, len(r.train_loss) + 1), r.train_loss, "o-", label=label)
    ax.legend(fontsize=7)
    return _save(fig, path)


def _plot_rounds(rows, path: Path, task: str) -> Path:
    """Accuracy after each round; methods without rounds as dotted lines at their level."""
    fig, ax = _per_round_axes("accuracy (%)", f"{task}: accuracy per round")
    longest = max(len(r.round_accuracy) for r in rows)
    for r, label in zip(rows, point_labels(rows), strict=True):
        if r.round_accuracy:
            xs = range(1, len(r.round_accuracy) + 1)
            ax.plot(xs, [100 * a for a in r.round_accuracy], "o-", label=label)
        else:
            ax.hlines(100 * r.accuracy, 1, max(longest, 2), linestyles=":", colors="grey")
            ax.annotate(r.method, (1, 100 * r.accuracy), fontsize=7, xytext=(2, 2),
                        textcoords="offset points", color="grey")
    ax.legend(fontsize=7)
    return _save(fig, path)


def skew_order(skew: str) -> float:
    """Strongest label skew first, IID last: α=0.1 < α=0.5 < α=1 < α=10 < iid."""
    return float("inf") if skew == "iid" else float(skew.removeprefix("α="))


def alpha_lines(rows: Sequence[Row]) -> dict[str, list[tuple[str, float]]]:
    """One line per (model, method, clients) measured at two skews or more: accuracy at each,
    strongest skew first. Keyed by model too, so two models' rows never overwrite each other;
    a single point says nothing about α and is left to the tables."""
    models = {r.model for r in rows}
    lines: dict[str, list[tuple[str, float]]] = defaultdict(list)
    for r in sorted(rows, key=lambda r: skew_order(r.skew)):
        name = f"{r.method}, {r.clients} cl." + (f" ({r.model})" if len(models) > 1 else "")
        lines[name].append((r.skew, 100 * r.accuracy))
    return {name: points for name, points in lines.items() if len(points) > 1}


def _plot_alpha(lines: dict[str, list[tuple[str, float]]], path: Path, task: str) -> Path:
    fig, ax = plt.subplots(figsize=(6, 4))
    order = sorted({skew for points in lines.values() for skew, _ in points}, key=skew_order)
    position = {skew: i for i, skew in enumerate(order)}
    for name, points in lines.items():
        ax.plot([position[s] for s, _ in points], [a for _, a in points], "o-", label=name)
    ax.set_xticks(range(len(order)), order)
    ax.set(xlabel="label skew (Dirichlet α; iid = none)", ylabel="accuracy (%)",
           title=f"{task}: accuracy vs α")
    ax.legend(fontsize=7)
    return _save(fig, path)


def write_report(results_dir: Path, out_dir: Path | None = None,
                 title: str = "fedsteer report") -> tuple[Path, Path]:
    """report.md and report.html (with their PNGs) for everything under `results_dir`."""
    out_dir = Path(out_dir or results_dir)
    rows = summarize(collect(results_dir))
    if not rows:
        raise FileNotFoundError(f"no {RESULT_FILE} under {results_dir}")
    plots = plot_all(rows, out_dir)
    md, page = out_dir / "report.md", out_dir / "report.html"
    md.write_text(markdown(rows, plots, title))
    page.write_text(html_page(rows, plots, title))
    return md, page
