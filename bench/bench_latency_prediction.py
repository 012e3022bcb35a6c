"""How well does a device profile predict whole networks? (issue 11: device costs that predict the device)

The bench draws its own random MobileNetV1-CIFAR networks (seed ``--seed``; the profile's fitting
networks use other seeds, so none of these was used for fitting): ``--networks`` with widths made
divisible by the profile's ``channel_block`` ("aligned") and as many with arbitrary widths, each
width drawn log-uniformly between the CIFAR seed's and the standard MobileNetV1's. Every network is
measured end to end twice, in two interleaved passes over all networks (the protocol of
``cost_models.profiling.measure.measure_model``: median of round medians, 1 intra-op thread by default), so
each figure comes with the machine's re-measurement agreement. Predictions: the lookup table
(``lut``; in context when the profile has a ``context`` section), the same table from isolated
layers with the old calibration (``lut_isolated``), the regressor (``energy`` cost model with
``metric="latency_ms"``) and MACs (a ranking only). Reported per set: share within ±10 % of the
mean of the two measurements, Spearman ρ (and MACs'), MAPE, median signed error.

    python bench/bench_latency_prediction.py --profile profiles/cpu-amd-epyc-1t-onnxruntime.json

Any CPU can check its own table: ``--make-profile`` first profiles the machine it runs on into
``--profile`` with the README's defaults (``cli.py profile``; resumable, ~12 min on a 2-core CPU),
then checks it. ``--node-times`` also records every bench network's per-layer in-context times
(onnxruntime's per-node profile), so a miss can be traced to a layer kind; ``--repredict
RESULT.json`` re-prices the networks of an earlier run with the current code and the given profile
without measuring anything again (for changing the model, not the machine). Time on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import warnings
from datetime import date
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from scipy.stats import spearmanr  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cost_models import get_cost_model  # noqa: E402
from cost_models.profile_io import channel_block, load_profile  # noqa: E402
from cost_models.profiling.grid import make_divisible  # noqa: E402
from cost_models.profiling.measure import measure_model  # noqa: E402
from hwsplit.network.graph import layer_specs  # noqa: E402
from hwsplit.network.models import MOBILENET_V1_CIFAR_SEED, MOBILENET_V1_STANDARD, build_model  # noqa: E402
from hwsplit.network.specs import LayerSpec  # noqa: E402

PREDICTORS = ("lut", "lut_isolated", "predictor")


def random_widths(rng: np.random.Generator) -> tuple[int, list[int]]:
    lo = [MOBILENET_V1_CIFAR_SEED["stem"]] + [w for w, _ in MOBILENET_V1_CIFAR_SEED["blocks"]]
    hi = [MOBILENET_V1_STANDARD["stem"]] + [w for w, _ in MOBILENET_V1_STANDARD["blocks"]]
    # one growth "level" per network plus per-layer jitter, so sizes span the whole range
    level = rng.uniform(0, 1)
    widths = []
    for a, b in zip(lo, hi):
        t = float(np.clip(level + rng.normal(0, 0.15), 0, 1))
        widths.append(int(round(math.exp(math.log(a) + t * (math.log(b) - math.log(a))))))
    return widths[0], widths[1:]


def stats(pred: np.ndarray, meas: np.ndarray) -> dict[str, float]:
    err = (pred - meas) / meas
    return {"within_10pct": float(np.mean(np.abs(err) <= 0.10)), "spearman": float(spearmanr(pred, meas)[0]),
            "mape": float(np.mean(np.abs(err))), "median_error": float(np.median(err))}


def grown_set(path: str, models: dict, flops, shape: tuple[int, ...]) -> dict:
    """The networks a full-scale comparison measured (``bench_fair``'s ``latency.json``: architecture and the
    median of its passes, ms) re-priced by every predictor: the sizes and shapes growth really makes."""
    from hwsplit.network.models import model_from_architecture

    nets = json.loads(Path(path).read_text())["networks"]
    rows = []
    for entry in nets.values():
        torch.manual_seed(0)
        model = model_from_architecture(entry["architecture"]).eval()
        row = {"macs": flops.total(model, shape), "measured_ms": entry["latency_ms"], "passes_ms": entry["passes_ms"]}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            row.update({f"{name}_ms": cm.total(model, shape) for name, cm in models.items()})
        rows.append(row)
    meas = np.array([r["measured_ms"] for r in rows])
    entry = {"n": len(rows), "source": path, "networks": rows,
             "macs_spearman": float(spearmanr([r["macs"] for r in rows], meas)[0])}
    for name in PREDICTORS:
        entry[name] = stats(np.array([r[f"{name}_ms"] for r in rows]), meas)
    return entry


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", required=True)
    ap.add_argument("--networks", type=int, default=20, help="networks per set (aligned, arbitrary)")
    ap.add_argument("--seed", type=int, default=11)
    ap.add_argument("--time-budget", type=float, default=1.0, help="seconds of timed runs per measurement")
    ap.add_argument("--threads", type=int, default=None, help="default: the profile's")
    ap.add_argument("--out", default="bench/results/latency_prediction.json")
    ap.add_argument("--make-profile", action="store_true",
                    help="profile this machine into --profile first (resumes a partial file)")
    ap.add_argument("--node-times", action="store_true", help="also record per-layer in-context times")
    ap.add_argument("--repredict", default=None, metavar="RESULT.json",
                    help="re-price the networks of an earlier result; measure nothing")
    ap.add_argument("--grown", default=None, metavar="LATENCY.json",
                    help="also re-price the networks a full-scale comparison measured (bench_fair's latency.json: "
                         "width multipliers and grown stages) as a third set; measures nothing")
    args = ap.parse_args()
    torch.set_num_threads(1)

    if args.make_profile:
        from cost_models.profiling.profiler import profile_family

        profile_family(out=args.profile)
    profile = load_profile(args.profile)
    threads = args.threads or profile["device"].get("threads")
    block = channel_block(profile)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        models = {"lut": get_cost_model("lut", profile=args.profile),
                  "lut_isolated": get_cost_model("lut", profile=args.profile, in_context=False),
                  "predictor": get_cost_model("energy", profile=args.profile, metric="latency_ms")}
    flops = get_cost_model("flops")
    rng = np.random.default_rng(args.seed)
    res = profile.get("resolution", 32)
    shape = (1, 3, res, res)
    nets = []
    for i in range(2 * args.networks):
        stem, widths = random_widths(rng)
        kind = "aligned" if i < args.networks else "arbitrary"
        if kind == "aligned":
            stem, widths = make_divisible(stem, block), [make_divisible(w, block) for w in widths]
        torch.manual_seed(i)
        model = build_model("mobilenet_v1_cifar", stem_width=stem, widths=widths,
                            activation=profile.get("activation", "silu")).eval()
        row = {"set": kind, "stem": stem, "widths": widths, "macs": flops.total(model, shape)}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for name, cm in models.items():
                row[f"{name}_ms"] = cm.total(model, shape)
        nets.append((model, row))
    earlier = json.loads(Path(args.repredict).read_text())["networks"] if args.repredict else None
    if earlier is not None:
        if [(r["stem"], r["widths"]) for r in earlier] != [(r["stem"], r["widths"]) for _, r in nets]:
            raise SystemExit(f"{args.repredict}: its networks are not this seed's and block's")
        for (_, row), old in zip(nets, earlier):
            row.update({k: v for k, v in old.items() if k.startswith(("measured_", "rounds_", "layers"))})
    for p in ("a", "b") if earlier is None else ():  # two interleaved passes: the re-measurement
        for i, (model, row) in enumerate(nets):
            m = measure_model(model, shape, backend=profile["backend"], meter="latency", threads=threads,
                              time_budget_s=args.time_budget)
            row[f"measured_{p}_ms"] = m["latency_ms"]["median"]
            row[f"rounds_{p}_ms"] = m["latency_ms"]["rounds"]
            print(f"pass {p} {i:2d} {row['set']:9s} {row['macs'] / 1e6:7.2f}M MACs  measured "
                  f"{row[f'measured_{p}_ms']:.3f} ms  lut {row['lut_ms']:.3f}  predictor {row['predictor_ms']:.3f}",
                  flush=True)
    if args.node_times and earlier is None:
        from cost_models.profiling.node_trace import attribute_nodes, node_times

        example = torch.randn(shape, generator=torch.Generator().manual_seed(0))
        for model, row in nets:
            specs = layer_specs(model, shape)
            nodes = node_times(model, example, threads=threads or 1, runs=100)
            per = attribute_nodes(nodes, [s.name for s in specs], [s.name for s in specs if s.kind == "linear"])
            row["layers"] = [{"layer": s.to_dict(), "latency_ms": per[s.name]["ms"], "nodes": per[s.name]["nodes"]}
                             for s in specs]
    if "layers" in nets[0][1] and models["lut"].context is not None:
        fit = models["lut"].context
        for _model, row in nets:
            for x in row["layers"]:
                x["predicted_ms"] = fit.predict(LayerSpec.from_dict(x["layer"]))
    rows = [r for _, r in nets]
    result: dict = {
        "profile": args.profile, "profile_rows": len(profile["rows"]), "channel_block": block,
        "profile_minutes": round(profile.get("profiling_seconds", 0.0) / 60, 1),
        "profile_repeatability": profile.get("repeatability"),
        "context_networks": len((profile.get("context") or {}).get("networks", [])),
        "device": profile["device"].get("name"), "threads": threads, "machine": platform.machine(),
        "date": date.today().isoformat(), "seed": args.seed, "time_budget_s": args.time_budget, "sets": {},
        "networks": rows,
    }
    for kind in ("aligned", "arbitrary"):
        sel = [r for r in rows if r["set"] == kind]
        a, b = np.array([r["measured_a_ms"] for r in sel]), np.array([r["measured_b_ms"] for r in sel])
        meas = (a + b) / 2
        remeasure = np.abs(a / b - 1)
        entry = {"n": len(sel), "remeasure_within_10pct": float(np.mean(remeasure <= 0.10)),
                 "remeasure_within_5pct": float(np.mean(remeasure <= 0.05)),
                 "remeasure_max_pct": float(100 * remeasure.max()),
                 "remeasure_spearman": float(spearmanr(a, b)[0]),
                 "macs_spearman": float(spearmanr([r["macs"] for r in sel], meas)[0])}
        for name in PREDICTORS:
            entry[name] = stats(np.array([r[f"{name}_ms"] for r in sel]), meas)
        result["sets"][kind] = entry
    if args.grown:
        result["sets"]["grown"] = grown_set(args.grown, models, flops, shape)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    for kind, e in result["sets"].items():
        if kind == "grown":
            print(f"\ngrown: {e['n']} networks of {args.grown} (median of their passes)")
        else:
            print(f"\n{kind}: {e['n']} networks; re-measured within ±10 %: {100 * e['remeasure_within_10pct']:.0f} % "
                  f"(±5 %: {100 * e['remeasure_within_5pct']:.0f} %, worst {e['remeasure_max_pct']:.1f} %, "
                  f"ρ {e['remeasure_spearman']:.3f})")
        print(predictor_table(e))


def predictor_table(entry: dict) -> str:
    """One set's figures per predictor as a markdown table, MACs' ranking last."""
    lines = ["| predictor | within ±10 % | Spearman ρ | MAPE | median error |", "|---|---|---|---|---|"]
    for name in PREDICTORS:
        s = entry[name]
        lines.append(f"| {name} | {100 * s['within_10pct']:.0f} % | {s['spearman']:.3f} | {100 * s['mape']:.1f} % | "
                     f"{100 * s['median_error']:+.1f} % |")
    lines.append(f"| MACs (rank only) | – | {entry['macs_spearman']:.3f} | – | – |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
