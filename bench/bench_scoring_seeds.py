"""Two scoring settings side by side over several descent seeds, on the same trained net and batches as exact.

One net per width (the CIFAR-10 seed MobileNetV1 at k× its widths, trained as bench_scoring.py trains it),
the scoring epoch's batches recorded once, ``exact`` once; then every setting of ``--configs`` (a JSON
object name → splitting_indices keyword arguments, the first is "after", the second "before") for each
``--seeds`` (the descent's seed: its random start and basis fill). Reports per setting the mean call time,
worst-group Spearman ρ, worst top-10 % overlap and share of exact's negatives found, and the paired
differences (first − second) with 2 standard errors over the seeds.

    python bench/bench_scoring_seeds.py --widths 1,4 --seeds 0,1,2,3,4 --out bench/results/x.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_scoring as B  # noqa: E402

DEFAULT_CONFIGS = {"cost, b=6 (default)": {}, "uniform, b=8": {"ritz_vectors": 8, "ritz_allocation": "uniform"},
                   "uniform, b=6": {"ritz_vectors": 6, "ritz_allocation": "uniform"}}
FIGURES = ("seconds", "spearman_min", "top10_overlap_min", "negative_found_share")


def run(args: argparse.Namespace) -> dict:
    from hwsplit import splitting_indices
    from hwsplit.training.train import TrainConfig, make_optimizer, seed_everything, train_epoch

    torch.set_num_threads(args.threads)
    configs = json.loads(args.configs) if args.configs else DEFAULT_CONFIGS
    names = list(configs)
    if len(names) < 2:
        raise SystemExit("--configs: give at least two settings to compare")
    seeds = [int(s) for s in args.seeds.split(",")]
    _, loader = B._load(args)
    report: dict = {"args": vars(args), "machine": B._machine(args.threads), "load_before": os.getloadavg(),
                    "configs": configs, "widths": []}
    t0 = time.perf_counter()
    for k in [int(w) for w in args.widths.split(",")]:
        seed_everything(args.seed)
        model = B.build(k)
        opt = make_optimizer(model, TrainConfig(epochs=args.pretrain_epochs, lr=args.lr, schedule="constant"))
        for epoch in range(args.pretrain_epochs):
            train_epoch(model, loader, opt, device="cpu", loss_fn=F.cross_entropy, epoch=epoch)
        model.eval()
        loader.set_epoch(B.SCORE_EPOCH)
        batches = [(x.clone(), y.clone()) for x, y in loader]
        start = time.perf_counter()
        exact = splitting_indices(model, batches, method="exact")
        print(f"k={k}: exact in {time.perf_counter() - start:.0f} s", flush=True)
        splitting_indices(model, batches[:2])  # the first call in a process is slower (fresh pages)
        rows: dict[str, list[dict]] = {name: [] for name in names}
        for seed in seeds:
            for name in names:
                start = time.perf_counter()
                scores = splitting_indices(model, batches, seed=seed, **configs[name])
                q = B.quality_figures(exact, scores)
                q["seconds"] = time.perf_counter() - start
                rows[name].append({f: q[f] for f in FIGURES})
                print(f"k={k} seed {seed} {name}: " + ", ".join(f"{f} {q[f]:.3f}" for f in FIGURES), flush=True)
        summary = {}
        for f in FIGURES:
            a, b = ([r[f] for r in rows[n]] for n in names[:2])
            diff = [x - y for x, y in zip(a, b)]
            se = statistics.stdev(diff) / len(diff) ** 0.5 if len(diff) > 1 else float("nan")
            summary[f] = {names[0]: statistics.mean(a), names[1]: statistics.mean(b),
                          "difference": statistics.mean(diff), "two_se": 2 * se}
        report["widths"].append({"k": k, "seeds": seeds, "rows": rows, "summary": summary})
    report["load_after"] = os.getloadavg()
    report["wall_s"] = time.perf_counter() - t0
    return report


def table(report: dict) -> str:
    names = list(report["configs"])[:2]
    lines = [f"| k | figure | {names[0]} | {names[1]} | difference ± 2 SE |", "|---|---|---|---|---|"]
    for w in report["widths"]:
        for f in FIGURES:
            s = w["summary"][f]
            lines.append(f"| {w['k']}× | {f} | {s[names[0]]:.3f} | {s[names[1]]:.3f} | "
                         f"{s['difference']:+.3f} ± {s['two_se']:.3f} ({len(w['seeds'])} seeds) |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default="../shared/data/cifar10")
    parser.add_argument("--images", type=int, default=1280)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--widths", default="1,4")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--pretrain-epochs", type=int, default=4)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0, help="data and training seed")
    parser.add_argument("--seeds", default="0,1,2,3,4", help="descent seeds")
    parser.add_argument("--configs", default="", help="JSON: name -> splitting_indices kwargs (first two compared)")
    parser.add_argument("--out", default="")
    args = parser.parse_args(argv)
    report = run(args)
    print(table(report))
    print(f"({report['machine']['cpu']}, {args.threads} thread(s), {report['wall_s'] / 60:.1f} min)")
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
