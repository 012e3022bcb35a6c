"""Which post-split training policy (hwsplit.training.schedule: restart, warm, continue) to make the default,
decided on VALIDATION accuracy (a split carved from the training images), never on test.

    python bench/bench_post_split.py --dataset digits --seeds 0,1,2
    python bench/bench_post_split.py --dataset cifar --limit 3000 --seeds 0,1

Every policy grows the same seed network with the same data, epochs, budget rule and seeds; only the
learning-rate schedule of the growth stages differs. Each (policy, seed) run is a grow run directory
under ``--out`` (checkpoints deleted); an interrupted script continues where it stopped
(``grow --resume``). ``summary.json`` and ``<out>.md`` are rewritten after every run: per policy, the
final stage's validation top-1 averaged over seeds, and the paired difference to ``restart`` with
2 standard errors over seeds (SE = sd / √seeds). Test accuracy is listed, not used.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from common import log  # noqa: E402

POLICIES = ("restart", "warm", "continue")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", choices=["digits", "cifar"], default="digits")
    p.add_argument("--data-dir", default="../shared/data/cifar10")
    p.add_argument("--limit", type=int, default=3000, help="cifar: training images (before the validation split)")
    p.add_argument("--val-fraction", type=float, default=0.2)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--stages", type=int, default=3)
    p.add_argument("--epochs", type=int, default=None, help="epochs per stage (digits 8, cifar 2)")
    p.add_argument("--seed-epochs", type=int, default=None, help="seed epochs (digits 8, cifar 4)")
    p.add_argument("--policies", default=",".join(POLICIES))
    p.add_argument("--out", default=None)
    p.add_argument("--summary-only", action="store_true", help="run nothing: rebuild summary.json and <out>.md")
    return p.parse_args(argv)


def config_for(args: argparse.Namespace, policy: str, seed: int):
    from hwsplit.run.config import GrowConfig

    if args.dataset == "digits":
        return GrowConfig(val_fraction=args.val_fraction, post_split=policy, seed=seed, stages=args.stages,
                          epochs=args.epochs or 8, seed_epochs=args.seed_epochs or 8, measure=False)
    return GrowConfig(model="mobilenet_v1_cifar", dataset="npz", data_dir=args.data_dir, data_limit=args.limit,
                      test_limit=2000, val_fraction=args.val_fraction, post_split=policy, seed=seed,
                      stages=args.stages, epochs=args.epochs or 2, seed_epochs=args.seed_epochs or 4, measure=False)


def summarise(out: Path, args: argparse.Namespace, seeds: list[int], policies: list[str]) -> dict:
    rows: dict[str, dict[int, dict]] = {}
    for policy in policies:
        for seed in seeds:
            recs = common.records(out / f"{policy}-s{seed}")
            if recs and (out / f"{policy}-s{seed}" / "DONE").exists():
                last = recs[-1]
                rows.setdefault(policy, {})[seed] = {
                    "val_top1": last["val_top1"], "val_samples": last.get("val_samples"),
                    "test_top1": last["test_top1"], "macs": last["macs"],
                    "stages": len(recs) - 1, "val_mean_growth": statistics.mean(r["val_top1"] for r in recs[1:])
                    if len(recs) > 1 else last["val_top1"]}
    result = {"dataset": args.dataset, "seeds": seeds, "policies": {}, "args": vars(args)}
    base = rows.get("restart", {})
    for policy, by_seed in rows.items():
        vals = [v["val_top1"] for v in by_seed.values()]
        entry = {"n_seeds": len(vals), "val_top1_mean": statistics.mean(vals),
                 "test_top1_mean": statistics.mean(v["test_top1"] for v in by_seed.values()),
                 "macs_mean": statistics.mean(v["macs"] for v in by_seed.values()), "per_seed": by_seed}
        paired = [by_seed[s]["val_top1"] - base[s]["val_top1"] for s in by_seed if s in base]
        if policy != "restart" and len(paired) >= 2:
            se = statistics.stdev(paired) / math.sqrt(len(paired))
            # the validation images' own noise: binomial SE of each accuracy, independent across seeds
            var = [v["val_top1"] * (1 - v["val_top1"]) / v["val_samples"] + b["val_top1"] * (1 - b["val_top1"])
                   / b["val_samples"] for s, v in by_seed.items() if s in base for b in [base[s]]]
            entry["val_diff_vs_restart"] = {"mean": statistics.mean(paired), "two_se": 2 * se, "n": len(paired),
                                            "two_se_binomial": 2 * math.sqrt(sum(var)) / len(var)}
        result["policies"][policy] = entry
    common.save_json(out / "summary.json", result)
    lines = [f"Post-split policy on {args.dataset} (validation split {args.val_fraction:g} of the training "
             f"images; final stage of each run; seeds {', '.join(map(str, seeds))})", "",
             "| policy | seeds done | val top-1 (%) mean | val − restart (points, paired) ± 2 SE over seeds "
             "| 2 SE of the validation images' noise | test top-1 (%) mean | MACs mean |",
             "|---|---|---|---|---|---|---|"]
    for policy, e in result["policies"].items():
        d = e.get("val_diff_vs_restart")
        dtxt = f"{100 * d['mean']:+.2f} ± {100 * d['two_se']:.2f} (n={d['n']})" if d else "-"
        btxt = f"± {100 * d['two_se_binomial']:.2f}" if d else "-"
        lines.append(f"| {policy} | {e['n_seeds']} | {100 * e['val_top1_mean']:.2f} | {dtxt} | {btxt} | "
                     f"{100 * e['test_top1_mean']:.2f} | {common.fmt_num(e['macs_mean'])} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return result


def main(argv=None) -> None:
    args = parse_args(argv)
    common.prepare_process(1, 0)
    from hwsplit.run.grow import grow

    out = common.resolve(args.out or f"bench/results/post_split_{args.dataset}")
    out.mkdir(parents=True, exist_ok=True)
    seeds = [int(s) for s in args.seeds.split(",")]
    policies = args.policies.split(",")
    if args.summary_only:
        summarise(out, args, seeds, policies)
        return
    for seed in seeds:  # seeds outermost: a partial run still compares every policy on the same seeds
        for policy in policies:
            run = out / f"{policy}-s{seed}"
            if (run / "DONE").exists():
                continue
            t0 = time.perf_counter()
            config = config_for(args, policy, seed)
            grow(config, run, resume=(run / "config.json").exists(), overwrite=True)
            common.delete_checkpoints(run)
            (run / "DONE").write_text(json.dumps({"wall_s": time.perf_counter() - t0, "at": common.now()}) + "\n")
            log.info("%s seed %d done in %.0f s", policy, seed, time.perf_counter() - t0)
            summarise(out, args, seeds, policies)
    summarise(out, args, seeds, policies)


if __name__ == "__main__":
    main()
