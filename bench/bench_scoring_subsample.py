"""Adaptive scoring (issue 31) at full scale: its time ÷ one training epoch and its agreement with the full pass.

    nice -n 5 python bench/bench_scoring_subsample.py --data-dir ../shared/data/cifar10 \\
        --out bench/results/scoring_subsample.json

1. Grows the paper's CIFAR-10 seed (``mobilenet_v1_cifar``) with hwsplit itself on all of CIFAR-10 (npz; a
   seeded 10 % of the training images held out as validation, so 45,000 are trained and scored on), batch
   ``--batch-size``, ``--seed-epochs`` epochs for the seed and one growth stage of ``--stage-epochs``, MACs
   budget, full-pass scoring (the default): ``RUN/stage-0.pt`` (the seed) and ``stage-1.pt`` (the grown
   stage) under ``--run`` (checkpoints are not in git). An existing run there is reused.
2. For each of the two networks, in one process: one training epoch of a copy (SGD as the run trains,
   timed), the full-pass scorer (``scoring="full"``: every batch of the loader's epoch ``SCORE_EPOCH``), then
   the adaptive scorer (:class:`hwsplit.splitting.ritz.AdaptiveScoring`, the knapsack's cut for the stage's MACs
   budget) for each of ``--seeds``: seed s reads the loader's epoch ``SCORE_EPOCH + 1 + s`` (another
   shuffle: another subsample, other augmentations) with descent seed s, and with ``--full-repeats 2``
   a second full pass on epoch ``SCORE_EPOCH + 10`` (how well two full passes agree: the ceiling).
3. Agreement with the first full pass: the neurons the knapsack (``lp``, budget = growth ratio × the
   network's MACs) selects — overlap |A ∩ F| / |F| — with every negative λ a candidate and with only the
   significant ones (``split_candidates="significant"``, for the adaptive scores); Spearman ρ of λ (pooled
   and per layer, worst); the share of the full pass's negative λ that are negative in the other.

Timing: one thread; the ratios are within one process (training epoch and scoring calls side by side).
Writes JSON (``--out``) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import command_line, machine, machine_line, now, rel, resolve  # noqa: E402

SCORE_EPOCH = 100_000


def _grow(args: argparse.Namespace):
    from hwsplit.run.config import GrowConfig
    from hwsplit.run.grow import grow

    config = GrowConfig(model="mobilenet_v1_cifar", dataset="npz", data_dir=str(resolve(args.data_dir)),
                        val_fraction=0.1, test_limit=args.test_limit, batch_size=args.batch_size,
                        seed_epochs=args.seed_epochs, epochs=args.stage_epochs, stages=1, cost="flops",
                        seed=args.seed, data_limit=args.limit)
    run = resolve(args.run)
    start = time.perf_counter()
    if not (run / "stage-1.pt").exists():
        grow(config, run, overwrite=True)
    return config, run, time.perf_counter() - start


def _spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a.numpy(), b.numpy())[0]) if len(a) > 1 else float("nan")


def _selected(scores, costs, budget, significant: bool, z: float) -> set[tuple[str, int]]:
    from hwsplit.splitting.score import significant_scores
    from hwsplit.splitting.select import select_by_name

    if significant:
        scores = significant_scores(scores, z)
    plan = select_by_name("lp", scores, costs, budget)
    return {(k, int(j)) for k, v in plan.items() for j in v.tolist()}


def _agreement(full, other, costs, budget, z: float) -> dict:
    names = sorted(full)
    e = torch.cat([full[n].eigenvalues for n in names])
    o = torch.cat([other[n].eigenvalues for n in names])
    per_layer = {n: _spearman(full[n].eigenvalues, other[n].eigenvalues) for n in names if len(full[n]) > 1}
    reference = _selected(full, costs, budget, False, z)
    out = {"spearman_pooled": _spearman(e, o), "spearman_min_layer": min(per_layer.values()),
           "spearman_median_layer": sorted(per_layer.values())[len(per_layer) // 2],
           "spearman_per_layer": per_layer,
           "negative_full": int((e < 0).sum()), "negative_found": int(((e < 0) & (o < 0)).sum()),
           "negative_other": int((o < 0).sum()),
           "selected_full": len(reference)}
    out["negative_found_share"] = out["negative_found"] / max(out["negative_full"], 1)
    for key, significant in (("all", False), ("significant", True)):
        if significant and any(other[n].stderr is None for n in names):
            continue
        chosen = _selected(other, costs, budget, significant, z)
        out[f"selected_{key}"] = len(chosen)
        out[f"overlap_{key}"] = len(chosen & reference) / max(len(reference), 1)
    return out


def _measure(name: str, path: Path, config, session, args: argparse.Namespace) -> dict:
    from hwsplit.network.checkpoint import load_checkpoint
    from hwsplit.network.models import model_from_architecture
    from hwsplit.splitting.ritz import AdaptiveScoring, decided
    from hwsplit.splitting.score import splitting_indices
    from hwsplit.splitting.select import knapsack_cut
    from hwsplit.training.train import make_optimizer, train_epoch

    payload = load_checkpoint(path)
    model = model_from_architecture(payload["architecture"], payload["state_dict"]).eval()
    loader = session.train_loader
    groups = session.trace(model)
    flops = session.cost_model
    total = flops.total(model, session.input_shape)
    marginal = flops.marginal(model, session.input_shape, groups=groups)
    budget = config.growth_ratio * total
    costs = {k: marginal[k] for k in marginal}
    entry: dict = {"network": name, "checkpoint": rel(path), "macs": total, "budget_macs": budget,
                   "neurons": None, "batches_per_epoch": len(loader), "images_per_epoch": loader.dataset_size
                   if hasattr(loader, "dataset_size") else None, "calls": []}

    # one training epoch of a copy, as the run trains (SGD, its lr), timed in this process
    trained = copy.deepcopy(model)
    opt = make_optimizer(trained, config.train_config(1))
    loader.set_epoch(SCORE_EPOCH - 1)
    start = time.perf_counter()
    stats = train_epoch(trained, loader, opt, device="cpu", loss_fn=F.cross_entropy)
    entry["train_epoch_s"] = time.perf_counter() - start
    print(f"{name}: training epoch {entry['train_epoch_s']:.1f} s (loss {stats['loss']:.3f}; other core busy)",
          flush=True)
    del trained, opt

    def call(label: str, epoch: int, **kwargs) -> dict:
        loader.set_epoch(epoch)
        start = time.perf_counter()
        scores = splitting_indices(model, loader, groups=groups, **kwargs)
        seconds = time.perf_counter() - start
        first = next(iter(scores.values()))
        record = {"label": label, "loader_epoch": epoch, "seconds": seconds,
                  "epochs": seconds / entry["train_epoch_s"], "images": first.images, "stopped": first.stopped}
        thresholds = cut({k: s.eigenvalues for k, s in scores.items()})
        sure = sum(int(decided(s.eigenvalues, s.stderr, torch.as_tensor(thresholds[k], dtype=s.eigenvalues.dtype),
                               args.z).sum()) for k, s in scores.items())
        record.update(decided=sure, below_cut=sum(int((s.eigenvalues < torch.as_tensor(thresholds[k])).sum())
                                                  for k, s in scores.items()),
                      significant_negative=sum(int((s.eigenvalues + args.z * s.stderr < 0).sum())
                                               for s in scores.values()))
        print(f"{name} {label}: {seconds:.1f} s = {record['epochs']:.2f} training epochs, {first.images} images"
              f" ({first.stopped or 'every batch'}; other core busy); {sure} of {sum(len(s) for s in scores.values())}"
              f" decided at the cut, {record['below_cut']} below it", flush=True)
        return record, scores

    def cut(eigenvalues: dict) -> dict:
        return knapsack_cut(eigenvalues, {k: costs[k] for k in eigenvalues}, budget)

    full_record, full = call("full", SCORE_EPOCH, seed=0)
    entry["neurons"] = sum(len(s) for s in full.values())
    entry["calls"].append(full_record)
    base = dict(tolerance=args.tolerance, z=args.z, min_fraction=args.min_fraction, max_fraction=args.cap)
    for variant in args.variants:
        rule = AdaptiveScoring(**{**base, **variant}, cut=cut)
        settings = {"tolerance": rule.tolerance, "z": rule.z, "min_fraction": rule.min_fraction,
                    "max_fraction": rule.max_fraction, "check_every": rule.check_every}
        tag = "adaptive" + "".join(f" {k}={v}" for k, v in variant.items())
        for seed in args.seeds:
            record, scores = call(f"{tag} seed {seed}", SCORE_EPOCH + 1 + seed, seed=seed, adaptive=rule)
            record["adaptive"] = settings
            record["agreement"] = _agreement(full, scores, costs, budget, args.z)
            entry["calls"].append(record)
            _print_agreement(record)
    for r in range(1, args.full_repeats):
        record, scores = call(f"full repeat {r}", SCORE_EPOCH + 9 + r, seed=r)
        record["agreement"] = _agreement(full, scores, costs, budget, args.z)
        entry["calls"].append(record)
        _print_agreement(record)
    return entry


def _print_agreement(record: dict) -> None:
    a = record["agreement"]
    print(f"  overlap {a['overlap_all']:.3f} (significant only {a.get('overlap_significant', float('nan')):.3f})"
          f", Spearman pooled {a['spearman_pooled']:.3f} worst layer {a['spearman_min_layer']:.3f}, "
          f"negatives {a['negative_found']}/{a['negative_full']}", flush=True)


def table(report: dict) -> str:
    lines = ["| network | call | images | stopped | seconds | ÷ training epoch | overlap (all) | overlap "
             "(significant) | Spearman pooled / worst layer | negatives found |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for e in report["networks"]:
        for c in e["calls"]:
            a = c.get("agreement")
            agree = (f"{a['overlap_all']:.3f} | {a.get('overlap_significant', float('nan')):.3f} | "
                     f"{a['spearman_pooled']:.3f} / {a['spearman_min_layer']:.3f} | "
                     f"{a['negative_found']} / {a['negative_full']}") if a else "— | — | — | —"
            lines.append(f"| {e['network']} (train epoch {e['train_epoch_s']:.1f} s) | {c['label']} | {c['images']} | "
                         f"{c['stopped'] or 'all'} | {c['seconds']:.1f} | {c['epochs']:.2f} | {agree} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default="../shared/data/cifar10")
    parser.add_argument("--run", default="bench/results/scoring_subsample_run", help="the grown run (checkpoints)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--seed-epochs", type=int, default=3)
    parser.add_argument("--stage-epochs", type=int, default=2)
    parser.add_argument("--test-limit", type=int, default=2000)
    parser.add_argument("--limit", type=int, default=None, help="first N training images (default: all)")
    parser.add_argument("--seed", type=int, default=0, help="run (data, training) seed")
    parser.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[0, 1, 2],
                        help="subsample seeds")
    parser.add_argument("--full-repeats", type=int, default=2, help="full passes (the first is the reference)")
    parser.add_argument("--tolerance", type=float, default=0.05)
    parser.add_argument("--z", type=float, default=2.0)
    parser.add_argument("--min-fraction", type=float, default=0.05)
    parser.add_argument("--cap", type=float, default=0.25)
    parser.add_argument("--variants", type=json.loads, default=[{}],
                        help='JSON list of AdaptiveScoring overrides, each for every seed: [{}, {"min_fraction": 0.1}]')
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--networks", default="seed,grown", help="seed and/or grown")
    parser.add_argument("--out", default="")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from hwsplit.run.session import open_session

    t0 = time.perf_counter()
    report: dict = {"command": command_line(), "date": now(), "machine": machine(), "args": vars(args),
                    "load_before": os.getloadavg(), "networks": []}
    config, run, grow_s = _grow(args)
    report["grow_s"] = grow_s
    print(f"grown run {rel(run)} in {grow_s:.0f} s", flush=True)
    session = open_session(config)
    paths = {"seed": run / "stage-0.pt", "grown": run / "stage-1.pt"}
    for name in args.networks.split(","):
        report["networks"].append(_measure(name, paths[name], config, session, args))
        if args.out:  # after each network, so an interrupted run keeps what it measured
            Path(args.out).write_text(json.dumps(report, indent=1))
    report["load_after"] = os.getloadavg()
    report["wall_s"] = time.perf_counter() - t0
    print(table(report))
    print(f"({machine_line(report['machine'])}; {args.threads} thread(s); {report['wall_s'] / 60:.1f} min)")
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
