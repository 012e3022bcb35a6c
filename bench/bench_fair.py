"""Claims 2, 3 and 4 of BENCHMARKS.md under the paper's comparison protocol (issue 12).

    python bench/bench_fair.py --seeds 0,1         # BENCHMARKS.md's run (the defaults): claims 2 and 3
    python bench/bench_fair.py --fragment-only                     # rebuild the tables from what is done
    # claim 4 (issues 11 and 12): lut vs flops, both in blocks of the profile's channel block, then the
    # latency of every compared architecture on a quiet core
    python bench/bench_fair.py --claim4 --channel-multiple auto --out bench/results/fair_hardware
    taskset -c 1 python bench/bench_fair.py --claim4 --channel-multiple auto \
        --out bench/results/fair_hardware --steps measure
    # the full-scale run (issues 25 and 27; 2 single-threaded workers), then its latency axis on a quiet core
    python bench/bench_fair.py --preset full --jobs 2
    taskset -c 1 python bench/bench_fair.py --preset full --steps measure      # the seeds of --seeds
    # the same architectures retrained on a longer schedule: the grow runs and the widths already trained that
    # long are taken from the 30-epoch run
    python bench/bench_fair.py --preset full --retrain-epochs 65 --out bench/results/fair_full65 \
        --grown-from bench/results/fair_full --seeds 0 --steps "retrain-flops,width"

Claim 4 (``--claim4``: steps ``flops,lut,width,retrain-flops,retrain-lut``): the same protocol with the ``lut``
arm (cost ``lut`` of ``--profile``) beside ``flops``, every network (seed, both arms, width multipliers) rounded
to ``--channel-multiple``; step ``measure`` times every compared architecture end to end
(``cost_models.profiling.measure.measure_model``, onnxruntime, 1 thread, ``--measure-time`` s per measurement,
``--measure-passes`` interleaved passes, their median; the spread is reported)
into ``<out>/latency.json``; the comparisons are at matched
*measured* latency (interpolated on log10 ms). The latency of a network is its architecture's, so the grown
stage's checkpoint stands for its retrained copy.

Step ``measure`` works for any arms (``fair_latency.compared_architectures``: width multipliers, every arm's grown
stages and their retrained and fine-tuned copies, the pruned networks fine-tuned and retrained, each architecture
once) on the seeds of ``--seeds``; it is resumable (``latency.json`` is saved after every pass) and refuses
``--jobs``, and to add to a ``latency.json`` of another machine (another CPU model, or two of its networks timed
again off their recorded latency by more than ±10 %: ``fair_latency.check_same_machine``). Whenever
``<out>/latency.json`` exists, the summary adds, beside the MACs comparisons, retrained
flops − width, retrained authors − width and retrained flops − each pruning method (fine-tuned and retrained) at
matched measured latency, over the networks that have one, and
``<out>/accuracy_vs_latency.png`` beside ``accuracy_vs_macs.png``.

The architecture is what is compared, not the schedule it grew under (Wang et al. 2019, code
``main_finetune.py``): every compared network is **retrained from scratch on the same schedule**
(``--retrain-epochs`` of one cosine, ``hwsplit.run.finetune.finetune(from_scratch=True)`` for grown stages,
``hwsplit.run.baselines.width_baseline`` for width multipliers), and the **fine-tuned** final grown network
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
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import fair_compare as fc  # noqa: E402
import fair_latency as fl  # noqa: E402
import fair_report as fr  # noqa: E402
from common import log  # noqa: E402
from fair_arms import (  # noqa: E402
    ARMS,
    GROW_STEPS,
    LATENCY_COMPARISONS,
    PRUNE_METHODS,
    VALIDATION_ARMS,
    arm_overrides,
    base_config,
)

NAME = "fair"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default="../shared/data/cifar10", help="relative paths are from the current directory")
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
    p.add_argument("--claim4", action="store_true",
                   help="claim 4: arms flops and lut (default steps flops,lut,width,retrain-flops,retrain-lut)")
    p.add_argument("--profile", default="profiles/cpu-amd-epyc-1t-onnxruntime.json", help="the lut arm's profile")
    p.add_argument("--channel-multiple", default=None, metavar="N|auto",
                   help="every network in multiples of N channels; auto: the channel_block of --profile")
    p.add_argument("--measure-time", type=float, default=1.0, help="seconds per latency measurement (step measure)")
    p.add_argument("--measure-passes", type=int, default=3,
                   help="measurements per network (step measure), in interleaved passes; the latency is their median")
    p.add_argument("--prune-width-mult", type=float, default=None,
                   help="width multiplier of the network the prune arms prune (default: the smallest multiple of 0.5 "
                        "wider than every grown stage in every layer)")
    p.add_argument("--fragment-only", action="store_true")
    p.add_argument("--grown-from", default=None, metavar="OUT",
                   help="start from another results directory of the same protocol: its finished grow runs, its "
                        "width multipliers trained for --retrain-epochs and its latency.json (a longer schedule "
                        "retrains the same architectures)")
    p.add_argument("--jobs", type=int, default=1,
                   help="worker processes of one thread each; steps are split into jobs (one network each) and run "
                        "as soon as what they need is done")
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="full: all of CIFAR-10 (5,000 training images held out for validation, the 10,000 test "
                        "images), batch 128, 30 retraining epochs, 3 seeds; options given explicitly override it")
    p.add_argument("--out", default=None, help=f"default bench/results/{NAME} (with --preset P: {NAME}_P)")
    given = argv if argv is not None else sys.argv[1:]
    args = p.parse_args(argv)
    if args.preset:
        for key, value in PRESETS[args.preset].items():
            if f"--{key.replace('_', '-')}" not in given:
                setattr(args, key, value)
    if args.out is None:
        args.out = f"bench/results/{NAME}" + (f"_{args.preset}" if args.preset else "")
    if args.claim4 and "--steps" not in " ".join(given):
        args.steps = "flops,lut,width,retrain-flops,retrain-lut"
    return args


#: The full-scale protocol (issue 25): every image, a schedule long enough to converge, 3 seeds.
PRESETS = {"full": {"limit": None, "val_fraction": 0.1, "test_limit": None, "batch_size": 128, "seed_epochs": 15,
                    "epochs": 5, "stages": 4, "retrain_epochs": 30, "multipliers": "1,1.25,1.5,1.75,2,2.5,3",
                    "seeds": "0,1,2", "profile": "profiles/cpu-intel-xeon-1t-onnxruntime.json",
                    # the library's rule (every layer as wide as every grown stage's) asks x9.5 here (a late layer of
                    # the flops arm grows to 9x the seed's): ~50M MACs, hours of one core for each wide network;
                    # x4 (~4.8M MACs) is about twice the largest grown stage, as a practitioner prunes
                    "prune_width_mult": 4.0,
                    "steps": "flops,authors,aligned,retrain-flops,width,retrain-authors,retrain-aligned,"
                             "lut,retrain-lut;random,retrain-random;finetune,width-total;prune-slimming,prune-l1"}}


def _mark(path: Path, t0: float) -> None:
    common.delete_checkpoints(path)  # the grow runs keep theirs: fine-tuning and retraining read them
    (path / "DONE").write_text(json.dumps({"wall_s": time.perf_counter() - t0, "at": common.now()}) + "\n")


def import_grown(src: Path, dst: Path, epochs: int) -> list[str]:
    """Copy into ``dst`` (one seed's directory) what ``src`` (the same seed under another ``--out``) has finished and
    a schedule of ``epochs`` retraining epochs can share: every ``grow-<arm>`` with ``DONE`` (its stages and
    checkpoints, not its ``retrain-*``/``finetune-*``, which belong to the other schedule) and every width multiplier
    trained ``epochs`` epochs (``width-x<m>`` or ``width<epochs>-x<m>`` of step ``width-total``), as
    ``width-x<m>``. What ``dst`` already has is kept. Returns the names written, in ``dst``."""
    copied: list[str] = []
    if not src.is_dir():
        return copied
    dst.mkdir(parents=True, exist_ok=True)
    for d in sorted(src.iterdir()):
        if not fc.done(d):
            continue
        if d.name.startswith("grow-"):
            target = dst / d.name
            if target.exists():
                continue
            target.mkdir()
            for f in d.iterdir():
                if f.is_file() and f.name != ".lock" and not f.name.startswith("partial-"):
                    shutil.copy2(f, target / f.name)
            copied.append(d.name)
        elif d.name.startswith("width"):
            tag, _, mult = d.name.partition("-x")
            recs = fc.records(d)
            if tag not in ("width", f"width{epochs}") or not recs or recs[-1].get("epochs") != epochs:
                continue
            target = dst / f"width-x{mult}"
            if target.exists():
                continue
            shutil.copytree(d, target, ignore=shutil.ignore_patterns(".lock", "partial-*"))
            copied.append(target.name)
    return copied


def run_seed(args: argparse.Namespace, out: Path, seed: int, steps: list[str], *, summarise_after: bool = True) -> None:
    from hwsplit.run.baselines import parse_multipliers, width_baseline
    from hwsplit.run.config import stage_epochs_in_all
    from hwsplit.run.finetune import finetune
    from hwsplit.run.grow import grow

    root = out / f"s{seed}"
    base = base_config(args, seed)
    mults = parse_multipliers(args.multipliers)

    def arm_config(arm: str):
        return dataclasses.replace(base, **arm_overrides(arm, args))

    def grow_arm(arm: str) -> None:
        d = root / f"grow-{arm}"
        if fc.done(d):
            return
        t0 = time.perf_counter()
        if arm != "flops" and not (d / "config.json").exists():
            common.copy_seed(root / "grow-flops", d, arm_config(arm))
        grow(arm_config(arm), d, resume=(d / "config.json").exists(), overwrite=True)
        (d / "DONE").write_text(json.dumps({"wall_s": time.perf_counter() - t0, "at": common.now()}) + "\n")

    def widths(tag: str, epochs: int, chosen: list[float]) -> None:
        from hwsplit.infra.errors import RunLocked

        for m in chosen:
            d = root / f"{tag}-x{m:g}"
            if fc.done(d):
                continue
            t0 = time.perf_counter()
            try:
                width_baseline(base, [m], d, epochs=epochs, overwrite=True)
            except RunLocked:
                log.info("seed %d: %s ×%g is being trained by another process: skipped", seed, tag, m)
                continue
            _mark(d, t0)
            log.info("seed %d: %s ×%g done in %.0f s", seed, tag, m, time.perf_counter() - t0)

    def grown(arm: str) -> bool:
        """Whether ``grow-<arm>`` is finished; a step that needs its stages is skipped (with a log line) while another
        process grows it — its list of stages is not final yet."""
        if _grow_done(root, arm):
            return True
        log.warning("seed %d: grow-%s is not finished (another process may be growing it): skipped; run the step "
                    "again once it is", seed, arm)
        return False

    def retrain(arm: str, from_scratch: bool = True, stages: list[int] | None = None) -> None:
        """Each stage into its own ``grow-<arm>/retrain-<k>/`` (or ``finetune-<k>``), so that processes can share
        the work (``--steps retrain-flops:2``); a stage another process holds is skipped."""
        from hwsplit.infra.errors import RunLocked

        src = root / f"grow-{arm}"
        if stages is None and not grown(arm):
            return
        sub = "retrain" if from_scratch else "finetune"
        recs = common.records(src)
        chosen = stages if stages is not None else [r["stage"] for r in recs[1:]]
        for k in chosen:
            d = src / f"{sub}-{k}"
            if fc.done(d) or (fc.done(src / sub) and k in [r["source_stage"] for r in fc.records(src / sub)]):
                continue
            t0 = time.perf_counter()
            try:
                # overwrite: a directory this job left unfinished under another version of its config.json is
                # started over; the same config.json continues (from the last epoch of the network in training)
                finetune(src, epochs=args.retrain_epochs, stages=[k], from_scratch=from_scratch, out=d, overwrite=True)
            except RunLocked:
                log.info("seed %d: %s stage %d is being trained by another process: skipped", seed, sub, k)
                continue
            _mark(d, t0)

    def prune_arm(method: str) -> None:
        """The wide network (the library's width rule: wider than every grown stage), pruned to each flops stage's
        cost, fine-tuned and retrained from scratch for ``--retrain-epochs`` each (one job: one wide network)."""
        from hwsplit.run.prune import prune_baseline

        d = root / f"prune-{method}"
        if fc.done(d) or not grown("flops"):
            return
        t0 = time.perf_counter()
        prune_baseline(root / "grow-flops", method=method, out=d, train_epochs=args.retrain_epochs,
                       finetune_epochs=args.retrain_epochs, width_mult=args.prune_width_mult, from_scratch=True,
                       overwrite=True)
        (d / "DONE").write_text(json.dumps({"wall_s": time.perf_counter() - t0, "at": common.now()}) + "\n")

    for step in steps:
        t0 = time.perf_counter()
        if step == "flops":
            d = root / "grow-flops"
            if not fc.done(d):
                grow(arm_config("flops"), d, resume=(d / "config.json").exists(), overwrite=True)
                (d / "DONE").write_text(json.dumps({"at": common.now()}) + "\n")
        elif step == "width" or step.startswith("width:"):  # width:M trains only multiplier M
            widths("width", args.retrain_epochs, mults if step == "width" else [float(step.split(":")[1])])
        elif step.startswith("retrain-"):  # retrain-ARM[:K]
            arm, _, k = step.split("-", 1)[1].partition(":")
            retrain(arm, stages=[int(k)] if k else None)
        elif step in GROW_STEPS and step != "flops":
            grow_arm(step)
        elif step.startswith("prune-"):  # issue 27: Torch-Pruning of a wide network to each flops stage's MACs
            prune_arm(step.split("-", 1)[1])
        elif step == "measure":
            fl.measure_latency(out, root, args)
        elif step == "finetune":
            if grown("flops"):
                last = common.records(root / "grow-flops")[-1]["stage"]
                retrain("flops", from_scratch=False, stages=[last])
        elif step == "width-total":
            if grown("flops"):
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
        if summarise_after:
            summarise(out, args)


# ------------------------------------------------------------------------------------------------
# analysis
# ------------------------------------------------------------------------------------------------


# ------------------------------------------------------------------------------------------------
# claim 4: measured latency of every compared architecture
# ------------------------------------------------------------------------------------------------


def summarise(out: Path, args: argparse.Namespace) -> dict:
    seeds = [int(s) for s in args.seeds.split(",")]
    result: dict = {"args": vars(args), "seeds": {}}
    lat_path = out / "latency.json"
    lat_table = json.loads(lat_path.read_text()) if lat_path.exists() else {}
    lat = lat_table.get("networks", {})
    if lat_table:
        sessions = lat_table.get("sessions", [])
        result["latency"] = {"networks": sum(1 for n in lat.values() if n.get("latency_ms") is not None),
                             "tolerance": fl.resolution(lat),
                             "incomplete": sum(1 for n in lat.values() if n.get("latency_ms") is None),
                             "machines": fl.machines(lat_table),
                             "sessions": [{f: x.get(f) for f in ("date", "load_before", "load_after", "networks")}
                                          for x in sessions]}

    def ms(r: dict) -> dict:  # the measured latency of a record's architecture, where the table has it
        return {"latency_ms": fl.latency_of(r, lat)}

    for seed in seeds:
        root = out / f"s{seed}"
        if not root.exists():
            continue
        n_test = args.test_limit or 10_000  # None: the whole CIFAR-10 test set
        width = fc.width_curve(root, "width")
        s: dict = {"width": [{"width_mult": r["width_mult"], "macs": r["macs"], "test_top1": r["test_top1"],
                              "val_top1": r.get("val_top1"), "epochs": r["epochs"], **ms(r)} for r in width]}
        s["compute"] = fr.compute(root, args)
        for arm in ARMS:
            g = root / f"grow-{arm}"
            grown = fc.records(g) if fc.done(g) or arm == "flops" else []
            rt = fc.derived(g, "retrain")
            s[arm] = {"grown": [{"stage": r["stage"], "macs": r["macs"], "test_top1": r["test_top1"],
                                 "val_top1": r.get("val_top1"), **ms(r)} for r in grown],
                      "retrained": [{"stage": r["source_stage"], "macs": r["macs"], "test_top1": r["test_top1"],
                                     "val_top1": r.get("val_top1"), **ms(r)} for r in rt],
                      "retrained_vs_width": fc.compare(rt, width, n_test)}
        # claim 2: energy-aware (flops) vs vanilla, both retrained; each arm's points on the other's curve
        rt_f, rt_v = fc.derived(root / "grow-flops", "retrain"), fc.derived(root / "grow-vanilla", "retrain")
        seed_rt = [r for r in width if r["width_mult"] == 1.0]  # the seed architecture retrained = width × 1
        if rt_f and rt_v:
            s["flops_vs_vanilla"] = fc.compare(rt_f, sorted(seed_rt + rt_v, key=lambda r: r["macs"]), n_test)
        curves_of: dict[str, list[dict]] = {"width": width}  # the curves of the latency comparisons, as records
        for method in PRUNE_METHODS:  # issue 27: pruned (fine-tuned; retrained from scratch) vs retrained flops
            d = root / f"prune-{method}"
            if not fc.records(d):  # shown as its targets finish (a pruning run is one long job)
                continue
            pruned = [r for r in fc.records(d) if r["stage"] >= 1]
            # the retrained networks are shown as they finish; compared once every pruned architecture has one (a
            # partial curve's latency front would compare every network with its few points)
            retrained_so_far = fc.records(d / "retrain")
            retrained = retrained_so_far if fc.done(d) else []
            curves_of[f"prune-{method}"], curves_of[f"prune-{method}_retrained"] = pruned, retrained
            target = {r["stage"]: r.get("target_stage", r["stage"]) for r in pruned}
            s[f"prune-{method}"] = {
                "wide": [{"macs": r["macs"], "test_top1": r["test_top1"], "width_mult": r.get("wide_width_mult"),
                          **ms(r)} for r in fc.records(d) if r["stage"] == 0],
                "finetuned": [{"stage": r.get("target_stage", r["stage"]), "macs": r["macs"],
                               "test_top1": r["test_top1"], "val_top1": r.get("val_top1"),
                               "epochs_in_all": r.get("epochs_in_all"), **ms(r)} for r in pruned],
                # a retrained record's source_stage is the pruning run's stage; name it by the grown stage it targets
                "retrained": [{"stage": target.get(r.get("source_stage"), r.get("source_stage")), "macs": r["macs"],
                               "test_top1": r["test_top1"], "val_top1": r.get("val_top1"), **ms(r)}
                              for r in retrained_so_far]}
            if rt_f:
                s[f"flops_vs_prune_{method}"] = fc.compare(rt_f, sorted(pruned, key=lambda r: r["macs"]), n_test)
                if retrained:
                    s[f"flops_vs_prune_{method}_retrained"] = fc.compare(
                        rt_f, sorted(retrained, key=lambda r: r["macs"]), n_test)
        n_val = round((args.limit or 50_000) * args.val_fraction)
        flops_curve = sorted(seed_rt + rt_f, key=lambda r: r["macs"])
        for arm in VALIDATION_ARMS:  # issue 26: each setting against today's default, on validation (it chooses)
            rt_a = fc.derived(root / f"grow-{arm}", "retrain")
            if rt_f and rt_a:
                s[f"{arm}_vs_flops_val"] = fc.compare(rt_a, flops_curve, n_val, metric="val_top1")
                s[f"flops_vs_{arm}_val"] = fc.compare(rt_f, sorted(seed_rt + rt_a, key=lambda r: r["macs"]), n_val,
                                                      metric="val_top1")
                s[f"{arm}_vs_flops"] = fc.compare(rt_a, flops_curve, n_test)
        rt_r = fc.derived(root / "grow-random", "retrain")
        if rt_f and rt_r:
            s["flops_vs_random"] = fc.compare(rt_f, sorted(seed_rt + rt_r, key=lambda r: r["macs"]), n_test)
        ft = fc.derived(root / "grow-flops", "finetune")
        if ft:
            total = ft[-1]["epochs_in_all"]
            wt = fc.width_curve(root, f"width{total}")
            s["finetuned"] = {"epochs_in_all": total, "macs": ft[-1]["macs"], "test_top1": ft[-1]["test_top1"],
                              "val_top1": ft[-1].get("val_top1"), **ms(ft[-1]),
                              "width_same_epochs": [{"width_mult": r["width_mult"], "macs": r["macs"],
                                                     "test_top1": r["test_top1"], "val_top1": r.get("val_top1"),
                                                     **ms(r)} for r in wt],
                              "vs_width": fc.compare(ft, wt, n_test)}
            # issue 26's final_init: the same final epochs from the grown weights against from a fresh initialisation
            fresh = [r for r in rt_f if r.get("source_stage") == ft[-1].get("source_stage")]
            if fresh and ft[-1].get("val_top1") is not None and fresh[0].get("val_top1") is not None:
                s["final_init_val"] = [fc.comparison(ft[-1], fresh[0]["val_top1"], n_val, "macs", "val_top1")]
        if lat_table:  # at matched measured latency (issue 25): only the networks whose architecture was timed
            s["latency"] = {}
            for key, (arm, curve) in LATENCY_COMPARISONS.items():
                points = fc.derived(root / f"grow-{arm}", "retrain")
                if points and curves_of.get(curve):
                    s["latency"][key] = fc.compare_front(fl.with_latency(points, lat),
                                                         fc.front(fl.with_latency(curves_of[curve], lat)), n_test,
                                                         tolerance=result["latency"]["tolerance"])
        rt_l = fc.derived(root / "grow-lut", "retrain")
        if rt_l and lat:  # claim 4: at matched measured latency
            width_l = fl.with_latency(width, lat)
            rt_l, rt_fl, seed_l = fl.with_latency(rt_l, lat), fl.with_latency(rt_f, lat), fl.with_latency(seed_rt, lat)
            flops_curve = sorted(seed_l + rt_fl, key=lambda r: r["latency_ms"] or 0)
            lut_curve = sorted(seed_l + rt_l, key=lambda r: r["latency_ms"] or 0)
            s["claim4"] = {
                "lut_vs_flops": fc.compare(rt_l, flops_curve, n_test, "latency_ms"),
                "flops_vs_lut": fc.compare(rt_fl, lut_curve, n_test, "latency_ms"),
                "lut_vs_width": fc.compare(rt_l, width_l, n_test, "latency_ms"),
                "flops_vs_width": fc.compare(rt_fl, width_l, n_test, "latency_ms"),
                "networks": [{"name": name, "test_top1": r["test_top1"], "val_top1": r.get("val_top1"),
                              "macs": r["macs"], **{f: lat[fl.arch_key(r["architecture"])][f]
                                                    for f in ("passes_ms", "lut_predicted_ms")}}
                             for name, r in ([(f"width × {r['width_mult']:g}", r) for r in width]
                                             + [(f"flops stage {r['source_stage']}", r) for r in rt_fl]
                                             + [(f"lut stage {r['source_stage']}", r) for r in rt_l])
                             if fl.latency_of(r, lat) is not None]}
        if args.grown_from:  # the same networks under the other run's schedule
            s["schedule"] = _schedule(common.resolve(args.grown_from) / f"s{seed}", root, n_test)
        result["seeds"][seed] = s
    # across seeds: the mean difference at each comparison, with 2 SE = 2 √(Σ SE_s²) / n_seeds (test-set noise)
    agg: dict = {}
    for key in ARMS:
        agg[f"{key}_retrained_vs_width"] = fc.aggregate([s[key]["retrained_vs_width"] for s in result["seeds"].values()
                                                         if key in s])
    for key in ("flops_vs_vanilla", "flops_vs_random",
                *(f"{k}_val" for arm in VALIDATION_ARMS for k in (f"{arm}_vs_flops", f"flops_vs_{arm}")),
                *(f"{arm}_vs_flops" for arm in VALIDATION_ARMS), *(f"flops_vs_prune_{m}{suffix}" for m in PRUNE_METHODS
                                      for suffix in ("", "_retrained"))):
        agg[key] = fc.aggregate([s[key] for s in result["seeds"].values() if key in s])
    agg["schedule_flops_vs_width"] = fc.aggregate([s["schedule"]["flops_vs_width"] for s in result["seeds"].values()
                                                   if s.get("schedule")])
    agg["final_init_val"] = fc.aggregate([s["final_init_val"] for s in result["seeds"].values()
                                          if "final_init_val" in s])
    agg["finetuned_vs_width"] = fc.aggregate([s["finetuned"]["vs_width"] for s in result["seeds"].values()
                                              if "finetuned" in s])
    for key in ("lut_vs_flops", "flops_vs_lut", "lut_vs_width", "flops_vs_width"):
        agg[f"claim4_{key}"] = fc.aggregate([s["claim4"][key] for s in result["seeds"].values() if "claim4" in s])
    for key in LATENCY_COMPARISONS:
        agg[f"latency_{key}"] = fc.aggregate([s["latency"][key] for s in result["seeds"].values()
                                              if key in s.get("latency", {})])
    result["aggregate"] = agg
    result["curves"] = fr.curves(result)
    result["curves_latency"] = fr.curves(result, "latency_ms")
    common.save_json(out / "summary.json", result)
    out.with_suffix(".md").write_text(fr.fragment(result, args), encoding="utf-8")
    fr.plot(result, out)
    return result


def _schedule(src: Path, root: Path, n_test: int) -> dict:
    """The networks of ``root`` (one seed) that ``src`` (the same seed under ``--grown-from``'s schedule) also
    trained — width multipliers and retrained flops stages — side by side, with the gain of this schedule in points
    of test top-1 (2 SE: two test accuracies' binomial noise), and retrained flops − width at ``src``'s schedule (the
    verdict this run re-measures)."""
    pairs = []
    here = {r["width_mult"]: r for r in fc.width_curve(root, "width")}
    width_src = fc.width_curve(src, "width")
    for r in width_src:
        if r["width_mult"] in here:
            pairs.append((f"width × {r['width_mult']:g}", r, here[r["width_mult"]]))
    here = {r["source_stage"]: r for r in fc.derived(root / "grow-flops", "retrain")}
    rt_src = fc.derived(src / "grow-flops", "retrain")
    pairs += [(f"flops stage {r['source_stage']}", r, here[r["source_stage"]]) for r in rt_src
              if r["source_stage"] in here]
    networks = []
    for name, a, b in pairs:
        se = math.hypot(common.accuracy_se(a["test_top1"], n_test), common.accuracy_se(b["test_top1"], n_test))
        networks.append({"name": name, "macs": b["macs"], "epochs": [a["epochs"], b["epochs"]],
                         "test_top1": [a["test_top1"], b["test_top1"]],
                         "val_top1": [a.get("val_top1"), b.get("val_top1")],
                         "gain": b["test_top1"] - a["test_top1"], "two_se": 2 * se})
    return {"networks": networks, "flops_vs_width": fc.compare(rt_src, width_src, n_test)}


# ------------------------------------------------------------------------------------------------
# compute of each path, curves over seeds, plots
# ------------------------------------------------------------------------------------------------


# ------------------------------------------------------------------------------------------------
# --jobs: one network per job, run by worker processes as soon as what a job needs is done
# ------------------------------------------------------------------------------------------------


def _grow_done(root: Path, arm: str) -> bool:
    return fc.done(root / f"grow-{arm}")


def _expand(args: argparse.Namespace, root: Path, step: str) -> list[str] | None:
    """The jobs (single-network steps) of ``step`` for one seed; ``None`` while what it needs is not done."""
    from hwsplit.run.baselines import parse_multipliers

    if step in GROW_STEPS:
        return [step] if step == "flops" or _grow_done(root, "flops") else None
    if step == "width":
        return [f"width:{m:g}" for m in parse_multipliers(args.multipliers)]
    if step.startswith("retrain-") and ":" not in step:
        arm = step.split("-", 1)[1]
        if not _grow_done(root, arm):
            return None
        return [f"{step}:{r['stage']}" for r in common.records(root / f"grow-{arm}")[1:]]
    if step == "finetune" or step.startswith("prune-"):
        return [step] if _grow_done(root, "flops") else None
    if step == "width-total":  # needs the fine-tuned network and every width multiplier's MACs
        last = common.records(root / "grow-flops")[-1]["stage"] if _grow_done(root, "flops") else None
        ready = last is not None and fc.done(root / "grow-flops" / f"finetune-{last}") and all(
            fc.done(root / f"width-x{m:g}") for m in parse_multipliers(args.multipliers))
        return [step] if ready else None
    if step == "measure":
        raise SystemExit("step measure times networks: run it alone on a quiet core, without --jobs")
    return [step]


def _job(args: argparse.Namespace, out: Path, seed: int, step: str) -> tuple[int, str, float]:
    """One job in a worker process (one intra-op thread)."""
    import torch

    torch.set_num_threads(1)
    common.setup_logging(f"[s{seed} {step}] ")
    t0 = time.perf_counter()
    run_seed(args, out, seed, [step], summarise_after=False)
    return seed, step, time.perf_counter() - t0


def run_jobs(args: argparse.Namespace, out: Path) -> None:
    """Every phase's steps for every seed, split into single-network jobs, on ``args.jobs`` workers.

    A job starts when what it needs is done (a grow arm after the flops arm's seed, a stage's retraining after its
    grow run); ready jobs start in the order of the phases, then the seeds, then the steps (a step whose
    prerequisite finished late still goes before the later steps' jobs). Finished work is
    skipped (``DONE`` markers), and an interrupted training continues from its last epoch (the run directories'
    ``partial-K.pt``), so the same command continues after a kill.
    """
    import concurrent.futures as cf
    import multiprocessing as mp

    seeds = [int(x) for x in args.seeds.split(",")]
    pending = [(seed, step) for phase in args.steps.split(";") for seed in seeds for step in phase.split(",")]
    order = {job: i for i, job in enumerate(pending)}  # a job expanded later still starts in its step's place
    expanded: list[tuple[int, str]] = []
    running: dict[cf.Future, tuple[int, str]] = {}
    started: set[tuple[int, str]] = set()
    with cf.ProcessPoolExecutor(max_workers=args.jobs, mp_context=mp.get_context("spawn")) as pool:
        while pending or expanded or running:
            still = []
            for seed, step in pending:
                jobs = _expand(args, out / f"s{seed}", step)
                if jobs is None:
                    still.append((seed, step))
                else:
                    for j in jobs:
                        order.setdefault((seed, j), order[(seed, step)])
                    expanded += [(seed, j) for j in jobs]
            pending = still
            expanded.sort(key=lambda job: order[job])  # stable: a step's jobs keep their own order
            for job in list(expanded):
                if len(running) >= args.jobs:
                    break
                seed, step = job
                if step != "width-total" and _expand(args, out / f"s{seed}", step) is None:
                    continue
                expanded.remove(job)
                if job in started:
                    continue
                started.add(job)
                running[pool.submit(_job, args, out, seed, step)] = job
            if not running:
                if pending and not expanded:
                    raise SystemExit(f"jobs wait for work no job will do: {pending}")
                continue
            done, _ = cf.wait(running, return_when=cf.FIRST_COMPLETED)
            for fut in done:
                seed, step = running.pop(fut)
                try:
                    _, _, wall = fut.result()
                    log.info("seed %d: job %s finished in %.0f s", seed, step, wall)
                except Exception:
                    log.exception("seed %d: job %s failed; the others go on (run the command again to retry it)",
                                  seed, step)
                summarise(out, args)


def main(argv=None) -> None:
    args = parse_args(argv)
    common.prepare_process(1, 0)
    out = common.resolve(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.fragment_only:
        summarise(out, args)
        return
    log.info("machine: %s", common.machine_line(common.machine()))  # sittings may run on different machines
    if args.grown_from:
        src = common.resolve(args.grown_from)
        for seed in [int(s) for s in args.seeds.split(",")]:
            names = import_grown(src / f"s{seed}", out / f"s{seed}", args.retrain_epochs)
            if names:
                log.info("seed %d: from %s: %s", seed, args.grown_from, ", ".join(names))
        if (src / "latency.json").exists() and not (out / "latency.json").exists():
            shutil.copy2(src / "latency.json", out / "latency.json")  # keyed by architecture: the same networks
    if args.jobs > 1:
        run_jobs(args, out)
    else:
        for phase in args.steps.split(";"):  # the core comparison for every seed first, then the other arms
            for seed in [int(s) for s in args.seeds.split(",")]:
                run_seed(args, out, seed, phase.split(","))
    summarise(out, args)


if __name__ == "__main__":
    main()
