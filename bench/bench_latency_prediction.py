"""How well does a device profile predict whole networks? (issue: hardware cost models)

For N random MobileNetV1-CIFAR width configurations (widths drawn log-uniformly per layer between
the paper's CIFAR seed and the standard MobileNetV1 widths, so they are off the profile's channel
grid), compare the end-to-end onnxruntime latency *measured* on this machine with the latency
*predicted* by the lookup table (``lut``), by the regression predictor (``energy`` cost model with
``metric="latency_ms"``), and by MACs alone (a ranking only): share of networks within ±10 %,
Spearman rank correlation, mean absolute percentage error.

    python bench/bench_latency_prediction.py --profile profiles/cpu-amd-epyc-2t-onnxruntime.json
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
import warnings
from datetime import date
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cost_models import get_cost_model  # noqa: E402
from cost_models.measure import measure_model  # noqa: E402
from cost_models.profile_io import load_profile  # noqa: E402
from hwsplit.models import MOBILENET_V1_CIFAR_SEED, MOBILENET_V1_STANDARD, build_model  # noqa: E402


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", required=True)
    ap.add_argument("--networks", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--time-budget", type=float, default=2.0, help="seconds of timed runs per network")
    ap.add_argument("--out", default="bench/results/latency_prediction.json")
    args = ap.parse_args()

    profile = load_profile(args.profile)
    threads = profile["device"].get("threads")
    lut = get_cost_model("lut", profile=args.profile)
    reg = get_cost_model("energy", profile=args.profile, metric="latency_ms")
    flops = get_cost_model("flops")
    rng = np.random.default_rng(args.seed)
    shape = (1, 3, profile.get("resolution", 32), profile.get("resolution", 32))
    rows = []
    for i in range(args.networks):
        stem, widths = random_widths(rng)
        torch.manual_seed(i)
        model = build_model("mobilenet_v1_cifar", stem_width=stem, widths=widths,
                            activation=profile.get("activation", "silu")).eval()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            p_lut, p_reg = lut.total(model, shape), reg.total(model, shape)
        m = measure_model(model, shape, backend=profile["backend"], meter="latency", threads=threads,
                          time_budget_s=args.time_budget)
        rows.append({"stem": stem, "widths": widths, "macs": flops.total(model, shape), "lut_ms": p_lut,
                     "predictor_ms": p_reg, "measured_ms": m["latency_ms"]["median"],
                     "measured_iqr_ms": [m["latency_ms"]["p25"], m["latency_ms"]["p75"]]})
        print(f"{i:2d} {rows[-1]['macs'] / 1e6:8.2f}M MACs  measured {rows[-1]['measured_ms']:.3f} ms  "
              f"lut {p_lut:.3f}  predictor {p_reg:.3f}", flush=True)
    meas = np.array([r["measured_ms"] for r in rows])
    result = {
        "profile": args.profile, "profile_rows": len(profile["rows"]),
        "profile_minutes": profile.get("profiling_seconds", float("nan")) / 60 if profile.get("profiling_seconds")
        else None,
        "device": profile["device"].get("name"), "threads": threads, "machine": platform.machine(),
        "date": date.today().isoformat(), "networks": rows,
        "lut": stats(np.array([r["lut_ms"] for r in rows]), meas),
        "predictor": stats(np.array([r["predictor_ms"] for r in rows]), meas),
        "macs_spearman": float(spearmanr([r["macs"] for r in rows], meas)[0]),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print("\n| predictor | within ±10 % | Spearman ρ | MAPE | median error |")
    print("|---|---|---|---|---|")
    for name in ("lut", "predictor"):
        s = result[name]
        print(f"| {name} | {100 * s['within_10pct']:.0f} % | {s['spearman']:.3f} | {100 * s['mape']:.1f} % | "
              f"{100 * s['median_error']:+.1f} % |")
    print(f"| MACs alone (rank only) | – | {result['macs_spearman']:.3f} | – | – |")
    print(f"\n{len(rows)} networks, {time.strftime('%Y-%m-%d')}, profile {args.profile}")


if __name__ == "__main__":
    main()
