"""Paper claim 4 (hardware cost): pricing neurons by their *measured* latency on the target device
(``cost="lut"``, this 2-core CPU's onnxruntime profile) grows networks with a better accuracy-for-latency
trade-off on it than pricing them by MACs (``cost="flops"``); both arms grow the same number of stages.

    python bench/bench_hardware_cost.py                     # reduced schedule, then measure
    python bench/bench_hardware_cost.py --measure-only      # re-measure the saved final networks (quiet box)
    python bench/bench_hardware_cost.py --channel-multiple auto --grow-only   # both arms in blocks (issue 11);
    python bench/bench_hardware_cost.py --measure-only --measure-threads 1    # ... then measure on a quiet core
    python bench/bench_hardware_cost.py --device cuda --limit 0 --seed-epochs E0 --epochs E --stages S

Both arms grow the paper's CIFAR-10 seed MobileNetV1 from the same trained seed (see bench/common.py),
growth ratio 0.5 of the arm's own cost per stage. Every stage's network is then measured end to end with
``cost_models.profiling.measure.measure_model(model, (1, 3, 32, 32), backend="onnxruntime", threads=1,
time_budget_s=2)``, in ``--rounds`` interleaved rounds (seed, lut, flops, seed, lut, flops, ...), the 1-minute
load average recorded before and after every measurement: a latency on a shared 2-core machine is only
as good as the load next to it. The LUT's *predicted* latency of every network is given too.

The last checkpoint of each arm and the seed checkpoint are KEPT (``<out>/*/stage-K.pt``, ~100-300 KiB) so that
``--measure-only`` can re-measure them later on a quiet machine; it appends a session to
``<out>/latency.json`` and rewrites the fragment ``<out>.md``. Delete them with ``--drop-checkpoints``.
Writes ``<out>/latency.png`` (accuracy against measured latency, every stage) and ``<out>/widths.png``
(final per-layer widths of each arm against the seed).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from common import log  # noqa: E402

NAME = "hardware_cost"
PROFILE = "profiles/cpu-amd-epyc-1t-onnxruntime.json"
INPUT_SHAPE = (1, 3, 32, 32)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_flags(p, name=NAME, limit=5000)  # 10,000 does not fit 15 min on 2 shared cores
    p.add_argument("--profile", default=PROFILE, help="device profile for cost lut (relative: from the repo root)")
    p.add_argument("--measure-only", action="store_true",
                   help="do not grow: re-measure the last stage-K.pt of each arm's run directory in --out")
    p.add_argument("--rounds", type=int, default=3, help="interleaved measuring rounds")
    p.add_argument("--time-budget", type=float, default=2.0, help="seconds of repeated runs per measurement")
    p.add_argument("--measure-threads", type=int, default=1, help="onnxruntime threads (the profile's: 1)")
    p.add_argument("--drop-checkpoints", action="store_true", help="delete the kept checkpoints at the end")
    p.add_argument("--channel-multiple", default=None, metavar="N|auto",
                   help="grow both arms in multiples of N channels (seeds rounded alike); auto: the channel_block "
                        "of --profile, for both arms")
    p.add_argument("--selection", default="lp", help="knapsack of both arms (lp, milp, greedy)")
    p.add_argument("--grow-only", action="store_true",
                   help="grow (keeping every stage's checkpoint) and stop: measure later with --measure-only, "
                        "pinned to a quiet core")
    p.add_argument("--resume", action="store_true",
                   help="with --grow-only: continue both arms after their last completed stage")
    return p.parse_args(argv)


def channel_multiple(args: argparse.Namespace) -> int | None:
    """``--channel-multiple`` as a number: ``auto`` reads the lut arm's profile, and the flops arm (which has
    no profile) grows by the same N, so both arms move in the same blocks."""
    from hwsplit.run.config import GrowConfig, resolve_channel_multiple

    text = args.channel_multiple
    if text is None:
        return None
    if text != "auto":
        return int(text)
    from cost_models.profile_io import load_profile

    return resolve_channel_multiple(GrowConfig(cost="lut", cost_options={"profile": args.profile},
                                               channel_multiple="auto"), load_profile(args.profile))


def arms(args: argparse.Namespace) -> dict:
    n = channel_multiple(args)
    return {"lut": common.grow_config(args, cost="lut", cost_options={"profile": args.profile}, channel_multiple=n,
                                      selection=args.selection),
            "flops": common.grow_config(args, cost="flops", channel_multiple=n, selection=args.selection)}


def networks(out: Path) -> dict[str, Path]:
    """The checkpoints present, by network name: ``seed`` (the shared stage 0) and ``<arm> <stage>``."""
    from hwsplit.run.rundir import RunDir

    nets = {}
    seed = out / "lut" / "stage-0.pt"
    if seed.exists():
        nets["seed"] = seed
    for arm in ("lut", "flops"):
        for k, p in RunDir(out / arm).checkpoints().items():
            if k > 0:
                nets[f"{arm} {k}"] = p
    return nets


def kept_networks(out: Path) -> set[Path]:
    """Checkpoints kept for ``--measure-only``: the seed and each arm's last stage."""
    keep = set()
    if (out / "lut" / "stage-0.pt").exists():
        keep.add(out / "lut" / "stage-0.pt")
    for arm in ("lut", "flops"):
        last = common.last_checkpoint(out / arm)
        if last is not None:
            keep.add(last)
    return keep


def measure(out: Path, args: argparse.Namespace) -> dict:
    """One measuring session of every kept network, interleaved rounds, load average next to each."""
    import cost_models
    from cost_models.profiling.measure import measure_model
    from hwsplit.network.checkpoint import load_model

    nets = networks(out)
    if not nets:
        raise SystemExit(f"no checkpoints to measure under {common.rel(out)} (run without --measure-only first)")
    models = {name: load_model(p) for name, p in nets.items()}
    lut = cost_models.get_cost_model("lut", profile=args.profile)
    flops = cost_models.get_cost_model("flops")
    session = {"date": common.now(), "command": common.command_line(), "machine": common.machine(),
               "threads": args.measure_threads,
               "time_budget_s": args.time_budget, "rounds": args.rounds, "networks": {}}
    for name, model in models.items():
        session["networks"][name] = {
            "checkpoint": common.rel(nets[name]), "checkpoint_bytes": nets[name].stat().st_size,
            "macs": flops.total(model, INPUT_SHAPE), "params": sum(p.numel() for p in model.parameters()),
            "lut_predicted_ms": lut.total(model, INPUT_SHAPE), "measurements": []}
    for k in range(args.rounds):
        for name, model in models.items():
            before = os.getloadavg()[0]
            m = measure_model(model, INPUT_SHAPE, backend="onnxruntime", threads=args.measure_threads,
                              time_budget_s=args.time_budget)
            lat = m["latency_ms"]
            session["networks"][name]["measurements"].append(
                {"round": k, "latency_ms": lat, "loadavg_before": before, "loadavg_after": os.getloadavg()[0]})
            log.info("round %d %-12s median %.4f ms (p25 %.4f, p75 %.4f, n %d), load %.2f -> %.2f", k, name,
                     lat["median"], lat["p25"], lat["p75"], lat["n"], before, os.getloadavg()[0])
    for net in session["networks"].values():
        meds = sorted(x["latency_ms"]["median"] for x in net["measurements"])
        net["median_of_medians_ms"] = meds[len(meds) // 2]
        net["min_median_ms"] = meds[0]
        net["loadavg_range"] = [min(x["loadavg_before"] for x in net["measurements"]),
                                max(x["loadavg_after"] for x in net["measurements"])]
    path = out / "latency.json"
    history = json.loads(path.read_text())["sessions"] if path.exists() else []
    common.save_json(path, {"input_shape": list(INPUT_SHAPE), "backend": "onnxruntime",
                            "sessions": history + [session]})
    return session


def plot_widths(final: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(final)
    arch0 = final[names[0]]["architecture"]
    layers = ["stem"] + [f"block {i + 1}\n(s{s})" for i, s in enumerate(arch0.get("strides", []))]
    fig, ax = plt.subplots(figsize=(12, 4.5))
    n = len(names)
    width = 0.8 / n
    for i, name in enumerate(names):
        a = final[name]["architecture"]
        ws = [a["stem_width"]] + list(a["widths"])
        ax.bar([x + (i - (n - 1) / 2) * width for x in range(len(ws))], ws, width, label=name)
    ax.set_xticks(range(len(layers)))
    ax.set_xticklabels(layers, fontsize=7)
    ax.set_xlabel("layer (pointwise output of each block; s2 = stride 2, halves the resolution)")
    ax.set_ylabel("width (output channels)")
    ax.set_title("Where each cost model put its neurons: final per-layer widths vs the seed", fontsize=10)
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def profile_note(path: str) -> str:
    """`, created <date>, <n> layers` of a profile JSON, or empty when it cannot be read."""
    try:
        data = json.loads(common.resolve(path).read_text(encoding="utf-8"))
        return f", created {data.get('created', '?')}, {len(data.get('rows', []))} layers"
    except (OSError, ValueError):
        return ""


def latest_latency(sessions: list[dict]) -> dict[str, dict]:
    """Per network, its measurement from the latest session that measured it (plus that session's date)."""
    out: dict[str, dict] = {}
    for sess in sessions:
        for name, m in sess["networks"].items():
            out[name] = {**m, "date": sess["date"]}
    return out


def plot_latency(recs: dict[str, list[dict]], lat: dict[str, dict], path: Path, threads: Any = 2) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for arm, marker in (("lut", "o"), ("flops", "s")):
        pts = []
        for r in recs[arm]:
            m = lat.get("seed" if r["stage"] == 0 else f"{arm} {r['stage']}")
            if m:
                pts.append((m["median_of_medians_ms"], 100 * r["test_top1"], r["stage"]))
        if not pts:
            continue
        xs, ys, st = zip(*pts)
        label = f"cost {arm}" + (" (latency table)" if arm == "lut" else " (MACs)")
        (line,) = ax.plot(xs, ys, marker=marker, label=label)
        for x, y, k in pts:
            ax.annotate(str(k), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8, color=line.get_color())
    ax.set_xlabel(f"measured end-to-end latency (ms, onnxruntime, {threads} thread(s), batch 1, 32×32)")
    ax.set_ylabel("test top-1 accuracy (%)")
    ax.set_title("Accuracy against measured latency on this CPU (labels: stage)", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def fragment(out: Path, args: argparse.Namespace, run_info: dict) -> None:
    recs = {arm: common.records(out / arm) for arm in ("lut", "flops")}
    sessions = (json.loads((out / "latency.json").read_text())["sessions"]
                if (out / "latency.json").exists() else [])
    lat = latest_latency(sessions)
    last = sessions[-1] if sessions else {"threads": "-", "time_budget_s": 0, "rounds": 0}
    final = {"seed": recs["lut"][0], f"lut {recs['lut'][-1]['stage']}": recs["lut"][-1],
             f"flops {recs['flops'][-1]['stage']}": recs["flops"][-1]}
    plot_widths(final, out / "widths.png")
    plot_latency(recs, lat, out / "latency.png", last["threads"])

    table = [["network", "test top-1 (%)", "MACs", "params", "LUT total, calibrated (ms)", "measured (ms)",
              "round medians (ms)", "load avg during", "measured on"]]
    for arm in ("lut", "flops"):
        for r in recs[arm]:
            name = "seed" if r["stage"] == 0 else f"{arm} {r['stage']}"
            if r["stage"] == 0 and arm == "flops":
                continue
            row = [name if name == "seed" else f"{arm}, stage {r['stage']}", f"{100 * r['test_top1']:.2f}",
                   common.fmt_num(r["macs"]), common.fmt_num(r["params"])]
            m = lat.get(name)
            if m:
                row += [f"{m['lut_predicted_ms']:.4f}", f"**{m['median_of_medians_ms']:.4f}**",
                        ", ".join(f"{x['latency_ms']['median']:.4f}" for x in m["measurements"]),
                        f"{m['loadavg_range'][0]:.2f}–{m['loadavg_range'][1]:.2f}", m["date"]]
            else:
                row += ["-"] * 5
            table.append(row)
    stage_rows = [["arm", "stage", "cost (arm's unit)", "neurons split", "Σ marginals of the split neurons / budget",
                   "realised increase (share of budget)"]]
    for arm, rs in recs.items():
        for prev, r in zip(rs, rs[1:]):
            b = r.get("budget")
            # records up to issue 15 hold Σ single-neuron marginals in "used" (later ones in "marginal_sum");
            # the realised increase is the change of the arm's cost between the stages
            realised = r["cost"]["value"] - prev["cost"]["value"]
            stage_rows.append([arm, r["stage"], f"{r['cost']['value']:.4g} {r['cost']['unit']}",
                               r.get("neurons_split", 0),
                               f"{b.get('marginal_sum', b['used']):.4g} / {b['value']:.4g} {b['unit']}" if b else "-",
                               f"{realised:.4g} ({100 * realised / b['value']:.0f} %)" if b else "-"])
    a0 = final["seed"]["architecture"]
    names = list(final)
    width_rows = [["layer", "stride", "resolution in → out"] + [n if n == "seed" else f"{n.split()[0]} final"
                                                               for n in names]]
    res = 32
    width_rows.append(["stem", a0.get("stem_stride", 1), f"32 → {res}"]
                      + [final[n]["architecture"]["stem_width"] for n in names])
    for i, st in enumerate(a0["strides"]):
        r_in, res = res, res // st
        width_rows.append([f"block {i + 1}", st, f"{r_in} → {res}"]
                          + [final[n]["architecture"]["widths"][i] for n in names])
    kept = sorted(kept_networks(out))
    kept_note = ("Checkpoints kept for `--measure-only` (the seed and each arm's final network): "
                 + ", ".join(f"`{common.rel(p)}` ({p.stat().st_size / 1024:.0f} KiB)" for p in kept) + "."
                 if kept else "No checkpoint kept (`--measure-only` has nothing to re-measure).")
    remeasured = sessions[1:]
    header = [("How it was run", run_info["how"] + "".join(
        f"\n- latency re-measured: `{x.get('command', '--measure-only')}` on {x['date']}, load average at the "
        f"start {x['machine']['loadavg'][0]:.2f}" for x in remeasured))]
    sections = header + [
        ("Accuracy and measured latency of every stage",
         f"End-to-end onnxruntime latency of one 1×3×32×32 inference, {last['threads']} threads, "
         f"{last['time_budget_s']:g} s of repeated runs per measurement after warm-up, {last['rounds']} interleaved "
         "rounds "
         "(every network once per round), 1-minute load average before/after each; 'measured' is the median of "
         "the round medians. 'LUT total' is the lut cost model's total, the one growth budgets with: the sum "
         f"of the profile's per-layer medians (`{run_info['args']['profile']}`"
         f"{profile_note(run_info['args']['profile'])}), each layer timed on its own, calibrated on the profile's "
         "whole networks (scale · layer sum + offset).\n\n" + common.md_table(table)
         + f"\n\n![accuracy vs measured latency]({common.rel(out)}/latency.png)\n\n" + kept_note),
        ("Budgets", "Each arm's budget per stage is 0.5 × its network's cost in its own unit (LUT ms or MACs).\n\n"
         + common.md_table(stage_rows)),
        ("Where the neurons went", common.md_table(width_rows) + f"\n\n![widths]({common.rel(out)}/widths.png)"),
        ("Verdict", verdict(recs, lat, run_info["n_test"])),
    ]
    common.write_fragment(out.with_suffix(".md"), "Claim 4 — hardware cost: latency table vs MACs", [
        ("Claim", "Pricing each neuron by its measured cost on the target device (here: a latency lookup table "
                  "of this 2-core CPU under onnxruntime) grows networks with a better accuracy-for-latency "
                  "trade-off on that device than pricing by MACs.")] + sections)


def verdict(recs: dict[str, list[dict]], lat: dict[str, dict], n_test: int) -> str:
    def curve(arm: str) -> list[dict]:
        pts = []
        for r in recs[arm]:
            m = lat.get("seed" if r["stage"] == 0 else f"{arm} {r['stage']}")
            if m:
                pts.append({"stage": r["stage"], "ms": m["median_of_medians_ms"], "test_top1": r["test_top1"],
                            "pred": m["lut_predicted_ms"], "spread": max(
                                abs(x["latency_ms"]["median"] - m["median_of_medians_ms"]) / m["median_of_medians_ms"]
                                for x in m["measurements"]), "load": m["loadavg_range"][1]})
        return pts

    lu, fl = curve("lut"), curve("flops")
    arch = {arm: recs[arm][-1]["architecture"] for arm in ("lut", "flops")}
    if len(lu) < 2 or len(fl) < 2:
        return "**Latency not measured.**"
    se = common.accuracy_se((lu[-1]["test_top1"] + fl[-1]["test_top1"]) / 2, n_test) * math.sqrt(2)
    cmp = [(c, +1) for c in common.matched_comparison(lu, fl, "ms")] + \
          [(c, -1) for c in common.matched_comparison(fl, lu, "ms")]
    diffs = [sign * c["diff"] for c, sign in cmp]
    better = sum(d > 2 * se for d in diffs)
    worse = sum(d < -2 * se for d in diffs)
    fL, fF = lu[-1], fl[-1]
    lut_within = all(r["cost"]["value"] - p["cost"]["value"] <= r["budget"]["value"] * (1 + 1e-9)
                     for p, r in zip(recs["lut"], recs["lut"][1:]) if r.get("budget"))
    spread = max(p["spread"] for p in lu + fl)
    faster = (fF["ms"] - fL["ms"]) / fF["ms"]
    if not diffs:
        head = ("**Not shown**: the two arms' latency ranges do not overlap after the seed, so accuracy cannot be "
                "compared at matched latency.")
    elif better and not worse:
        head = (f"**Consistent with the claim**: at matched measured latency the lut-grown networks are ahead "
                f"beyond 2 SE (±{200 * se:.2f} points) in {better} of {len(diffs)} comparisons.")
    elif worse and not better:
        head = ("**Not shown — on this device and schedule the MACs-priced arm has the better accuracy-for-latency "
                "trade-off**: at matched measured latency lut − flops = "
                + ", ".join(f"{100 * d:+.2f}" for d in diffs) + f" points; flops ahead beyond 2 SE "
                f"(±{200 * se:.2f} points) in {worse} of {len(diffs)} comparisons, lut in none.")
    else:
        head = ("**Not shown at this schedule**: at matched measured latency lut − flops = "
                + ", ".join(f"{100 * d:+.2f}" for d in diffs) + f" points (2 SE = ±{200 * se:.2f}), "
                f"{better} in lut's favour and {worse} against beyond 2 SE.")
    ratio_l = [p["ms"] / p["pred"] for p in lu + fl[1:]]
    seed = lu[0]
    growth = {name: ((c[-1]["pred"] - seed["pred"]), (c[-1]["ms"] - seed["ms"])) for name, c in (("lut", lu),
                                                                                                  ("flops", fl))}
    parts = [
        head,
        f"After {fL['stage']} stages each: lut {fL['ms']:.4f} ms at {100 * fL['test_top1']:.2f} %, flops "
        f"{fF['ms']:.4f} ms at {100 * fF['test_top1']:.2f} % — the lut-grown network is "
        + (f"{100 * faster:.1f} % faster" if faster >= 0 else f"{100 * -faster:.1f} % slower")
        + f" (largest round-to-round spread {100 * spread:.1f} %). The arms' budgets differ by construction "
        "(0.5 × current cost in each arm's own unit), so equal stages do not mean equal latency: the "
        "matched-latency comparison above is the fair one.",
        "The lookup table's predictions: measured / predicted = "
        f"{min(ratio_l):.2f}–{max(ratio_l):.2f} over these networks (the table sums layers timed one at a time; a "
        f"network runs as one onnxruntime graph). It ranks the two final networks as measured (predicted "
        f"{fL['pred']:.4f} vs {fF['pred']:.4f} ms, measured {fL['ms']:.4f} vs {fF['ms']:.4f} ms), but it "
        + ("under" if all(m > p for p, m in growth.values() if p > 0) else
           "over" if all(m < p for p, m in growth.values() if p > 0) else "mis")
        + "-predicts what growth adds over the seed: "
        + "; ".join(f"{name} +{p:.4f} ms predicted, +{m:.4f} ms measured ({m / p:.1f}×)"
                    for name, (p, m) in growth.items() if p > 0)
        + (". In its own unit the lut arm did not overspend: each stage's realised increase of the table's total "
           "stayed within its budget" if lut_within else ". In its own unit the lut arm overspent in some stage")
        + " (Budgets table; the Σ of single-neuron marginals, which the knapsack fills up to the budget, is a "
        "different number), so what exceeded the plan is the measured latency against the table's prediction"
        + (", not the budget" if lut_within else "") + ". It also put far more neurons into the stem and the first, "
        f"high-resolution blocks than the flops arm (stem {arch['lut']['stem_width']} vs "
        f"{arch['flops']['stem_width']} channels, block 1 "
        f"{arch['lut']['widths'][0]} vs {arch['flops']['widths'][0]}; see the widths table).",
    ]
    if max(p["load"] for p in lu + fl) > 1.0:
        parts.append("Measured with a 1-minute load average above 1 on this shared 2-core machine: re-measure the "
                     "kept networks with `--measure-only` on a quiet machine before relying on the latencies "
                     "(intermediate stages are not kept and keep their first measurement).")
    return "\n\n".join(parts)


def main(argv=None) -> None:
    args = parse_args(argv)
    common.prepare_process(args.threads, args.test_limit)
    info = common.machine()
    t_start = time.perf_counter()
    out = common.resolve(args.out)
    if args.fragment_only:
        run_info, _ = common.load_run_info(out)
        fragment(out, args, run_info)
        return
    if args.grow_only:
        out.mkdir(parents=True, exist_ok=True)
        configs = arms(args)
        if args.resume:  # after the shared seed was copied: each arm continues where it stopped
            common.run_tasks([common.grow_task(c, out / a, args, a, resume=True) for a, c in configs.items()],
                             args.jobs)
        else:
            (out / "latency.json").unlink(missing_ok=True)
            walls = common.grow_arms_shared_seed(configs, out, args)
            log.info("growth: seed %.0f s, arms %.0f s", walls["seed"], walls["arms"])
        common.save_run_info(out, args, info, time.perf_counter() - t_start, channel_multiple=channel_multiple(args))
        log.info("grown; measure with --measure-only (every stage's checkpoint is kept)")
        return
    if not args.measure_only:
        out.mkdir(parents=True, exist_ok=True)
        (out / "latency.json").unlink(missing_ok=True)
        walls = common.grow_arms_shared_seed(arms(args), out, args)
        log.info("growth: seed %.0f s, arms %.0f s", walls["seed"], walls["arms"])
    measure(out, args)  # every stage present (all of them right after growth)
    if not args.measure_only:
        keep = kept_networks(out)
        common.delete_checkpoints(out, keep=lambda p: args.keep_checkpoints or p in keep)
    if args.drop_checkpoints:
        common.delete_checkpoints(out)
    if args.measure_only:
        run_info, _ = common.load_run_info(out)
    else:
        run_info = common.save_run_info(out, args, info, time.perf_counter() - t_start)
    fragment(out, args, run_info)
    log.info("done in %.1f min; results %s (%d bytes)", (time.perf_counter() - t_start) / 60, common.rel(out),
             common.tree_size(out))


if __name__ == "__main__":
    main()
