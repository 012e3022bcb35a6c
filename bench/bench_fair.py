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

Step ``measure`` works for any arms (``_compared_architectures``: width multipliers, every arm's grown stages and
their retrained and fine-tuned copies, the pruned networks fine-tuned and retrained, each architecture once) on the
seeds of ``--seeds``; it is resumable (``latency.json`` is saved after every pass) and refuses ``--jobs``. Whenever
``<out>/latency.json`` exists, the summary adds, beside the MACs comparisons, retrained flops − width, retrained
authors − width and retrained flops − each pruning method (fine-tuned and retrained) at matched measured latency,
over the networks that have one, and ``<out>/accuracy_vs_latency.png`` beside ``accuracy_vs_macs.png``.

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
import os
import shutil
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


def channel_multiple(args: argparse.Namespace) -> int | None:
    """``--channel-multiple`` as a number (``auto``: the profile's channel block), the same for every arm."""
    from hwsplit.run.config import GrowConfig, resolve_channel_multiple

    if args.channel_multiple is None:
        return None
    if args.channel_multiple != "auto":
        return int(args.channel_multiple)
    from cost_models.profile_io import load_profile

    path = str(common.resolve(args.profile))
    return resolve_channel_multiple(GrowConfig(cost="lut", cost_options={"profile": path}, channel_multiple="auto"),
                                    load_profile(path))


def base_config(args: argparse.Namespace, seed: int):
    from hwsplit.run.config import GrowConfig

    return GrowConfig(model="mobilenet_v1_cifar", dataset="npz", data_dir=args.data_dir, data_limit=args.limit,
                      test_limit=args.test_limit, val_fraction=args.val_fraction, post_split=args.post_split,
                      seed=seed, stages=args.stages, epochs=args.epochs, seed_epochs=args.seed_epochs, measure=False,
                      batch_size=args.batch_size, channel_multiple=channel_multiple(args),
                      max_widths=None)  # no width ceiling (as before the option existed); the authors arm sets its own


def _authors() -> dict:
    from hwsplit.run.config import recipe_settings

    return recipe_settings("authors", {})


ARMS = {"flops": {}, "vanilla": {"cost": "none"}, "random": {"selection": "random"}, "lut": {"cost": "lut"},
        # the selection recipe of the method's authors (issue 26): √ΔMACs price, group budgets, caps, β >= 0.99
        "authors": _authors,
        # the MACs price, growing in multiples of 4 channels: widths onnxruntime's blocked (NCHWc) kernels take on
        # an AVX-512 CPU (depthwise multiple 4), so the grown network runs as fast as its MACs allow; the CIFAR
        # seed's widths are multiples of 4 already, so it shares the flops arm's trained seed
        "aligned": {"channel_multiple": 4}}


#: The settings compared with today's default (the flops arm) on validation at matched MACs (issue 26).
VALIDATION_ARMS = ("authors", "aligned")

#: The pruning arms (issue 27), steps ``prune-<method>``.
PRUNE_METHODS = ("slimming", "l1")


def lut_multiple(args: argparse.Namespace) -> int:
    """The lut arm's channel multiple when ``--channel-multiple`` is not given (the full preset): the smallest
    multiple that puts every convolution of the profiled CPU on its blocked kernels — the profile's
    ``blocks.depthwise_multiple`` (4 on an AVX-512 CPU, as the ``aligned`` arm), else its ``channel_block``."""
    from cost_models.profile_io import channel_block, depthwise_multiple, load_profile

    profile = load_profile(str(common.resolve(args.profile)))
    return depthwise_multiple(profile) or channel_block(profile)


def lut_budget_ms(args: argparse.Namespace, channel_multiple: int | None) -> float:
    """The lut arm's total budget when ``--channel-multiple`` is not given (the full preset): the table's latency
    (ms) of the widest width multiplier. On a CPU where a channel costs far less latency than its MACs (small
    networks, overhead-bound), a budget of ``growth_ratio`` × the current latency per stage lets every layer grow
    to its per-stage cap; the widest multiplier's latency keeps the arm in the range the widths span and asks the
    user's question: the most accuracy at that latency."""
    import cost_models
    from hwsplit.network.families import build_seed
    from hwsplit.run.baselines import parse_multipliers

    model = build_seed("mobilenet_v1_cifar", {}, (3, 32, 32), 10, width_mult=max(parse_multipliers(args.multipliers)),
                       channel_multiple=channel_multiple)
    lut = cost_models.get_cost_model("lut", profile=str(common.resolve(args.profile)))
    return float(lut.total(model, (1, 3, 32, 32)))


def arm_overrides(arm: str, args: argparse.Namespace) -> dict:
    if arm == "lut":
        extra = {}
        if args.channel_multiple is None:
            n = lut_multiple(args)
            extra = {"channel_multiple": n, "budget": round(lut_budget_ms(args, n), 6)}
        return {**ARMS[arm], "cost_options": {"profile": str(common.resolve(args.profile))}, **extra}
    return ARMS[arm]() if callable(ARMS[arm]) else ARMS[arm]


def _done(path: Path) -> bool:
    return (path / "DONE").exists()


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
        if not _done(d):
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
            recs = _recs(d)
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
        if _done(d):
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
            if _done(d) or (_done(src / sub) and k in [r["source_stage"] for r in _recs(src / sub)]):
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
        if _done(d) or not grown("flops"):
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
            if not _done(d):
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
            measure_latency(out, root, args)
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


#: A point this far (relative) beyond a curve's end is compared with the end point: a pruned network lands up to 2 %
#: under its target by design, and a grown stage can end a few thousand MACs past the widest multiplier.
END_TOLERANCE = 0.02


def _interp(curve: list[dict], x: float, key: str = "macs", metric: str = "test_top1") -> float | None:
    pts = [(math.log10(r[key]), r[metric]) for r in curve if r.get(key) and r.get(metric) is not None]
    y = common.interpolate(pts, math.log10(x))
    if y is None and pts:  # no extrapolation, but the ends stretch by END_TOLERANCE
        lo, hi = min(pts), max(pts)
        if 0 < lo[0] - math.log10(x) <= math.log10(1 + END_TOLERANCE):
            return lo[1]
        if 0 < math.log10(x) - hi[0] <= math.log10(1 + END_TOLERANCE):
            return hi[1]
    return y


def _compare(points: list[dict], curve: list[dict], n_test: int, key: str = "macs",
             metric: str = "test_top1") -> list[dict]:
    """Each point against ``curve``'s accuracy (``metric``: test or validation top-1, over ``n_test`` images)
    interpolated at the same log10 ``key`` (MACs or latency_ms)."""
    out = []
    for r in points:
        y = _interp(curve, r[key], key, metric) if r.get(key) and r.get(metric) is not None else None
        if y is not None:
            out.append(_comparison(r, y, n_test, key, metric))
    return out


def _comparison(r: dict, other: float, n_test: int, key: str, metric: str = "test_top1", **extra) -> dict:
    """Point ``r`` against the other family's accuracy ``other`` at the same ``key``: the difference and its 2 SE
    (two independent accuracies over ``n_test`` images)."""
    se = math.sqrt(2) * common.accuracy_se(r[metric], n_test)
    return {"stage": r.get("source_stage", r["stage"]), "macs": r["macs"], key: r[key], "acc": r[metric],
            "other": other, **extra, "diff": r[metric] - other, "two_se": 2 * se}


def _front(curve: list[dict], key: str = "latency_ms") -> list[dict]:
    """The points of ``curve`` that no point at the same or lower ``key`` beats on VALIDATION top-1 (test top-1
    where a point has no validation figure), sorted by ``key``: what the family reaches at that cost or less.
    Measured latency is not monotone in width (a multiplier whose widths the backend's blocked kernels take runs
    faster than a narrower one whose widths they do not), so a latency curve is compared by its front; the front
    is chosen on validation, never on test."""
    out: list[dict] = []
    best = -math.inf
    for r in sorted((r for r in curve if r.get(key)), key=lambda r: r[key]):
        score = r.get("val_top1") if r.get("val_top1") is not None else r.get("test_top1")
        if score is not None and score > best:
            out.append(r)
            best = score
    return out


def _compare_front(points: list[dict], front: list[dict], n_test: int, key: str = "latency_ms",
                   tolerance: float = 0.0) -> list[dict]:
    """Each point against the best the other family reaches at the same ``key`` or less: the last point of its
    validation ``front`` (:func:`_front`) at or below the point's ``key`` × (1 + ``tolerance``) — a step, not an
    interpolation, so a point slower than the whole front is compared with the front's best (no extrapolation is
    involved). ``tolerance`` is the measurement's resolution (:func:`_latency_resolution`): a front point slower by less
    than that is as fast, so a timing wobble of 1–2 % does not swap the point compared with. Points faster
    than every front point are left out. Differences of test top-1, 2 SE of two independent test accuracies."""
    out = []
    for r in points:
        if not r.get(key) or r.get("test_top1") is None:
            continue
        below = [f for f in front if f[key] <= r[key] * (1 + tolerance)]
        if not below:
            continue
        out.append(_comparison(r, below[-1]["test_top1"], n_test, key, **{f"other_{key}": below[-1][key]}))
    return out


# ------------------------------------------------------------------------------------------------
# claim 4: measured latency of every compared architecture
# ------------------------------------------------------------------------------------------------

INPUT_SHAPE = (1, 3, 32, 32)


def _arch_key(arch: dict) -> str:
    return json.dumps(arch, sort_keys=True)


def _compared_architectures(root: Path) -> list[dict]:
    """One record per architecture that a comparison of seed directory ``root`` uses, the first record of each
    (deduplicated by :func:`_arch_key`): width multipliers (every schedule: ``width-x*`` and ``width<N>-x*``),
    every arm's grown stages with their retrained and fine-tuned copies (the same architectures), and the pruned
    networks, fine-tuned and retrained (not the wide network they were pruned from: no comparison uses it).

    Every record that the run layer writes carries ``architecture``; one without it (a run older than the field)
    cannot be rebuilt and so cannot be timed: it is left out, with a log line."""
    recs = [r for d in sorted(root.glob("width*-x*")) if _done(d) for r in _recs(d)]
    for arm in ARMS:
        g = root / f"grow-{arm}"
        recs += _recs(g) + _derived(g, "retrain") + _derived(g, "finetune")
    for method in PRUNE_METHODS:
        d = root / f"prune-{method}"
        recs += [r for r in _recs(d) if r.get("stage", 0) >= 1] + _recs(d / "retrain")
    by_arch: dict[str, dict] = {}
    missing = 0
    for r in recs:
        if "architecture" not in r:
            missing += 1
            continue
        by_arch.setdefault(_arch_key(r["architecture"]), r)
    if missing:
        log.info("%s: %d record(s) without an architecture field (runs older than it) cannot be timed: left out",
                 root.name, missing)
    return list(by_arch.values())


def measure_latency(out: Path, root: Path, args: argparse.Namespace) -> None:
    """Time every compared architecture of ``root`` (:func:`_compared_architectures`) not yet measured
    ``--measure-passes`` times in ``<out>/latency.json``: interleaved passes over them (each network once per
    pass), so that the measurements of a network are minutes apart. The table is saved after every pass: a killed
    measurement continues from its last pass. ``latency_ms`` (the median of the passes, in ms) is written once a
    network has all its passes; until then the network counts as not measured."""
    import torch

    import cost_models
    from cost_models.profiling.measure import measure_model
    from hwsplit.network.models import model_from_architecture

    path = out / "latency.json"
    table = json.loads(path.read_text()) if path.exists() else {"networks": {}, "sessions": []}
    compared = _compared_architectures(root)
    todo: dict[str, dict] = {}
    for r in compared:
        k = _arch_key(r["architecture"])
        if len(table["networks"].get(k, {}).get("passes_ms", [])) < args.measure_passes:
            todo[k] = r
    if not todo:
        log.info("%s: %s", root.name, f"all {len(compared)} architectures are measured already" if compared
                 else "no architecture to time yet")
        return
    lut = cost_models.get_cost_model("lut", profile=str(common.resolve(args.profile)))
    models = {}
    for k, r in todo.items():
        torch.manual_seed(0)
        models[k] = model_from_architecture(r["architecture"]).eval()
    predicted = {k: lut.total(model, INPUT_SHAPE) for k, model in models.items()}
    table["sessions"].append({"date": common.now(), "machine": common.machine(), "command": common.command_line(),
                              "load_before": os.getloadavg()[0], "networks": len(todo)})
    passes: dict[str, list[float]] = {k: list(table["networks"].get(k, {}).get("passes_ms", [])) for k in todo}

    def save() -> None:
        for k in models:
            entry = {"architecture": todo[k]["architecture"], "macs": todo[k]["macs"], "passes_ms": passes[k],
                     "lut_predicted_ms": predicted[k], "measured": common.now()}
            if len(passes[k]) >= args.measure_passes:
                # the median of the passes: a measurement disturbed as a whole (seen: 1 in 4 off by 20-30 %) does
                # not move it
                entry["latency_ms"] = statistics.median(passes[k])
            table["networks"][k] = entry
        table["sessions"][-1]["load_after"] = os.getloadavg()[0]
        common.save_json(path, table)

    log.info("%s: %d architecture(s) to time, %d pass(es) at most", root.name, len(todo),
             max(args.measure_passes - len(v) for v in passes.values()))
    for p in range(max(args.measure_passes - len(v) for v in passes.values())):
        for i, (k, model) in enumerate(models.items()):
            if len(passes[k]) >= args.measure_passes:
                continue
            m = measure_model(model, INPUT_SHAPE, backend="onnxruntime", threads=1, time_budget_s=args.measure_time)
            passes[k].append(m["latency_ms"]["median"])
            log.info("%s pass %d: %d/%d %.4f ms", root.name, p + 1, i + 1, len(models), passes[k][-1])
        save()


def _latency_resolution(table: dict) -> float:
    """2 SE of the difference of two networks' measured latencies, relative: 2 √2 × the median over ``table``'s
    networks (``latency.json``) of the standard error of their mean over passes ÷ that mean. Two latencies closer
    than this are not told apart by the measurement (0 when no network has two passes)."""
    ses = [statistics.stdev(p) / math.sqrt(len(p)) / statistics.fmean(p) for n in table.values()
           if len(p := n.get("passes_ms", [])) > 1]
    return 2 * math.sqrt(2) * statistics.median(ses) if ses else 0.0


def _latency_of(r: dict, table: dict) -> float | None:
    """The measured latency (ms) of ``r``'s architecture in ``table`` (``latency.json``'s networks); None when it
    has none (not measured, passes missing, or no ``architecture`` field)."""
    m = table.get(_arch_key(r["architecture"])) if "architecture" in r else None
    return m.get("latency_ms") if m else None


def _with_latency(recs: list[dict], table: dict) -> list[dict]:
    return [{**r, "latency_ms": _latency_of(r, table)} for r in recs]


#: Comparisons at matched measured latency when ``<out>/latency.json`` exists (the full preset's arms; claim 4 has
#: its own): summary key -> (the points' arm, the curve: ``width`` or a pruning method and kind).
LATENCY_COMPARISONS = {"flops_vs_width": ("flops", "width"), "authors_vs_width": ("authors", "width"),
                       "aligned_vs_width": ("aligned", "width"), "lut_vs_width": ("lut", "width"),
                       **{f"flops_vs_prune_{m}{suffix}": ("flops", f"prune-{m}{suffix}") for m in PRUNE_METHODS
                          for suffix in ("", "_retrained")}}


def summarise(out: Path, args: argparse.Namespace) -> dict:
    seeds = [int(s) for s in args.seeds.split(",")]
    result: dict = {"args": vars(args), "seeds": {}}
    lat_path = out / "latency.json"
    lat_table = json.loads(lat_path.read_text()) if lat_path.exists() else {}
    lat = lat_table.get("networks", {})
    if lat_table:
        sessions = lat_table.get("sessions", [])
        result["latency"] = {"networks": sum(1 for n in lat.values() if n.get("latency_ms") is not None),
                             "tolerance": _latency_resolution(lat),
                             "incomplete": sum(1 for n in lat.values() if n.get("latency_ms") is None),
                             "sessions": [{f: x.get(f) for f in ("date", "load_before", "load_after", "networks")}
                                          for x in sessions]}

    def ms(r: dict) -> dict:  # the measured latency of a record's architecture, where the table has it
        return {"latency_ms": _latency_of(r, lat)}

    for seed in seeds:
        root = out / f"s{seed}"
        if not root.exists():
            continue
        n_test = args.test_limit or 10_000  # None: the whole CIFAR-10 test set
        width = _width_curve(root, "width")
        s: dict = {"width": [{"width_mult": r["width_mult"], "macs": r["macs"], "test_top1": r["test_top1"],
                              "val_top1": r.get("val_top1"), "epochs": r["epochs"], **ms(r)} for r in width]}
        s["compute"] = compute(root, args)
        for arm in ARMS:
            g = root / f"grow-{arm}"
            grown = _recs(g) if _done(g) or arm == "flops" else []
            rt = _derived(g, "retrain")
            s[arm] = {"grown": [{"stage": r["stage"], "macs": r["macs"], "test_top1": r["test_top1"],
                                 "val_top1": r.get("val_top1"), **ms(r)} for r in grown],
                      "retrained": [{"stage": r["source_stage"], "macs": r["macs"], "test_top1": r["test_top1"],
                                     "val_top1": r.get("val_top1"), **ms(r)} for r in rt],
                      "retrained_vs_width": _compare(rt, width, n_test)}
        # claim 2: energy-aware (flops) vs vanilla, both retrained; each arm's points on the other's curve
        rt_f, rt_v = _derived(root / "grow-flops", "retrain"), _derived(root / "grow-vanilla", "retrain")
        seed_rt = [r for r in width if r["width_mult"] == 1.0]  # the seed architecture retrained = width × 1
        if rt_f and rt_v:
            s["flops_vs_vanilla"] = _compare(rt_f, sorted(seed_rt + rt_v, key=lambda r: r["macs"]), n_test)
        curves_of: dict[str, list[dict]] = {"width": width}  # the curves of the latency comparisons, as records
        for method in PRUNE_METHODS:  # issue 27: pruned (fine-tuned; retrained from scratch) vs retrained flops
            d = root / f"prune-{method}"
            if not _recs(d):  # shown as its targets finish (a pruning run is one long job)
                continue
            pruned = [r for r in _recs(d) if r["stage"] >= 1]
            # the retrained networks are shown as they finish; compared once every pruned architecture has one (a
            # partial curve's latency front would compare every network with its few points)
            retrained_so_far = _recs(d / "retrain")
            retrained = retrained_so_far if _done(d) else []
            curves_of[f"prune-{method}"], curves_of[f"prune-{method}_retrained"] = pruned, retrained
            target = {r["stage"]: r.get("target_stage", r["stage"]) for r in pruned}
            s[f"prune-{method}"] = {
                "wide": [{"macs": r["macs"], "test_top1": r["test_top1"], "width_mult": r.get("wide_width_mult"),
                          **ms(r)} for r in _recs(d) if r["stage"] == 0],
                "finetuned": [{"stage": r.get("target_stage", r["stage"]), "macs": r["macs"],
                               "test_top1": r["test_top1"], "val_top1": r.get("val_top1"),
                               "epochs_in_all": r.get("epochs_in_all"), **ms(r)} for r in pruned],
                # a retrained record's source_stage is the pruning run's stage; name it by the grown stage it targets
                "retrained": [{"stage": target.get(r.get("source_stage"), r.get("source_stage")), "macs": r["macs"],
                               "test_top1": r["test_top1"], "val_top1": r.get("val_top1"), **ms(r)}
                              for r in retrained_so_far]}
            if rt_f:
                s[f"flops_vs_prune_{method}"] = _compare(rt_f, sorted(pruned, key=lambda r: r["macs"]), n_test)
                if retrained:
                    s[f"flops_vs_prune_{method}_retrained"] = _compare(
                        rt_f, sorted(retrained, key=lambda r: r["macs"]), n_test)
        n_val = round((args.limit or 50_000) * args.val_fraction)
        flops_curve = sorted(seed_rt + rt_f, key=lambda r: r["macs"])
        for arm in VALIDATION_ARMS:  # issue 26: each setting against today's default, on validation (it chooses)
            rt_a = _derived(root / f"grow-{arm}", "retrain")
            if rt_f and rt_a:
                s[f"{arm}_vs_flops_val"] = _compare(rt_a, flops_curve, n_val, metric="val_top1")
                s[f"flops_vs_{arm}_val"] = _compare(rt_f, sorted(seed_rt + rt_a, key=lambda r: r["macs"]), n_val,
                                                    metric="val_top1")
                s[f"{arm}_vs_flops"] = _compare(rt_a, flops_curve, n_test)
        rt_r = _derived(root / "grow-random", "retrain")
        if rt_f and rt_r:
            s["flops_vs_random"] = _compare(rt_f, sorted(seed_rt + rt_r, key=lambda r: r["macs"]), n_test)
        ft = _derived(root / "grow-flops", "finetune")
        if ft:
            total = ft[-1]["epochs_in_all"]
            wt = _width_curve(root, f"width{total}")
            s["finetuned"] = {"epochs_in_all": total, "macs": ft[-1]["macs"], "test_top1": ft[-1]["test_top1"],
                              "val_top1": ft[-1].get("val_top1"), **ms(ft[-1]),
                              "width_same_epochs": [{"width_mult": r["width_mult"], "macs": r["macs"],
                                                     "test_top1": r["test_top1"], "val_top1": r.get("val_top1"),
                                                     **ms(r)} for r in wt],
                              "vs_width": _compare(ft, wt, n_test)}
            # issue 26's final_init: the same final epochs from the grown weights against from a fresh initialisation
            fresh = [r for r in rt_f if r.get("source_stage") == ft[-1].get("source_stage")]
            if fresh and ft[-1].get("val_top1") is not None and fresh[0].get("val_top1") is not None:
                s["final_init_val"] = [_comparison(ft[-1], fresh[0]["val_top1"], n_val, "macs", "val_top1")]
        if lat_table:  # at matched measured latency (issue 25): only the networks whose architecture was timed
            s["latency"] = {}
            for key, (arm, curve) in LATENCY_COMPARISONS.items():
                points = _derived(root / f"grow-{arm}", "retrain")
                if points and curves_of.get(curve):
                    s["latency"][key] = _compare_front(_with_latency(points, lat),
                                                       _front(_with_latency(curves_of[curve], lat)), n_test,
                                                       tolerance=result["latency"]["tolerance"])
        rt_l = _derived(root / "grow-lut", "retrain")
        if rt_l and lat:  # claim 4: at matched measured latency
            width_l = _with_latency(width, lat)
            rt_l, rt_fl, seed_l = _with_latency(rt_l, lat), _with_latency(rt_f, lat), _with_latency(seed_rt, lat)
            flops_curve = sorted(seed_l + rt_fl, key=lambda r: r["latency_ms"] or 0)
            lut_curve = sorted(seed_l + rt_l, key=lambda r: r["latency_ms"] or 0)
            s["claim4"] = {
                "lut_vs_flops": _compare(rt_l, flops_curve, n_test, "latency_ms"),
                "flops_vs_lut": _compare(rt_fl, lut_curve, n_test, "latency_ms"),
                "lut_vs_width": _compare(rt_l, width_l, n_test, "latency_ms"),
                "flops_vs_width": _compare(rt_fl, width_l, n_test, "latency_ms"),
                "networks": [{"name": name, "test_top1": r["test_top1"], "val_top1": r.get("val_top1"),
                              "macs": r["macs"], **{f: lat[_arch_key(r["architecture"])][f]
                                                    for f in ("passes_ms", "lut_predicted_ms")}}
                             for name, r in ([(f"width × {r['width_mult']:g}", r) for r in width]
                                             + [(f"flops stage {r['source_stage']}", r) for r in rt_fl]
                                             + [(f"lut stage {r['source_stage']}", r) for r in rt_l])
                             if _latency_of(r, lat) is not None]}
        if args.grown_from:  # the same networks under the other run's schedule
            s["schedule"] = _schedule(common.resolve(args.grown_from) / f"s{seed}", root, n_test)
        result["seeds"][seed] = s
    # across seeds: the mean difference at each comparison, with 2 SE = 2 √(Σ SE_s²) / n_seeds (test-set noise)
    agg: dict = {}
    for key in ARMS:
        agg[f"{key}_retrained_vs_width"] = _aggregate([s[key]["retrained_vs_width"] for s in result["seeds"].values()
                                                       if key in s])
    for key in ("flops_vs_vanilla", "flops_vs_random",
                *(f"{k}_val" for arm in VALIDATION_ARMS for k in (f"{arm}_vs_flops", f"flops_vs_{arm}")),
                *(f"{arm}_vs_flops" for arm in VALIDATION_ARMS), *(f"flops_vs_prune_{m}{suffix}" for m in PRUNE_METHODS
                                      for suffix in ("", "_retrained"))):
        agg[key] = _aggregate([s[key] for s in result["seeds"].values() if key in s])
    agg["schedule_flops_vs_width"] = _aggregate([s["schedule"]["flops_vs_width"] for s in result["seeds"].values()
                                                 if s.get("schedule")])
    agg["final_init_val"] = _aggregate([s["final_init_val"] for s in result["seeds"].values() if "final_init_val" in s])
    agg["finetuned_vs_width"] = _aggregate([s["finetuned"]["vs_width"] for s in result["seeds"].values()
                                            if "finetuned" in s])
    for key in ("lut_vs_flops", "flops_vs_lut", "lut_vs_width", "flops_vs_width"):
        agg[f"claim4_{key}"] = _aggregate([s["claim4"][key] for s in result["seeds"].values() if "claim4" in s])
    for key in LATENCY_COMPARISONS:
        agg[f"latency_{key}"] = _aggregate([s["latency"][key] for s in result["seeds"].values()
                                            if key in s.get("latency", {})])
    result["aggregate"] = agg
    result["curves"] = curves(result)
    result["curves_latency"] = curves(result, "latency_ms")
    common.save_json(out / "summary.json", result)
    out.with_suffix(".md").write_text(fragment(result, args), encoding="utf-8")
    plot(result, out)
    return result


def _schedule(src: Path, root: Path, n_test: int) -> dict:
    """The networks of ``root`` (one seed) that ``src`` (the same seed under ``--grown-from``'s schedule) also
    trained — width multipliers and retrained flops stages — side by side, with the gain of this schedule in points
    of test top-1 (2 SE: two test accuracies' binomial noise), and retrained flops − width at ``src``'s schedule (the
    verdict this run re-measures)."""
    pairs = []
    here = {r["width_mult"]: r for r in _width_curve(root, "width")}
    for r in _width_curve(src, "width"):
        if r["width_mult"] in here:
            pairs.append((f"width × {r['width_mult']:g}", r, here[r["width_mult"]]))
    here = {r["source_stage"]: r for r in _derived(root / "grow-flops", "retrain")}
    rt_src = _derived(src / "grow-flops", "retrain")
    pairs += [(f"flops stage {r['source_stage']}", r, here[r["source_stage"]]) for r in rt_src
              if r["source_stage"] in here]
    networks = []
    for name, a, b in pairs:
        se = math.hypot(common.accuracy_se(a["test_top1"], n_test), common.accuracy_se(b["test_top1"], n_test))
        networks.append({"name": name, "macs": b["macs"], "epochs": [a["epochs"], b["epochs"]],
                         "test_top1": [a["test_top1"], b["test_top1"]],
                         "val_top1": [a.get("val_top1"), b.get("val_top1")],
                         "gain": b["test_top1"] - a["test_top1"], "two_se": 2 * se})
    return {"networks": networks, "flops_vs_width": _compare(rt_src, _width_curve(src, "width"), n_test)}


# ------------------------------------------------------------------------------------------------
# compute of each path, curves over seeds, plots
# ------------------------------------------------------------------------------------------------

def _passes(recs: list[dict], n_train: int) -> int:
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
        recs = _recs(g) if _done(g) else []
        if not recs:
            continue
        sec = [r.get("seconds", {}) for r in recs]
        out[f"grow-{arm}"] = {"train_sample_passes": _passes(recs, n_train),
                              "scoring_sample_passes": (len(recs) - 1) * n_train,
                              "train_s": sum(x.get("train_s", 0) for x in sec),
                              "score_s": sum(x.get("score_s", 0) for x in sec),
                              "search_s": sum(sum(v for k, v in x.items() if k.endswith("_s")) for x in sec)}
        for sub in ("retrain", "finetune"):
            rs = _derived(g, sub)
            if rs:
                out[f"{sub}-{arm}"] = {"networks": len(rs), "train_sample_passes": _passes(rs, n_train),
                                       "train_s": sum(r.get("seconds", {}).get("train_s", 0) for r in rs)}
    for d in sorted(root.glob("width*-x*")):
        rs = _recs(d) if _done(d) else []
        if rs:
            out[d.name] = {"train_sample_passes": _passes(rs, n_train),
                           "train_s": sum(r.get("seconds", {}).get("train_s", 0) for r in rs)}
    return out


def _mean_point(points: list[dict], key: str) -> dict:
    """Mean ``key`` (MACs or latency_ms) and test top-1 of one curve point over the seeds that have it."""
    accs = [p["test_top1"] for p in points]
    n = len(accs)
    return {key: statistics.mean(p[key] for p in points), "test_top1": statistics.mean(accs), "n_seeds": n,
            "two_se_seeds": 2 * statistics.stdev(accs) / math.sqrt(n) if n > 1 else None}


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
    return {name: [_mean_point(pts, key) for _, pts in sorted(points.items())] for name, points in by.items()}


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


def _aggregate(per_seed: list[list[dict]]) -> dict:
    """Per comparison index (grown stage): mean diff over the seeds that have it, and its 2 SE."""
    by_stage: dict[int, list[dict]] = {}
    for comps in per_seed:
        for c in comps:
            by_stage.setdefault(c["stage"], []).append(c)
    out = {}
    for stage, cs in sorted(by_stage.items()):
        n = len(cs)
        diffs = [c["diff"] for c in cs]
        out[stage] = {"n_seeds": n, "diff": statistics.mean(diffs),
                      "two_se": math.sqrt(sum(c["two_se"] ** 2 for c in cs)) / n,
                      # between seeds (seed, data order and test noise together); None with one seed
                      "two_se_seeds": 2 * statistics.stdev(diffs) / math.sqrt(n) if n > 1 else None,
                      "macs": statistics.mean(c["macs"] for c in cs),
                      **({"latency_ms": statistics.mean(c["latency_ms"] for c in cs)} if "latency_ms" in cs[0] else {}),
                      "diffs": [c["diff"] for c in cs]}
    return out


def _verdict_line(name: str, agg: dict) -> str:
    if not agg:
        return f"- {name}: no comparison yet"
    parts, ahead, behind = [], 0, 0
    for stage, a in agg.items():
        where = f"{a['latency_ms']:.3f} ms" if "latency_ms" in a else f"{common.fmt_num(a['macs'])} MACs"
        # the verdict's 2 SE: the larger of the test-set noise and the spread between seeds
        se = max(a["two_se"], a.get("two_se_seeds") or 0.0)
        seeds_se = f", between seeds ± {100 * a['two_se_seeds']:.2f}" if a.get("two_se_seeds") is not None else ""
        parts.append(f"stage {stage} ({where}, {a['n_seeds']} seed(s)): "
                     f"{100 * a['diff']:+.2f} ± {100 * a['two_se']:.2f}{seeds_se}")
        ahead += a["diff"] > se
        behind += a["diff"] < -se
    return (f"- {name}: " + "; ".join(parts) + f" — ahead beyond 2 SE at {ahead}, behind beyond 2 SE at {behind} "
            f"of {len(agg)}")


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
             f"- machine: {common.machine_line(common.machine())}",
             f"- rebuilt: {common.now()}",
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
             + f" (no extrapolation: a point up to {100 * END_TOLERANCE:g} % beyond a curve's end is compared with the "
             "end point), mean over the seeds that have the point, ± 2 SE of the test-set noise, then ± 2 SE between "
             "seeds (2 sd / √seeds of the per-seed differences); \"beyond 2 SE\" uses the larger of the two",
             *([] if args.claim4 else [_latency_line(result)]),
             f"- figures: {_figure_links(result, args)}", ""]
    agg = result["aggregate"]
    if args.claim4:
        lines += ["### Verdict lines", "",
                  _verdict_line("claim 4, retrained lut − retrained flops (flops curve incl. the seed), matched "
                                "latency", agg["claim4_lut_vs_flops"]),
                  _verdict_line("claim 4, retrained flops − retrained lut (lut curve incl. the seed), matched "
                                "latency", agg["claim4_flops_vs_lut"]),
                  _verdict_line("retrained lut − width, matched latency", agg["claim4_lut_vs_width"]),
                  _verdict_line("retrained flops − width, matched latency", agg["claim4_flops_vs_width"]),
                  _verdict_line("retrained flops − width, matched MACs", agg["flops_retrained_vs_width"]),
                  _verdict_line("retrained lut − width, matched MACs", agg["lut_retrained_vs_width"]), ""]
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
                  _verdict_line("claim 3, retrained grown (flops) − width", agg["flops_retrained_vs_width"]),
                  _verdict_line("claim 3, retrained random-selection − width", agg["random_retrained_vs_width"]),
                  _verdict_line("claim 3, retrained flops − retrained random (random arm's curve incl. the seed)",
                                agg["flops_vs_random"]),
                  _verdict_line("claim 3, fine-tuned flops − width trained as many epochs", agg["finetuned_vs_width"]),
                  _verdict_line("claim 2, retrained flops − retrained vanilla (vanilla curve incl. the seed)",
                                agg["flops_vs_vanilla"]),
                  _verdict_line("(diagnostic) retrained vanilla − width", agg["vanilla_retrained_vs_width"]),
                  _verdict_line("issue 26, on VALIDATION: retrained authors' recipe − retrained flops (flops curve "
                                "incl. the seed)", agg["authors_vs_flops_val"]),
                  _verdict_line("issue 26, on VALIDATION: retrained flops − retrained authors' recipe",
                                agg["flops_vs_authors_val"]),
                  _verdict_line("issue 26, on VALIDATION: retrained aligned − retrained flops (flops curve incl. the "
                                "seed)", agg["aligned_vs_flops_val"]),
                  _verdict_line("issue 26, on VALIDATION: last flops stage, 30 final epochs from its grown weights − "
                                "from a fresh initialisation (`--final-init grown` − `fresh`)", agg["final_init_val"]),
                  _verdict_line("retrained authors' recipe − width (test)", agg["authors_retrained_vs_width"]),
                  _verdict_line("retrained aligned (MACs price, multiples of 4 channels) − width",
                                agg["aligned_retrained_vs_width"]),
                  _verdict_line("retrained authors' recipe − retrained flops (test; read once the choice is made)",
                                agg["authors_vs_flops"]),
                  _verdict_line("retrained lut (table latency price, multiples of 4 channels, budget: the widest "
                                "width's table latency) − width", agg["lut_retrained_vs_width"]),
                  *(_verdict_line(f"retrained flops − {m} pruning, {how}", agg[f"flops_vs_prune_{m}{suffix}"])
                    for m in PRUNE_METHODS for suffix, how in (("", "fine-tuned"), ("_retrained", "retrained"))),
                  _verdict_line("retrained grown (flops) − width, at matched measured latency",
                                agg["latency_flops_vs_width"]),
                  _verdict_line("retrained authors' recipe − width (test), at matched measured latency",
                                agg["latency_authors_vs_width"]),
                  _verdict_line("retrained aligned (MACs price, multiples of 4 channels) − width, at matched "
                                "measured latency", agg["latency_aligned_vs_width"]),
                  _verdict_line("retrained lut − width, at matched measured latency", agg["latency_lut_vs_width"]),
                  *(_verdict_line(f"retrained flops − {m} pruning, {how}, at matched measured latency",
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
             _verdict_line(f"retrained grown (flops) − width, there (same seeds; here: {args.retrain_epochs} epochs, "
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


# ------------------------------------------------------------------------------------------------
# --jobs: one network per job, run by worker processes as soon as what a job needs is done
# ------------------------------------------------------------------------------------------------

GROW_STEPS = ("flops", "random", "vanilla", "lut", "authors", "aligned")


def _grow_done(root: Path, arm: str) -> bool:
    return _done(root / f"grow-{arm}")


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
        ready = last is not None and _done(root / "grow-flops" / f"finetune-{last}") and all(
            _done(root / f"width-x{m:g}") for m in parse_multipliers(args.multipliers))
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
