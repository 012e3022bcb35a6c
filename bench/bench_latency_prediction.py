"""How well does a device profile predict whole networks? (issue 11)

The bench draws its own networks, never used for fitting (its seed differs from the profile's
calibration networks, and an exact match with one is redrawn): ``--aligned`` random
MobileNetV1-CIFAR width configurations whose widths are multiples of the profile's
``channel_block`` (torchvision's make-divisible rounding) and ``--arbitrary`` ones with any width
(each layer drawn log-uniformly between the CIFAR seed's and the standard network's width). Every
network is measured end to end with onnxruntime with the protocol of ``cost_models.measure``
(interleaved rounds, median of round medians) — twice, all networks interleaved each time, so
the re-measurement agreement (how often the second measurement is within ±10 % of the first) stands
next to every figure as its ceiling. Predictors: the lookup table (``lut``), the regression predictor
(``energy`` cost model with ``metric="latency_ms"``) and MACs alone (a ranking only): share of
networks within ±10 % of the first measurement, Spearman ρ, MAPE, median error.

    flock /work/locks/core1.lock taskset -c 1 python bench/bench_latency_prediction.py \\
        --profile profiles/cpu-amd-epyc-1t-onnxruntime.json --out bench/results/latency_prediction_1t.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
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
from cost_models.grid import calibration_architectures  # noqa: E402
from cost_models.measure import measure_models  # noqa: E402
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


def make_divisible(v: float, divisor: int) -> int:
    """torchvision's ``_make_divisible``: nearest multiple of ``divisor``, never below 90 % of ``v``."""
    new = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new + divisor if new < 0.9 * v else new


def stats(pred: np.ndarray, meas: np.ndarray) -> dict[str, float]:
    err = (pred - meas) / meas
    return {"within_10pct": float(np.mean(np.abs(err) <= 0.10)), "spearman": float(spearmanr(pred, meas)[0]),
            "mape": float(np.mean(np.abs(err))), "median_error": float(np.median(err))}


def draw(n: int, rng: np.random.Generator, block: int | None, forbidden: list[tuple[int, list[int]]]) -> list:
    out: list[tuple[int, list[int]]] = []
    while len(out) < n:
        stem, widths = random_widths(rng)
        if block is not None:
            stem, widths = make_divisible(stem, block), [make_divisible(w, block) for w in widths]
        if (stem, widths) in forbidden or (stem, widths) in out:
            continue  # never a network the profile was calibrated on
        out.append((stem, widths))
    return out


def summarise(rows: list[dict], name: str) -> dict:
    meas = np.array([r["measured_ms"] for r in rows])
    again = np.array([r["remeasured_ms"] for r in rows])
    rel = np.abs(again - meas) / meas
    return {
        "set": name, "n": len(rows),
        "remeasure": {"within_10pct": float(np.mean(rel <= 0.10)), "within_5pct": float(np.mean(rel <= 0.05)),
                      "max_diff_pct": float(100 * rel.max()), "spearman": float(spearmanr(meas, again)[0])},
        "lut": stats(np.array([r["lut_ms"] for r in rows]), meas),
        "predictor": stats(np.array([r["predictor_ms"] for r in rows]), meas),
        "macs_spearman": float(spearmanr([r["macs"] for r in rows], meas)[0]),
        "lut_vs_remeasured": stats(np.array([r["lut_ms"] for r in rows]), again),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", required=True)
    ap.add_argument("--aligned", type=int, default=20, help="networks with widths multiples of the block")
    ap.add_argument("--arbitrary", type=int, default=20, help="networks with any widths")
    ap.add_argument("--block", type=int, default=None, help="default: the profile's channel_block (else 16)")
    ap.add_argument("--seed", type=int, default=11, help="the bench's own draw (the profile's is 20191007)")
    ap.add_argument("--time-budget", type=float, default=2.0, help="seconds of timed runs per network per measurement")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", default="bench/results/latency_prediction_1t.json")
    ap.add_argument("--reuse", default=None, help="take the measurements from this results JSON (same draw) "
                    "instead of measuring: compare predictors offline")
    ap.add_argument("--regressor-block", type=int, default=None,
                    help="the regressor's channel block (default: the profile's; 1 drops the block terms)")
    args = ap.parse_args()
    torch.set_num_threads(1)

    profile = load_profile(args.profile)
    threads = profile["device"].get("threads")
    block = args.block or int(profile.get("channel_block") or 16)
    res = int(profile.get("resolution", 32))
    shape = (1, 3, res, res)
    lut = get_cost_model("lut", profile=args.profile)
    reg_options = {} if args.regressor_block is None else {"block": args.regressor_block}
    reg = get_cost_model("energy", profile=args.profile, metric="latency_ms", **reg_options)
    flops = get_cost_model("flops")
    calib = [(a["stem_width"], list(a["widths"])) for a in calibration_architectures("mobilenet_v1", res, 64)]
    calib += [(n["architecture"]["stem_width"], list(n["architecture"]["widths"])) for n in profile.get("networks", [])]
    rng = np.random.default_rng(args.seed)
    nets = ([("aligned", s, w) for s, w in draw(args.aligned, rng, block, calib)]
            + [("arbitrary", s, w) for s, w in draw(args.arbitrary, rng, None, calib)])
    models, rows = [], []
    for i, (kind, stem, widths) in enumerate(nets):
        torch.manual_seed(i)
        model = build_model("mobilenet_v1_cifar", stem_width=stem, widths=widths,
                            activation=profile.get("activation", "silu")).eval()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            p_lut, p_reg = lut.total(model, shape), reg.total(model, shape)
        models.append(model)
        rows.append({"set": kind, "stem": stem, "widths": widths, "macs": flops.total(model, shape), "lut_ms": p_lut,
                     "predictor_ms": p_reg})
    started = time.perf_counter()
    if args.reuse:
        old = json.loads(Path(args.reuse).read_text())["networks"]
        if [(o["stem"], o["widths"]) for o in old] != [(r["stem"], r["widths"]) for r in rows]:
            raise SystemExit(f"--reuse {args.reuse}: its networks are not this draw (same --seed, --aligned, "
                             "--arbitrary?)")
        for row, o in zip(rows, old):
            row.update({k: o[k] for k in o if k.startswith(("measured", "remeasured"))})
    # two independent measurements of every network, all networks interleaved in each
    for key in ("measured", "remeasured") if not args.reuse else ():
        results = measure_models(models, shape, backend=profile["backend"], meter="latency", threads=threads,
                                 time_budget_s=args.time_budget, rounds=args.rounds)
        for row, m in zip(rows, results):
            row[f"{key}_ms"] = m["latency_ms"]["median"]
            row[f"{key}_spread_pct"] = m["repeat"]["spread_pct"]
        print(f"{key}: {time.perf_counter() - started:.0f} s", flush=True)
    for i, r in enumerate(rows):
        print(f"{i:2d} {r['set']:9s} {r['macs'] / 1e6:7.2f}M MACs  measured {r['measured_ms']:.3f} "
              f"again {r['remeasured_ms']:.3f} ms  lut {r['lut_ms']:.3f}  predictor {r['predictor_ms']:.3f}")
    sets = {k: summarise([r for r in rows if r["set"] == k], k) for k in ("aligned", "arbitrary")}
    result = {
        "command": " ".join(sys.argv), "profile": args.profile, "profile_rows": len(profile["rows"]),
        "profile_repeatability": profile.get("repeatability"), "channel_block": block,
        "device": profile["device"].get("name"), "threads": threads, "machine": platform.machine(),
        "date": date.today().isoformat(), "time_budget_s": args.time_budget, "rounds": args.rounds,
        "measurements_from": args.reuse or "this run", "regressor_block": reg.regressor.block,
        "measure_seconds": round(time.perf_counter() - started, 1), "sets": sets, "networks": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print("\n| set | predictor | within ±10 % | Spearman ρ | MAPE | median error | re-measurement within ±10 % |")
    print("|---|---|---|---|---|---|---|")
    for k, s in sets.items():
        for name in ("lut", "predictor"):
            p = s[name]
            print(f"| {k} | {name} | {100 * p['within_10pct']:.0f} % | {p['spearman']:.3f} | {100 * p['mape']:.1f} % "
                  f"| {100 * p['median_error']:+.1f} % | {100 * s['remeasure']['within_10pct']:.0f} % |")
        print(f"| {k} | MACs (rank only) | – | {s['macs_spearman']:.3f} | – | – | – |")
    print(f"\n{len(rows)} networks, {time.strftime('%Y-%m-%d')}, profile {args.profile}, block {block}")


if __name__ == "__main__":
    main()
