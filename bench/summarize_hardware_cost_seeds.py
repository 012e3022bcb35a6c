"""Claim 4 over several seeds: pool the matched-latency comparisons of ``bench_hardware_cost.py`` runs.

    python bench/summarize_hardware_cost_seeds.py bench/results/hardware_cost_aligned/seed0 \
        bench/results/hardware_cost_aligned/seed1 --out bench/results/hardware_cost_aligned/summary

Each run directory holds the two arms (``lut``, ``flops``) and ``latency.json`` (from ``--measure-only``).
For every run, each grown network of one arm is compared with the other arm's accuracy interpolated at
the same measured latency (log scale, no extrapolation; ``common.matched_comparison``), signed lut − flops.
Writes ``<out>.json`` (every comparison) and ``<out>.md`` (a table per seed and the pooled figures: the
mean difference, 2 standard errors of test sampling for one comparison (10,000 test images) and the
spread across seeds).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from bench_hardware_cost import latest_latency  # noqa: E402


def curve(recs: list[dict], lat: dict[str, dict], arm: str) -> list[dict]:
    out = []
    for r in recs:
        m = lat.get("seed" if r["stage"] == 0 else f"{arm} {r['stage']}")
        if m:
            out.append({"stage": r["stage"], "ms": m["median_of_medians_ms"], "test_top1": r["test_top1"],
                        "macs": r["macs"], "widths": [r["architecture"]["stem_width"], *r["architecture"]["widths"]],
                        "spread": max(abs(x["latency_ms"]["median"] - m["median_of_medians_ms"])
                                      / m["median_of_medians_ms"] for x in m["measurements"])})
    return out


def summarize(runs: list[Path], n_test: int = 10000) -> dict:
    seeds = []
    for run in runs:
        info = json.loads((run / "run_info.json").read_text())
        sessions = json.loads((run / "latency.json").read_text())["sessions"]
        lat = latest_latency(sessions)
        curves = {arm: curve(common.records(run / arm), lat, arm) for arm in ("lut", "flops")}
        cmp = ([{**c, "network": f"lut {c['stage']}", "lut_minus_flops": c["diff"]}
                for c in common.matched_comparison(curves["lut"], curves["flops"], "ms")]
               + [{**c, "network": f"flops {c['stage']}", "lut_minus_flops": -c["diff"]}
                  for c in common.matched_comparison(curves["flops"], curves["lut"], "ms")])
        acc = [p["test_top1"] for arm in curves.values() for p in arm]
        se = common.accuracy_se(statistics.mean(acc), n_test) * math.sqrt(2)
        seeds.append({"run": common.rel(run), "seed": info["args"]["seed"], "curves": curves, "comparisons": cmp,
                      "two_se": 2 * se, "threads": sessions[-1]["threads"], "measured": sessions[-1]["date"],
                      "channel_multiple": info.get("channel_multiple")})
    diffs = [c["lut_minus_flops"] for s in seeds for c in s["comparisons"]]
    per_seed = [statistics.mean([c["lut_minus_flops"] for c in s["comparisons"]]) for s in seeds if s["comparisons"]]
    return {"seeds": seeds, "pooled": {
        "n_comparisons": len(diffs), "mean_lut_minus_flops": statistics.mean(diffs) if diffs else None,
        "per_seed_mean": per_seed,
        "between_seed_se": statistics.stdev(per_seed) / math.sqrt(len(per_seed)) if len(per_seed) > 1 else None,
        "two_se_one_comparison": max(s["two_se"] for s in seeds)}}


def markdown(summary: dict) -> str:
    lines = []
    for s in summary["seeds"]:
        lines += [f"**Seed {s['seed']}** (`{s['run']}`, channel multiple {s['channel_multiple']}, measured "
                  f"{s['measured']}, {s['threads']} onnxruntime thread(s)):", ""]
        rows = [["network", "measured (ms)", "round spread", "test top-1 (%)", "MACs", "widths (stem, blocks)"]]
        for arm in ("lut", "flops"):
            for p in s["curves"][arm]:
                if p["stage"] == 0 and arm == "flops":
                    continue
                rows.append(["seed" if p["stage"] == 0 else f"{arm} {p['stage']}", f"{p['ms']:.4f}",
                             f"{100 * p['spread']:.1f} %", f"{100 * p['test_top1']:.2f}", common.fmt_num(p["macs"]),
                             " ".join(map(str, p["widths"]))])
        lines += [common.md_table(rows), ""]
        if s["comparisons"]:
            lines += ["Matched latency, lut − flops (points): " + ", ".join(
                f"{c['network']} {100 * c['lut_minus_flops']:+.2f}" for c in s["comparisons"])
                + f" (2 SE of one comparison ±{100 * s['two_se']:.2f}).", ""]
        else:
            lines += ["No matched-latency comparison: the arms' latency ranges do not overlap after the seed.", ""]
    p = summary["pooled"]
    if p["n_comparisons"]:
        lines += [f"Pooled over {len(summary['seeds'])} seed(s): {p['n_comparisons']} comparisons, mean lut − flops "
                  f"{100 * p['mean_lut_minus_flops']:+.2f} points; per-seed means "
                  + ", ".join(f"{100 * m:+.2f}" for m in p["per_seed_mean"])
                  + (f" (between-seed SE {100 * p['between_seed_se']:.2f})" if p["between_seed_se"] is not None else "")
                  + f"; 2 SE of test sampling for one comparison ±{100 * p['two_se_one_comparison']:.2f}."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--out", required=True, help="path without suffix: writes <out>.json and <out>.md")
    args = ap.parse_args(argv)
    summary = summarize([common.resolve(r) for r in args.runs])
    out = common.resolve(args.out)
    common.save_json(out.with_suffix(".json"), {"command": common.command_line(), "date": common.now(), **summary})
    out.with_suffix(".md").write_text(markdown(summary), encoding="utf-8")
    print(markdown(summary))


if __name__ == "__main__":
    main()
