"""bench_fair.py's report: each path's compute, the curves over seeds, the two plots and the Markdown fragment.

Reads the summary :func:`bench_fair.summarise` builds; writes nothing but ``<out>/accuracy_vs_*.png`` (:func:`plot`)
and returns the fragment's text (:func:`fragment`).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import fair_compare as fc  # noqa: E402
from fair_arms import ARMS, ONE_FACTOR_ARMS, PRUNE_METHODS, channel_multiple  # noqa: E402


def passes(recs: list[dict], n_train: int) -> int:
    """Training sample-passes of ``recs`` (each record's schedule epochs × the training images)."""
    return sum(r["schedule"]["epochs"] * n_train for r in recs)


def compute(root: Path, args: argparse.Namespace) -> dict:
    """Each path's compute for one seed: training sample-passes and seconds, growth's search (its seed and stage
    trainings plus scoring) apart from the final trainings (retraining, fine-tuning, width multipliers)."""
    n_all = args.limit or 50_000
    n_train = n_all - round(n_all * args.val_fraction)
    out: dict = {"train_images": n_train}
    for arm in ARMS:
        g = root / f"grow-{arm}"
        recs = fc.records(g) if fc.done(g) else []
        if not recs:
            continue
        sec = [r.get("seconds", {}) for r in recs]
        out[f"grow-{arm}"] = {"train_sample_passes": passes(recs, n_train),
                              "scoring_sample_passes": (len(recs) - 1) * n_train,
                              "train_s": sum(x.get("train_s", 0) for x in sec),
                              "score_s": sum(x.get("score_s", 0) for x in sec),
                              "search_s": sum(sum(v for k, v in x.items() if k.endswith("_s")) for x in sec)}
        for sub in ("retrain", "finetune"):
            rs = fc.derived(g, sub)
            if rs:
                out[f"{sub}-{arm}"] = {"networks": len(rs), "train_sample_passes": passes(rs, n_train),
                                       "train_s": sum(r.get("seconds", {}).get("train_s", 0) for r in rs)}
    for d in sorted(root.glob("width*-x*")):
        rs = fc.records(d) if fc.done(d) else []
        if rs:
            out[d.name] = {"train_sample_passes": passes(rs, n_train),
                           "train_s": sum(r.get("seconds", {}).get("train_s", 0) for r in rs)}
    return out


def curves(result: dict, key: str = "macs") -> dict:
    """Each arm's curve averaged over seeds (test top-1 and ``key`` — MACs, or the measured ``latency_ms`` — per
    width multiplier or per grown stage), from the points that have ``key``: with ``latency_ms`` only the networks
    whose architecture was timed, a point averaged over the seeds where it was."""
    by: dict[str, dict] = {}

    def add(curve: str, index, r: dict) -> None:
        if r.get(key) is not None:
            by.setdefault(curve, {}).setdefault(index, []).append(r)

    for s in result["seeds"].values():
        for r in s["width"]:
            add("width multipliers", r["width_mult"], r)
        for arm in ARMS:
            for r in s.get(arm, {}).get("retrained", []):
                add(f"{arm} stages, retrained", r["stage"], r)
        for method in PRUNE_METHODS:
            for kind in ("finetuned", "retrained"):
                for r in s.get(f"prune-{method}", {}).get(kind, []):
                    add(f"{method} pruning, {'fine-tuned' if kind == 'finetuned' else 'retrained'}", r["stage"], r)
        if "finetuned" in s:
            f = s["finetuned"]
            add("flops last stage, fine-tuned", 0, f)
            for r in f["width_same_epochs"]:
                add(f"width multipliers, {f['epochs_in_all']} epochs", r["width_mult"], r)
    return {name: [fc.mean_point(pts, key) for _, pts in sorted(points.items())] for name, points in by.items()}


def plot(result: dict, out: Path) -> None:
    """``<out>/accuracy_vs_macs.png``: test top-1 against MACs, mean over seeds; bars: 2 SE, the larger of the
    spread between seeds and the test set's binomial noise. ``<out>/accuracy_vs_latency.png``: the same curves
    against the measured latency (ms, ``latency.json``), from the networks that have one; not written without."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.ticker import EngFormatter, FuncFormatter

    colours = {name: f"C{i % 10}" for i, name in enumerate(result["curves"])}  # one colour per curve in both
    if result["curves"]:
        _plot_curves(result, result["curves"], "macs", "MACs per image", EngFormatter(unit=""), colours,
                     out / "accuracy_vs_macs.png")
    if result.get("curves_latency"):
        ms = FuncFormatter(lambda x, _: f"{x:g}")
        _plot_curves(result, result["curves_latency"], "latency_ms",
                     "measured latency per image (ms; onnxruntime, 1 thread, batch 1)", ms, colours,
                     out / "accuracy_vs_latency.png")


def _plot_curves(result: dict, cs: dict, key: str, xlabel: str, formatter, colours: dict, path: Path) -> None:
    """One figure: each curve of ``cs`` (:func:`curves`) as test top-1 (%) against ``key`` on a log axis."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    fig, ax = plt.subplots(figsize=(7, 4.5))
    n_test = result["args"].get("test_limit") or 10_000
    for name, pts in cs.items():
        pts = sorted(pts, key=lambda p: p[key])  # latency is not monotone in width: draw along the axis
        xs = [p[key] for p in pts]
        ys = [100 * p["test_top1"] for p in pts]
        err = [100 * max(p["two_se_seeds"] or 0, 2 * common.accuracy_se(p["test_top1"], n_test)) for p in pts]
        ax.errorbar(xs, ys, yerr=err, marker="o", ms=4, capsize=3, label=name, color=colours.get(name),
                    linestyle="--" if name.startswith("width") else "-")
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(formatter)
    # minor ticks labelled at 2, 3 and 5 × a power of ten only (all of them overlap on a short decade)
    ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, pos: formatter(v, pos) if f"{v:.0e}"[0] in "235" else ""))
    ax.set_xlabel(xlabel)
    ax.set_ylabel("test top-1 (%)")
    counts = {p["n_seeds"] for pts in cs.values() for p in pts} or {0}
    seeds = (f"{min(counts)} seed(s)" if len(counts) == 1
             else f"{min(counts)}–{max(counts)} seeds per point")  # a point: the mean of the seeds that have it
    ax.set_title(f"CIFAR-10, {seeds}; retrained: from scratch on one schedule; bars: 2 SE")
    ax.title.set_fontsize(9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _command(args: argparse.Namespace) -> str:
    parts = []
    for k, v in vars(args).items():
        if k in ("fragment_only", "steps", "jobs") or v is None or v is False:
            continue
        parts.append(f"--{k.replace('_', '-')}" + ("" if v is True else f" {v}"))
    return "`python bench/bench_fair.py " + " ".join(parts) + "`"


def _images(limit: int | None, split: str) -> str:
    return f"all {split} images" if limit is None else f"the first {limit} {split} images"


def _latency_line(result: dict) -> str:
    """The fragment's line on the measured latency: where it comes from, and how many networks have one."""
    what = ("- at matched measured latency: onnxruntime, 1 thread, batch 1, the median of `--measure-passes` "
            "interleaved passes of `--measure-time` s (`--steps measure` on a quiet core, `latency.json`; a "
            "network's latency is its architecture's), over the networks that have one: each network against the "
            "best the other family reaches at the same latency or less (its validation front: the points no faster "
            "point beats on validation; latency is not monotone in width; \"the same\": closer than 2 SE of the "
            "difference of two networks' latencies, from the spread of their passes), test top-1 of that point")
    lat = result.get("latency")
    if not lat:
        return what + "; not measured yet"
    last = lat["sessions"][-1] if lat["sessions"] else {}
    load = (f", load average {last['load_before']:.2f} before, {last['load_after']:.2f} after"
            if last.get("load_before") is not None and last.get("load_after") is not None else "")
    same = f"latencies within {100 * lat.get('tolerance', 0):.1f} % count as the same"
    return (what + f"; {lat['networks']} architectures measured, {same}"
            + (f" ({lat['incomplete']} with passes missing, left out)" if lat["incomplete"] else "")
            + (f", last session {last['date']}{load}" if last else ""))


def _figure_links(result: dict, args: argparse.Namespace) -> str:
    """Links to both plots, relative to the fragment (``<out>.md`` beside the ``<out>`` folder)."""
    folder = Path(args.out).name
    return (f"[test top-1 vs MACs]({folder}/accuracy_vs_macs.png), "
            + (f"[test top-1 vs measured latency]({folder}/accuracy_vs_latency.png)" if result.get("curves_latency")
               else "test top-1 vs measured latency once `--steps measure` has run"))


def fragment(result: dict, args: argparse.Namespace) -> str:
    arms = ("flops (LP) and lut (LP, the latency table of "
            f"`{args.profile}`), every network in multiples of {channel_multiple(args)} channels"
            if args.claim4 else "flops (LP), vanilla (cost none), random (selection random, MACs budget), aligned "
            "(flops growing in multiples of 4 channels), authors "
            "(`--recipe authors`: √ΔMACs price, group budgets, at most doubling, their width ceilings, β ≥ 0.99), "
            f"lut (the latency table of `{args.profile}`, multiples of 4 channels, its budget the widest width "
            "multiplier's table latency)")
    scale = "full scale (issue 25)" if args.preset == "full" else "issue 12"
    lines = [f"## Fair protocol, {scale}: {'claim 4' if args.claim4 else 'claims 2 and 3'}", "",
             f"- command: {_command(args)}" + (" (steps flops,lut,width,retrain-flops,retrain-lut; then `--steps "
                                               "measure` on a quiet core)" if args.claim4 else ""),
             "- machines: every training one thread per process (the machine of each sitting is in the log's "
             "`machine:` lines; accuracy does not depend on it, wall times do)"
             + (f"; latencies measured on {', '.join(result['latency']['machines'])} (`latency.json`)"
                if result.get("latency", {}).get("machines") else ""),
             f"- rebuilt: {common.now()} on {common.machine_line(common.machine())}",
             f"- data: CIFAR-10 (`{args.data_dir}`), {_images(args.limit, 'training')}, of which "
             f"{args.val_fraction:g} carved out (seeded) as validation (where a setting is chosen — the authors' "
             f"recipe against the default — it is chosen on validation, never on test); "
             f"{_images(args.test_limit, 'test')}",
             f"- growth: seed {args.seed_epochs} epochs, {args.stages} stages × {args.epochs} epochs, growth ratio "
             f"0.5, post-split policy `{args.post_split}`; arms {arms}, sharing one trained seed"
             + ("" if args.claim4 else "; pruning: Torch-Pruning (network slimming, L1 filter norm) of a wide network "
                + (f"(width × {args.prune_width_mult:g})" if args.prune_width_mult else "(width by the library rule)")
                + " to each flops stage's MACs, fine-tuned and retrained"),
             f"- comparison schedule: every grown stage and every width multiplier trained from scratch for "
             f"{args.retrain_epochs} epochs (one cosine from lr 0.1, batch {args.batch_size})"
             + ("" if args.claim4 else "; the fine-tuned last flops stage against width multipliers trained from "
                "scratch for the same total epochs"),
             "- differences in points of test top-1 at matched "
             + ("measured latency (onnxruntime, 1 thread, interpolated on log10 ms)" if args.claim4
                else "MACs (interpolated on log10 MACs)")
             + f" (no extrapolation: a point up to {100 * fc.END_TOLERANCE:g} % beyond a curve's end is compared "
             "with the end point), mean over the seeds that have the point, ± 2 SE of the test-set noise, then ± 2 SE "
             "between seeds (2 sd / √seeds of the per-seed differences); \"beyond 2 SE\" uses the larger of the two",
             *([] if args.claim4 else [_latency_line(result)]),
             f"- figures: {_figure_links(result, args)}", ""]
    agg = result["aggregate"]
    if args.claim4:
        lines += ["### Verdict lines", "",
                  fc.verdict_line("claim 4, retrained lut − retrained flops (flops curve incl. the seed), matched "
                                  "latency", agg["claim4_lut_vs_flops"]),
                  fc.verdict_line("claim 4, retrained flops − retrained lut (lut curve incl. the seed), matched "
                                  "latency", agg["claim4_flops_vs_lut"]),
                  fc.verdict_line("retrained lut − width, matched latency", agg["claim4_lut_vs_width"]),
                  fc.verdict_line("retrained flops − width, matched latency", agg["claim4_flops_vs_width"]),
                  fc.verdict_line("retrained flops − width, matched MACs", agg["flops_retrained_vs_width"]),
                  fc.verdict_line("retrained lut − width, matched MACs", agg["lut_retrained_vs_width"]), ""]
        for seed, s in result["seeds"].items():
            if "claim4" not in s:
                continue
            rows = [["network", "test top-1 (%)", "MACs", "measured (ms), passes", "spread (max/min − 1)",
                     "latency: median (ms)", "lut predicted (ms)", "prediction error"]]
            for n in s["claim4"]["networks"]:
                ps = n["passes_ms"]
                m = statistics.median(ps)
                rows.append([n["name"], f"{100 * n['test_top1']:.2f}", common.fmt_num(n["macs"]),
                             ", ".join(f"{x:.4f}" for x in ps), f"{100 * (max(ps) / min(ps) - 1):.1f} %", f"{m:.4f}",
                             f"{n['lut_predicted_ms']:.4f}", f"{100 * (n['lut_predicted_ms'] / m - 1):+.1f} %"])
            lines += [f"Latency, seed {seed} (retrained networks; a grown stage has its retrained copy's latency):", "",
                      common.md_table(rows), ""]
    else:
        lines += ["### Verdict lines", "",
                  fc.verdict_line("claim 3, retrained grown (flops) − width", agg["flops_retrained_vs_width"]),
                  fc.verdict_line("claim 3, retrained random-selection − width", agg["random_retrained_vs_width"]),
                  fc.verdict_line("claim 3, retrained flops − retrained random (random arm's curve incl. the seed)",
                                  agg["flops_vs_random"]),
                  fc.verdict_line("claim 3, fine-tuned flops − width trained as many epochs",
                                  agg["finetuned_vs_width"]),
                  fc.verdict_line("claim 2, retrained flops − retrained vanilla (vanilla curve incl. the seed)",
                                  agg["flops_vs_vanilla"]),
                  fc.verdict_line("(diagnostic) retrained vanilla − width", agg["vanilla_retrained_vs_width"]),
                  fc.verdict_line("issue 26, on VALIDATION: retrained authors' recipe − retrained flops (flops curve "
                                  "incl. the seed)", agg["authors_vs_flops_val"]),
                  fc.verdict_line("issue 26, on VALIDATION: retrained flops − retrained authors' recipe",
                                  agg["flops_vs_authors_val"]),
                  fc.verdict_line("issue 26, on VALIDATION: retrained aligned − retrained flops (flops curve incl. the "
                                  "seed)", agg["aligned_vs_flops_val"]),
                  *(fc.verdict_line(f"issue 26, one factor, on VALIDATION: retrained {arm} ({what}) − retrained flops "
                                    "(flops curve incl. the seed)", agg[f"{arm}_vs_flops_val"])
                    for arm, (_, what) in ONE_FACTOR_ARMS.items() if agg[f"{arm}_vs_flops_val"]),
                  fc.verdict_line("issue 26, on VALIDATION: last flops stage, 30 final epochs from its grown weights − "
                                  "from a fresh initialisation (`--final-init grown` − `fresh`)",
                                  agg["final_init_val"]),
                  fc.verdict_line("retrained authors' recipe − width (test)", agg["authors_retrained_vs_width"]),
                  fc.verdict_line("retrained aligned (MACs price, multiples of 4 channels) − width",
                                  agg["aligned_retrained_vs_width"]),
                  fc.verdict_line("retrained authors' recipe − retrained flops (test; read once the choice is made)",
                                  agg["authors_vs_flops"]),
                  fc.verdict_line("retrained lut (table latency price, multiples of 4 channels, budget: the widest "
                                  "width's table latency) − width", agg["lut_retrained_vs_width"]),
                  *(fc.verdict_line(f"retrained flops − {m} pruning, {how}", agg[f"flops_vs_prune_{m}{suffix}"])
                    for m in PRUNE_METHODS for suffix, how in (("", "fine-tuned"), ("_retrained", "retrained"))),
                  fc.verdict_line("retrained grown (flops) − width, at matched measured latency",
                                  agg["latency_flops_vs_width"]),
                  fc.verdict_line("retrained authors' recipe − width (test), at matched measured latency",
                                  agg["latency_authors_vs_width"]),
                  fc.verdict_line("retrained aligned (MACs price, multiples of 4 channels) − width, at matched "
                                  "measured latency", agg["latency_aligned_vs_width"]),
                  fc.verdict_line("retrained lut − width, at matched measured latency", agg["latency_lut_vs_width"]),
                  *(fc.verdict_line(f"retrained flops − {m} pruning, {how}, at matched measured latency",
                                    agg[f"latency_flops_vs_prune_{m}{suffix}"])
                    for m in PRUNE_METHODS for suffix, how in (("", "fine-tuned"), ("_retrained", "retrained"))), ""]
    if args.grown_from:
        lines += _schedule_lines(result, args)
    lines += ["### Per seed", ""]
    for seed, s in result["seeds"].items():
        rows = []  # (network, its summary entry, whether to show its validation top-1)
        rows += [(f"width × {r['width_mult']:g} ({r['epochs']} ep.)", r, True) for r in s["width"]]
        for arm in ARMS:
            rows += [(f"{arm} grown, stage {r['stage']}", r, True) for r in s[arm]["grown"]]
            rows += [(f"{arm} stage {r['stage']} retrained ({args.retrain_epochs} ep.)", r, True)
                     for r in s[arm]["retrained"]]
        for method in PRUNE_METHODS:
            p = s.get(f"prune-{method}")
            if not p:
                continue
            rows += [(f"{method}: wide network × {r['width_mult']:g}", r, False) for r in p["wide"]]
            for kind in ("finetuned", "retrained"):
                rows += [(f"{method} pruned to stage {r['stage']}'s cost, {kind}", r, True) for r in p[kind]]
        if "finetuned" in s:
            f = s["finetuned"]
            rows.append((f"flops last stage fine-tuned ({f['epochs_in_all']} ep. in all)", f, True))
            rows += [(f"width × {r['width_mult']:g} ({f['epochs_in_all']} ep.)", r, True)
                     for r in f["width_same_epochs"]]
        timed = any(r.get("latency_ms") is not None for _, r, _ in rows)  # the column where a latency is known
        table = [["network", "test top-1 (%)", "val top-1 (%)", "MACs", *(["measured (ms)"] if timed else [])]]
        for name, r, val in rows:
            table.append([name, f"{100 * r['test_top1']:.2f}",
                          f"{100 * r['val_top1']:.2f}" if val and r.get("val_top1") is not None else "-",
                          common.fmt_num(r["macs"]),
                          *([f"{r['latency_ms']:.4f}" if r.get("latency_ms") is not None else "-"] if timed else [])])
        lines += [f"Seed {seed}:", "", common.md_table(table), ""]
    return "\n".join(lines) + "\n"


def _schedule_lines(result: dict, args: argparse.Namespace) -> list[str]:
    lines = [f"### The same networks under `{args.grown_from}`'s schedule", "",
             fc.verdict_line(f"retrained grown (flops) − width, there (same seeds; here: {args.retrain_epochs} epochs, "
                             "in the verdict lines above)", result["aggregate"]["schedule_flops_vs_width"]), ""]
    for seed, s in result["seeds"].items():
        if not s.get("schedule", {}).get("networks"):
            continue
        n = s["schedule"]["networks"][0]
        table = [["network", "MACs", f"test top-1, {n['epochs'][0]} ep. (%)", f"{n['epochs'][1]} ep. (%)",
                  "gain (points) ± 2 SE", f"val top-1, {n['epochs'][0]} ep. (%)", f"{n['epochs'][1]} ep. (%)"]]
        for n in s["schedule"]["networks"]:
            val = [f"{100 * v:.2f}" if v is not None else "-" for v in n["val_top1"]]
            table.append([n["name"], common.fmt_num(n["macs"]), *(f"{100 * v:.2f}" for v in n["test_top1"]),
                          f"{100 * n['gain']:+.2f} ± {100 * n['two_se']:.2f}", *val])
        lines += [f"Seed {seed}:", "", common.md_table(table), ""]
    return lines
