"""Claims 2 and 3 of BENCHMARKS.md under the paper's comparison protocol (issue 12).

    python bench/bench_fair.py --seeds 0,1         # BENCHMARKS.md's run (the defaults)
    python bench/bench_fair.py --fragment-only                     # rebuild the tables from what is done

The architecture is what is compared, not the schedule it grew under (Wang et al. 2019, code
``main_finetune.py``): every compared network is **retrained from scratch on the same schedule**
(``--retrain-epochs`` of one cosine, ``hwsplit.finetune.finetune(from_scratch=True)`` for grown stages,
``hwsplit.baselines.width_baseline`` for width multipliers), and the **fine-tuned** final grown network
(its growth epochs + ``--retrain-epochs`` more) is compared with width multipliers trained from scratch
for the same total number of epochs. Per seed:

1. one trained seed network (stage 0), shared by three growth arms: ``flops`` (energy-aware: MACs,
   LP knapsack), ``vanilla`` (``cost=none``: every neuron costs 1) and ``random`` (``--selection random``
   under the MACs budget: the value of the splitting index itself);
2. width multipliers ``--multipliers`` trained from scratch for ``--retrain-epochs``;
3. every grown stage of ``flops`` retrained from scratch, then ``random``'s, then ``vanilla``'s;
4. ``flops``'s last stage fine-tuned for ``--retrain-epochs``; width multipliers trained for its total epochs.

Steps run in phases (``--steps``): steps 1-3 for every seed, then step 4 for every seed, so a
run cut short still has the retrained comparisons on as many seeds as possible. Every step is a run
directory under ``--out/s<seed>/`` and is skipped when done (``DONE`` marker; ``width:M`` and
``retrain-ARM:K`` do one multiplier or stage, so several processes can share a seed's work): run
the same command again after a kill. Comparisons are at matched MACs by
interpolating the other curve at the same log10 MACs (no extrapolation), with 2 SE of the difference of
two independent test accuracies (binomial, √2 × SE); nothing is chosen on test (the validation split is
recorded, not used: this benchmark chooses nothing). ``<out>/summary.json`` and ``<out>.md`` are rebuilt
after every step.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from common import log  # noqa: E402

NAME = "fair"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default="/work/shared/data/cifar10")
    p.add_argument("--limit", type=int, default=2000,
                   help="training images (first N of train.npz), before --val-fraction")
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--test-limit", type=int, default=5000)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seed-epochs", type=int, default=6)
    p.add_argument("--epochs", type=int, default=2, help="epochs per growth stage")
    p.add_argument("--stages", type=int, default=3)
    p.add_argument("--retrain-epochs", type=int, default=8)
    p.add_argument("--post-split", default="restart")
    p.add_argument("--multipliers", default="1,1.5,2.5")
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--steps", default="flops,width,retrain-flops,random,retrain-random,vanilla,retrain-vanilla;"
                   "finetune,width-total",
                   help="phases (';') of steps (','): every seed runs phase 1, then phase 2, ...")
    p.add_argument("--fragment-only", action="store_true")
    p.add_argument("--out", default=f"bench/results/{NAME}")
    return p.parse_args(argv)


def base_config(args: argparse.Namespace, seed: int):
    from hwsplit.config import GrowConfig

    return GrowConfig(model="mobilenet_v1_cifar", dataset="npz", data_dir=args.data_dir, data_limit=args.limit,
                      test_limit=args.test_limit, val_fraction=args.val_fraction, post_split=args.post_split,
                      seed=seed, stages=args.stages, epochs=args.epochs, seed_epochs=args.seed_epochs, measure=False,
                      batch_size=args.batch_size)


ARMS = {"flops": {}, "vanilla": {"cost": "none"}, "random": {"selection": "random"}}


def _done(path: Path) -> bool:
    return (path / "DONE").exists()


def _mark(path: Path, t0: float) -> None:
    common.delete_checkpoints(path)  # the grow runs keep theirs: fine-tuning and retraining read them
    (path / "DONE").write_text(json.dumps({"wall_s": time.perf_counter() - t0, "at": common.now()}) + "\n")


def run_seed(args: argparse.Namespace, out: Path, seed: int, steps: list[str]) -> None:
    from hwsplit.baselines import parse_multipliers, width_baseline
    from hwsplit.finetune import finetune, stage_epochs_in_all
    from hwsplit.grow import grow

    root = out / f"s{seed}"
    base = base_config(args, seed)
    mults = parse_multipliers(args.multipliers)

    def arm_config(arm: str):
        return dataclasses.replace(base, **ARMS[arm])

    def grow_arm(arm: str) -> None:
        d = root / f"grow-{arm}"
        if _done(d):
            return
        t0 = time.perf_counter()
        if arm != "flops" and not (d / "config.json").exists():
            common.copy_seed(root / "grow-flops", d, arm_config(arm))
        grow(arm_config(arm), d, resume=(d / "config.json").exists(), overwrite=True)
        (d / "DONE").write_text(json.dumps({"wall_s": time.perf_counter() - t0, "at": common.now()}) + "\n")

    def widths(tag: str, epochs: int, chosen: list[float]) -> None:
        from hwsplit.errors import RunLocked

        for m in chosen:
            d = root / f"{tag}-x{m:g}"
            if _done(d):
                continue
            t0 = time.perf_counter()
            try:
                width_baseline(base, [m], d, epochs=epochs, overwrite=True)
            except RunLocked:
                log.info("seed %d: %s ×%g is being trained by another process: skipped", seed, tag, m)
                continue
            _mark(d, t0)
            log.info("seed %d: %s ×%g done in %.0f s", seed, tag, m, time.perf_counter() - t0)

    def retrain(arm: str, from_scratch: bool = True, stages: list[int] | None = None) -> None:
        """Each stage into its own ``grow-<arm>/retrain-<k>/`` (or ``finetune-<k>``), so that processes can share
        the work (``--steps retrain-flops:2``); a stage another process holds is skipped."""
        from hwsplit.errors import RunLocked

        src = root / f"grow-{arm}"
        sub = "retrain" if from_scratch else "finetune"
        recs = common.records(src)
        chosen = stages if stages is not None else [r["stage"] for r in recs[1:]]
        for k in chosen:
            d = src / f"{sub}-{k}"
            if _done(d) or (_done(src / sub) and k in [r["source_stage"] for r in _recs(src / sub)]):
                continue
            t0 = time.perf_counter()
            try:
                finetune(src, epochs=args.retrain_epochs, stages=[k], from_scratch=from_scratch, out=d)
            except RunLocked:
                log.info("seed %d: %s stage %d is being trained by another process: skipped", seed, sub, k)
                continue
            _mark(d, t0)

    for step in steps:
        t0 = time.perf_counter()
        if step == "flops":
            d = root / "grow-flops"
            if not _done(d):
                grow(arm_config("flops"), d, resume=(d / "config.json").exists(), overwrite=True)
                (d / "DONE").write_text(json.dumps({"at": common.now()}) + "\n")
        elif step == "width" or step.startswith("width:"):  # width:M trains only multiplier M
            widths("width", args.retrain_epochs, mults if step == "width" else [float(step.split(":")[1])])
        elif step.startswith("retrain-"):  # retrain-ARM[:K]
            arm, _, k = step.split("-", 1)[1].partition(":")
            retrain(arm, stages=[int(k)] if k else None)
        elif step in ("random", "vanilla"):
            grow_arm(step)
        elif step == "finetune":
            last = common.records(root / "grow-flops")[-1]["stage"]
            retrain("flops", from_scratch=False, stages=[last])
        elif step == "width-total":
            last = common.records(root / "grow-flops")[-1]["stage"]
            total = stage_epochs_in_all(base, last) + args.retrain_epochs
            ft = common.records(root / "grow-flops" / f"finetune-{last}")
            # the multipliers that bracket the fine-tuned network's MACs (no extrapolation needed)
            width_macs = {r["width_mult"]: r["macs"] for m in mults for r in common.records(root / f"width-x{m:g}")}
            below = [m for m in mults if width_macs.get(m, math.inf) <= ft[-1]["macs"]]
            above = [m for m in mults if width_macs.get(m, 0) >= ft[-1]["macs"]]
            chosen = sorted({max(below, default=mults[0]), min(above, default=mults[-1])})
            widths(f"width{total}", total, chosen)
        else:
            raise SystemExit(f"unknown step {step!r}")
        log.info("seed %d: step %s finished (%.0f s)", seed, step, time.perf_counter() - t0)
        summarise(out, args)


# ------------------------------------------------------------------------------------------------
# analysis
# ------------------------------------------------------------------------------------------------

def _recs(path: Path) -> list[dict]:
    return common.records(path) if (path / "stages.jsonl").exists() else []


def _derived(src: Path, sub: str) -> list[dict]:
    """Completed ``sub`` records of a grow run: ``src/sub`` (all stages in one) and ``src/sub-K`` (one each)."""
    recs = {r["source_stage"]: r for r in (_recs(src / sub) if _done(src / sub) else [])}
    for d in sorted(src.glob(f"{sub}-*")):
        if _done(d):
            recs.update({r["source_stage"]: r for r in _recs(d)})
    return [recs[k] for k in sorted(recs)]


def _width_curve(root: Path, tag: str) -> list[dict]:
    recs = [r for d in sorted(root.glob(f"{tag}-x*")) if _done(d) for r in _recs(d)]
    return sorted(recs, key=lambda r: r["macs"])


def _interp(curve: list[dict], macs: float) -> float | None:
    return common.interpolate([(math.log10(r["macs"]), r["test_top1"]) for r in curve], math.log10(macs))


def _compare(points: list[dict], curve: list[dict], n_test: int) -> list[dict]:
    out = []
    for r in points:
        y = _interp(curve, r["macs"])
        if y is None:
            continue
        se = math.sqrt(2) * common.accuracy_se(r["test_top1"], n_test)
        out.append({"stage": r.get("source_stage", r["stage"]), "macs": r["macs"], "acc": r["test_top1"], "other": y,
                    "diff": r["test_top1"] - y, "two_se": 2 * se})
    return out


def summarise(out: Path, args: argparse.Namespace) -> dict:
    seeds = [int(s) for s in args.seeds.split(",")]
    result: dict = {"args": vars(args), "seeds": {}}
    for seed in seeds:
        root = out / f"s{seed}"
        if not root.exists():
            continue
        n_test = args.test_limit
        width = _width_curve(root, "width")
        s: dict = {"width": [{"width_mult": r["width_mult"], "macs": r["macs"], "test_top1": r["test_top1"],
                              "epochs": r["epochs"]} for r in width]}
        for arm in ARMS:
            g = root / f"grow-{arm}"
            grown = _recs(g) if _done(g) or arm == "flops" else []
            rt = _derived(g, "retrain")
            s[arm] = {"grown": [{"stage": r["stage"], "macs": r["macs"], "test_top1": r["test_top1"],
                                 "val_top1": r.get("val_top1")} for r in grown],
                      "retrained": [{"stage": r["source_stage"], "macs": r["macs"], "test_top1": r["test_top1"],
                                     "val_top1": r.get("val_top1")} for r in rt],
                      "retrained_vs_width": _compare(rt, width, n_test)}
        # claim 2: energy-aware (flops) vs vanilla, both retrained; each arm's points on the other's curve
        rt_f, rt_v = _derived(root / "grow-flops", "retrain"), _derived(root / "grow-vanilla", "retrain")
        seed_rt = [r for r in width if r["width_mult"] == 1.0]  # the seed architecture retrained = width × 1
        if rt_f and rt_v:
            s["flops_vs_vanilla"] = _compare(rt_f, sorted(seed_rt + rt_v, key=lambda r: r["macs"]), n_test)
        rt_r = _derived(root / "grow-random", "retrain")
        if rt_f and rt_r:
            s["flops_vs_random"] = _compare(rt_f, sorted(seed_rt + rt_r, key=lambda r: r["macs"]), n_test)
        ft = _derived(root / "grow-flops", "finetune")
        if ft:
            total = ft[-1]["epochs_in_all"]
            wt = _width_curve(root, f"width{total}")
            s["finetuned"] = {"epochs_in_all": total, "macs": ft[-1]["macs"], "test_top1": ft[-1]["test_top1"],
                              "width_same_epochs": [{"width_mult": r["width_mult"], "macs": r["macs"],
                                                     "test_top1": r["test_top1"]} for r in wt],
                              "vs_width": _compare(ft, wt, n_test)}
        result["seeds"][seed] = s
    # across seeds: the mean difference at each comparison, with 2 SE = 2 √(Σ SE_s²) / n_seeds (test-set noise)
    agg: dict = {}
    for key in ("flops", "random", "vanilla"):
        agg[f"{key}_retrained_vs_width"] = _aggregate([s[key]["retrained_vs_width"] for s in result["seeds"].values()
                                                       if key in s])
    for key in ("flops_vs_vanilla", "flops_vs_random"):
        agg[key] = _aggregate([s[key] for s in result["seeds"].values() if key in s])
    agg["finetuned_vs_width"] = _aggregate([s["finetuned"]["vs_width"] for s in result["seeds"].values()
                                            if "finetuned" in s])
    result["aggregate"] = agg
    common.save_json(out / "summary.json", result)
    out.with_suffix(".md").write_text(fragment(result, args), encoding="utf-8")
    return result


def _aggregate(per_seed: list[list[dict]]) -> dict:
    """Per comparison index (grown stage): mean diff over the seeds that have it, and its 2 SE."""
    by_stage: dict[int, list[dict]] = {}
    for comps in per_seed:
        for c in comps:
            by_stage.setdefault(c["stage"], []).append(c)
    out = {}
    for stage, cs in sorted(by_stage.items()):
        n = len(cs)
        out[stage] = {"n_seeds": n, "diff": statistics.mean(c["diff"] for c in cs),
                      "two_se": math.sqrt(sum(c["two_se"] ** 2 for c in cs)) / n,
                      "macs": statistics.mean(c["macs"] for c in cs),
                      "diffs": [c["diff"] for c in cs]}
    return out


def _verdict_line(name: str, agg: dict) -> str:
    if not agg:
        return f"- {name}: no comparison yet"
    parts, ahead, behind = [], 0, 0
    for stage, a in agg.items():
        parts.append(f"stage {stage} ({common.fmt_num(a['macs'])} MACs, {a['n_seeds']} seed(s)): "
                     f"{100 * a['diff']:+.2f} ± {100 * a['two_se']:.2f}")
        ahead += a["diff"] > a["two_se"]
        behind += a["diff"] < -a["two_se"]
    return (f"- {name}: " + "; ".join(parts) + f" — ahead beyond 2 SE at {ahead}, behind beyond 2 SE at {behind} "
            f"of {len(agg)}")


def fragment(result: dict, args: argparse.Namespace) -> str:
    lines = ["## Fair protocol (issue 12): claims 2 and 3", "",
             "- command: `python bench/bench_fair.py " + " ".join(
                 f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k not in ("fragment_only", "steps"))
             + "`", f"- machine: {common.machine_line(common.machine())}",
             f"- rebuilt: {common.now()}",
             f"- data: CIFAR-10 (`{args.data_dir}`), first {args.limit} training images, of which "
             f"{args.val_fraction:g} carved out (seeded) as validation (recorded, not used: nothing is chosen "
             f"here); the first {args.test_limit} test images",
             f"- growth: seed {args.seed_epochs} epochs, {args.stages} stages × {args.epochs} epochs, growth ratio "
             f"0.5, post-split policy `{args.post_split}`; arms flops (LP), vanilla (cost none), random "
             "(selection random, MACs budget), sharing one trained seed",
             f"- comparison schedule: every grown stage and every width multiplier trained from scratch for "
             f"{args.retrain_epochs} epochs (one cosine from lr 0.1, batch {args.batch_size}); the fine-tuned last "
             "flops stage against width multipliers trained from scratch for the same total epochs",
             "- differences in points of test top-1 at matched MACs (interpolated on log10 MACs), mean over the "
             "seeds that have the point, ± 2 SE of the test-set noise", ""]
    agg = result["aggregate"]
    lines += ["### Verdict lines", "",
              _verdict_line("claim 3, retrained grown (flops) − width", agg["flops_retrained_vs_width"]),
              _verdict_line("claim 3, retrained random-selection − width", agg["random_retrained_vs_width"]),
              _verdict_line("claim 3, retrained flops − retrained random (random arm's curve incl. the seed)",
                            agg["flops_vs_random"]),
              _verdict_line("claim 3, fine-tuned flops − width trained as many epochs", agg["finetuned_vs_width"]),
              _verdict_line("claim 2, retrained flops − retrained vanilla (vanilla curve incl. the seed)",
                            agg["flops_vs_vanilla"]),
              _verdict_line("(diagnostic) retrained vanilla − width", agg["vanilla_retrained_vs_width"]), ""]
    lines += ["### Per seed", ""]
    for seed, s in result["seeds"].items():
        rows = [["network", "test top-1 (%)", "val top-1 (%)", "MACs"]]
        for r in s["width"]:
            rows.append([f"width × {r['width_mult']:g} ({r['epochs']} ep.)", f"{100 * r['test_top1']:.2f}", "-",
                         common.fmt_num(r["macs"])])
        for arm in ARMS:
            for r in s[arm]["grown"]:
                rows.append([f"{arm} grown, stage {r['stage']}", f"{100 * r['test_top1']:.2f}",
                             f"{100 * r['val_top1']:.2f}" if r.get("val_top1") is not None else "-",
                             common.fmt_num(r["macs"])])
            for r in s[arm]["retrained"]:
                rows.append([f"{arm} stage {r['stage']} retrained ({args.retrain_epochs} ep.)",
                             f"{100 * r['test_top1']:.2f}",
                             f"{100 * r['val_top1']:.2f}" if r.get("val_top1") is not None else "-",
                             common.fmt_num(r["macs"])])
        if "finetuned" in s:
            f = s["finetuned"]
            rows.append([f"flops last stage fine-tuned ({f['epochs_in_all']} ep. in all)",
                         f"{100 * f['test_top1']:.2f}", "-", common.fmt_num(f["macs"])])
            for r in f["width_same_epochs"]:
                rows.append([f"width × {r['width_mult']:g} ({f['epochs_in_all']} ep.)", f"{100 * r['test_top1']:.2f}",
                             "-", common.fmt_num(r["macs"])])
        lines += [f"Seed {seed}:", "", common.md_table(rows), ""]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    args = parse_args(argv)
    common.prepare_process(1, 0)
    out = common.resolve(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.fragment_only:
        summarise(out, args)
        return
    for phase in args.steps.split(";"):  # the core comparison for every seed first, then the other arms
        for seed in [int(s) for s in args.seeds.split(",")]:
            run_seed(args, out, seed, phase.split(","))
    summarise(out, args)


if __name__ == "__main__":
    main()
