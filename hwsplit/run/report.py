"""Compare runs (grow runs and baselines) stage by stage: a markdown table and plots.

``write_report(["runs/flops", "runs/width"], "report/")`` writes

* ``table.md`` — one row per run and stage: test top-1, MACs, parameters, the cost in its unit and
  the measured end-to-end latency where the run measured it;
* ``accuracy_vs_macs.png`` — test accuracy against MACs (a log axis with SI ticks: 20k, 50k, 1M), one
  series per run, one marker per stage (the style of Wang et al. 2019, Figures 3–4);
* ``accuracy_vs_cost.png`` — when some run prices neurons in another unit than MACs (measured
  latency, energy, neurons): one panel per unit;
* ``widths.png`` — per-layer widths across stages (the stem first, as in the table's widths column),
  one panel per run on one shared width axis: where each method put its neurons.

Runs are read from their directories (``config.json`` and ``stages.jsonl``) only; the plots carry
their own titles, axis units and legends. A grow run's ``final/``, ``finetune/`` and ``retrain/``
directories (:mod:`hwsplit.run.finetune`) are added as series of their own, so grown, fine-tuned,
retrained and baseline networks share one chart; one whose source stages changed since it was made
(the grow run was replaced) is refused (:func:`hwsplit.run.rundir.check_source`). Fine-tuned records are
named by the grown stage they came from. Accuracies are drawn with ±2 standard errors,
√(p(1 − p)/n) over the n test images a record was scored on (records that do not say n: no bar).
A run whose summary says "running" while no process holds its lock is reported as interrupted.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hwsplit.infra.fsio import atomic_write, atomic_write_text
from hwsplit.infra.units import fmt_si
from hwsplit.run.config import read_config
from hwsplit.run.rundir import DERIVED, RunDir, check_source, mark_interrupted, record_widths, shown_stage

log = logging.getLogger(__name__)

_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "h", "<", ">")


@dataclass
class Run:
    """One run directory as the report sees it."""

    path: Path
    config: dict[str, Any]
    records: list[dict[str, Any]]
    name: str = ""
    status: str = ""

    @property
    def is_baseline(self) -> bool:
        return bool(self.config.get("baseline"))

    def description(self) -> str:
        """A short summary of the settings, e.g. ``grow: mobilenet_v1, cost flops, lp``."""
        c = self.config
        ft = c.get("finetune")
        if isinstance(ft, dict):
            what = "retrained from scratch" if ft.get("from_scratch") else "fine-tuned"
            stages = "pruned" if ft.get("source_baseline") == "prune" else "grown"
            return (f"{ft.get('kind', 'finetune')}: {stages} stages {what}, {ft.get('epochs')} epochs, "
                    f"{c.get('model')}, cost {c.get('cost')}")
        prune = c.get("prune")
        if isinstance(prune, dict):
            return (f"prune baseline: {prune.get('method')} from {c.get('model')} ×{prune.get('wide_width_mult'):g}, "
                    f"fine-tuned {prune.get('finetune_epochs')} epochs, cost {c.get('cost')}")
        if self.is_baseline:
            mults = ", ".join(f"{m:g}" for m in c.get("multipliers", []))
            return f"{c.get('baseline')} baseline: {c.get('model')} × {mults}"
        return f"grow: {c.get('model')}, cost {c.get('cost')}, {c.get('selection', 'lp')} selection"

    @property
    def label(self) -> str:
        return f"{self.name} ({self.description()})"

    def point_label(self, record: dict[str, Any]) -> str:
        """How a stage is named on plots: ``0``, ``1``, … for growth (a fine-tuning: its grown stage),
        ``×0.5`` for a width baseline, ``wide`` for a pruning baseline's wide network."""
        if "wide_width_mult" in record and "target_cost" not in record:
            return "wide"
        return f"×{record['width_mult']:g}" if "width_mult" in record else str(shown_stage(record))

    def epochs_in_all(self, record: dict[str, Any]) -> int | None:
        """Training epochs the record's network has had in all (a grow stage: seed epochs + stage × epochs)."""
        if "epochs_in_all" in record:
            return record["epochs_in_all"]
        if "epochs" in record:
            return record["epochs"]
        c = self.config
        if self.is_baseline or "finetune" in c or not isinstance(c.get("epochs"), int):
            return None
        return (c.get("seed_epochs") or c["epochs"]) + record["stage"] * c["epochs"]


def load_run(path: str | Path) -> Run:
    """Read a run directory; ``ValueError`` naming it when it is not one or has no completed stage."""
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"run: {path} is not a directory")
    config = read_config(path)
    records = RunDir(path).records()
    if not records:
        raise ValueError(f"run: {path} has no completed stage yet (stages.jsonl is empty or missing)")
    for i, r in enumerate(records):
        missing = [k for k in ("stage", "test_top1", "macs", "params", "cost") if k not in r]
        if missing:
            raise ValueError(f"run: {path}/stages.jsonl record {i} lacks {', '.join(missing)}")
    check_source(RunDir(path))
    return Run(path=path, config=config, records=records, status=mark_interrupted(RunDir(path)))


def expand_runs(paths: Sequence[str | Path]) -> list[Path]:
    """``paths`` with each grow run's ``final/``, ``finetune/``, ``retrain/`` (if they hold records) after it."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p not in out:
            out.append(p)
        for sub in DERIVED:
            d = p / sub
            if d.is_dir() and (d / "config.json").is_file() and RunDir(d).records() and d not in out:
                out.append(d)
    return out


def accuracy_se(top1: float, n: int | None) -> float | None:
    """Standard error of an accuracy ``top1`` (fraction) measured on ``n`` images, or None without ``n``."""
    if not n:
        return None
    return math.sqrt(max(top1 * (1 - top1), 0.0) / n)


def _name_runs(runs: list[Run]) -> None:
    """Name each run by its directory, adding parent directories until the names are distinct."""
    depth = 1
    while True:
        names = ["/".join(r.path.resolve().parts[-depth:]) for r in runs]
        if len(set(names)) == len(names) or depth > 8:
            break
        depth += 1
    for r, n in zip(runs, names):
        r.name = n




def _latency_ms(record: dict[str, Any]) -> float | None:
    lat = (record.get("measured") or {}).get("latency_ms")
    return float(lat["median"]) if isinstance(lat, dict) and "median" in lat else None


def comparison_rows(runs: Sequence[Run]) -> list[list[str]]:
    """Rows (header first): one per run and stage."""
    rows = [["run", "stage", "test top-1 (%)", "± 2 SE", "val top-1 (%)", "epochs in all", "MACs", "params", "cost",
             "measured latency (ms)"]]
    for run in runs:
        for r in run.records:
            stage = str(shown_stage(r)) + (f" (×{r['width_mult']:g})" if "width_mult" in r else "")
            lat = _latency_ms(r)
            se = accuracy_se(r["test_top1"], r.get("test_samples"))
            total = run.epochs_in_all(r)
            rows.append([run.name, stage, f"{100 * r['test_top1']:.2f}", f"{200 * se:.2f}" if se is not None else "-",
                         f"{100 * r['val_top1']:.2f}" if "val_top1" in r else "-",
                         str(total) if total is not None else "-", fmt_si(r["macs"]), fmt_si(r["params"]),
                         f"{r['cost']['value']:.4g} {r['cost']['unit']}", f"{lat:.4g}" if lat is not None else "-"])
    return rows


def _markdown(runs: Sequence[Run], rows: list[list[str]], plots: list[str]) -> str:
    lines = ["# hwsplit report", "", "Runs:", ""]
    for run in runs:
        c = run.config
        lines.append(f"- **{run.name}** — {run.description()}; dataset {c.get('dataset')}, seed {c.get('seed')}, "
                     f"{len(run.records)} stage(s) (`{run.path}`); status: {run.status}")
    lines += ["", "| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    lines += ["| " + " | ".join(r) + " |" for r in rows[1:]]
    lines += ["", "Test top-1 is measured on the run's test split; MACs count conv and linear multiply-accumulates "
              "per image; cost is each run's own cost model in its unit."]
    if plots:
        lines += [""] + [f"![{p}]({p})" for p in plots]
    return "\n".join(lines) + "\n"


def _save(fig: Any, path: Path) -> None:
    buffer = __import__("io").BytesIO()
    fig.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
    atomic_write(path, lambda f: f.write(buffer.getvalue()), binary=True)


def _accuracy_plot(ax: Any, runs: Sequence[Run], x_of: Any, *, annotate: bool = True, log_x: bool = False) -> None:
    """One series per run; each stage's label is placed once (a point several series share, e.g. the seed
    of runs that start alike, is labelled once) and alternately above and below its marker."""
    labelled: list[tuple[float, float, str]] = []
    for i, run in enumerate(runs):
        points = [(x_of(r), 100 * r["test_top1"], run.point_label(r)) for r in run.records]
        points = [p for p in points if p[0] is not None]
        if not points:
            continue
        xs, ys, names = zip(*points)
        (line,) = ax.plot(xs, ys, marker=_MARKERS[i % len(_MARKERS)], markersize=6, linewidth=1.4,
                          label=_wrap(run.label))
        bars = [(x_of(r), 100 * r["test_top1"], 200 * se) for r in run.records
                if x_of(r) is not None and (se := accuracy_se(r["test_top1"], r.get("test_samples"))) is not None]
        if bars:
            bx, by, be = zip(*bars)
            ax.errorbar(bx, by, yerr=be, fmt="none", ecolor=line.get_color(), elinewidth=1, capsize=3, alpha=0.7)
        if annotate:
            for j, (x, y, name) in enumerate(points):
                if any(_close(x, y, lx, ly, log_x) and lname == name for lx, ly, lname in labelled):
                    continue
                labelled.append((x, y, name))
                ax.annotate(name, (x, y), textcoords="offset points", xytext=(4, 6 if j % 2 == 0 else -12),
                            fontsize=7, color=line.get_color())
    if log_x:
        _si_log_axis(ax.xaxis)
    ax.grid(True, alpha=0.3, which="both")
    ax.set_ylabel("test top-1 accuracy (%)")


def _close(x: float, y: float, x2: float, y2: float, log_x: bool) -> bool:
    """Whether two points are within 2 % in x (relative; MACs are drawn on a log axis) and 0.3 points in y."""
    dx = abs(math.log10(x / x2)) if log_x and x > 0 and x2 > 0 else abs(x - x2) / max(abs(x), abs(x2), 1e-12)
    return dx < 0.01 and abs(y - y2) < 0.3


def _si_log_axis(axis: Any) -> None:
    """A log axis whose ticks are the values themselves in SI notation (20k, 50k, 1M), not exponents."""
    from matplotlib.ticker import FuncFormatter, LogLocator

    axis.axes.set_xscale("log") if axis is axis.axes.xaxis else axis.axes.set_yscale("log")
    fmt = FuncFormatter(lambda v, _pos: fmt_si(v) if v > 0 else "")
    low, high = axis.get_data_interval()
    narrow = low > 0 and high / low < 10  # within a decade: more ticks, so that there are several
    axis.set_major_locator(LogLocator(base=10, subs=(1.0, 1.5, 2.0, 3.0, 5.0, 7.0) if narrow else (1.0, 2.0, 5.0)))
    axis.set_major_formatter(fmt)
    axis.set_minor_formatter(FuncFormatter(lambda v, _pos: ""))


def _wrap(text: str, width: int = 70) -> str:
    import textwrap

    return "\n".join(textwrap.wrap(text, width)) or text


def _legend(ax: Any, n: int) -> None:
    """The legend below the axes (it never covers points or takes the plot's width), in two columns from 4 runs."""
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=1 if n < 4 else 2, frameon=False)


def write_report(run_paths: Sequence[str | Path], out: str | Path) -> dict[str, Any]:
    """Read the runs, write ``out``/table.md and the plots; returns ``{"rows", "files", "runs", "status"}``
    (``status``: each run's status by name, an interrupted run's with the command that continues it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not run_paths:
        raise ValueError("runs: give at least one run directory")
    runs = [load_run(p) for p in expand_runs(run_paths)]
    _name_runs(runs)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files: list[Path] = []
    datasets = sorted({str(r.config.get("dataset")) for r in runs})
    on = f" on {', '.join(datasets)}"

    # accuracy against MACs, on a log axis labelled in MACs
    fig, ax = plt.subplots(figsize=(8, 5.5))
    _accuracy_plot(ax, runs, lambda r: r["macs"] if r["macs"] > 0 else None, log_x=True)
    ax.set_xlabel("MACs (multiply-accumulates per image, log scale)")
    ax.set_title(f"Test accuracy against MACs{on}, ±2 SE\n(one marker per stage; labels: stage, grown stage "
                 "fine-tuned/retrained, or width multiplier)", fontsize=10)
    _legend(ax, len(runs))
    _save(fig, out / "accuracy_vs_macs.png")
    plt.close(fig)
    files.append(out / "accuracy_vs_macs.png")

    # accuracy against each other cost unit
    units = sorted({r["cost"]["unit"] for run in runs for r in run.records} - {"MACs"})
    if units:
        fig, axes = plt.subplots(1, len(units), figsize=(7 * len(units), 5.5), squeeze=False)
        for ax, unit in zip(axes[0], units):
            chosen = [run for run in runs if any(r["cost"]["unit"] == unit for r in run.records)]
            _accuracy_plot(ax, chosen, lambda r, u=unit: r["cost"]["value"] if r["cost"]["unit"] == u else None)
            names = sorted({r["cost"]["name"] for run in chosen for r in run.records if r["cost"]["unit"] == unit})
            ax.set_xlabel(f"cost ({unit}; cost model {', '.join(names)})")
            ax.set_title(f"Test accuracy against cost in {unit}{on}", fontsize=10)
            _legend(ax, len(chosen))
        _save(fig, out / "accuracy_vs_cost.png")
        plt.close(fig)
        files.append(out / "accuracy_vs_cost.png")

    # per-layer widths across stages: every panel on the same width axis (log when widths span > 30x)
    all_w = [w for run in runs for r in run.records for w in _layer_widths(r)[1]]
    log_y = bool(all_w) and min(all_w) > 0 and max(all_w) / min(all_w) > 30
    fig, axes = plt.subplots(len(runs), 1, figsize=(10, 3.8 * len(runs)), squeeze=False, sharey=True)
    for ax, run in zip(axes[:, 0], runs):
        cmap = plt.get_cmap("viridis")
        n = len(run.records)
        layers: list[str] = []
        for k, r in enumerate(run.records):
            names, widths = _layer_widths(r)
            layers = names if len(names) > len(layers) else layers
            ax.plot(range(len(widths)), widths, marker="o", markersize=4, linewidth=1.4,
                    color=cmap(k / max(1, n - 1)), label=("width " if "width_mult" in r else "stage ")
                    + run.point_label(r))
        ax.set_xticks(range(len(layers)))
        ax.set_xticklabels(layers, rotation=60, ha="right", fontsize=7)
        ax.set_xlabel("layer (in order from input to output)")
        ax.set_ylabel("width (output channels)")
        if log_y:
            _si_log_axis(ax.yaxis)
        ax.grid(True, alpha=0.3)
        ax.set_title(f"Per-layer widths: {run.label}", fontsize=9)
        ax.legend(fontsize=7, ncol=min(n, 6), loc="upper left", framealpha=0.8)
    fig.tight_layout()
    _save(fig, out / "widths.png")
    plt.close(fig)
    files.append(out / "widths.png")

    rows = comparison_rows(runs)
    atomic_write_text(out / "table.md", _markdown(runs, rows, [f.name for f in files]))
    files.insert(0, out / "table.md")
    log.info("report of %d run(s) written to %s", len(runs), out)
    return {"rows": rows, "files": [str(f) for f in files], "runs": [r.name for r in runs],
            "status": {r.name: r.status for r in runs}}


def _layer_widths(record: dict[str, Any]) -> tuple[list[str], list[int]]:
    """(short layer names, widths) of a record's splittable layers in graph order."""
    widths = record.get("widths")
    if isinstance(widths, dict) and isinstance(record.get("layers"), list):
        names = [n for n in record["layers"] if n in widths]
        return [_short(n) for n in names], [widths[n] for n in names]
    values = record_widths(record)
    return [f"block {i}" for i in range(len(values))], values


def _short(name: str) -> str:
    """``stem.conv`` → ``stem``, ``blocks.3.pw.conv`` → ``blocks.3.pw``; other module paths as they are."""
    return name[: -len(".conv")] if name.endswith(".conv") and len(name) > len(".conv") else name


__all__ = ["Run", "accuracy_se", "comparison_rows", "expand_runs", "load_run", "write_report"]
