"""Optimizer state of split offspring (issue 30): Grower.carry_optimizer's "fresh" vs "parent" vs a new optimizer.

    python bench/bench_carry_optimizer.py --seeds 0,1,2,3,4 --out bench/results/carry_optimizer.json

An MLP (64-6-6-10, SiLU) on scikit-learn's digits (first 1,200 of a seeded permutation for training, the next
300 for validation; the rest unused) is trained 10 epochs with SGD (lr 0.05, momentum 0.9) or Adam (lr 3e-3),
grown once (Grower, MACs, growth ratio 1), and trained 3 more epochs with the optimizer carried over
(offspring state zeros: "fresh", or the parent's: "parent") or a new one ("new"). The figure is the
validation loss after those 3 epochs, per seed; the three arms share the grown model and the data order.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

from hwsplit import Grower
from hwsplit.run.grower import carry_optimizer

OPTIMIZERS = {"sgd": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9),
              "adam": lambda p: torch.optim.Adam(p, lr=3e-3)}
ARMS = ("fresh", "parent", "new")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2,3,4")
    parser.add_argument("--out", default="bench/results/carry_optimizer.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16
    y = torch.tensor(digits.target)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    train_idx, val_idx = perm[:1200], perm[1200:1500]
    data = [(x[train_idx[i:i + 64]], y[train_idx[i:i + 64]]) for i in range(0, 1200, 64)]

    def fit(model: nn.Module, optimizer: torch.optim.Optimizer, epochs: int) -> float:
        for _ in range(epochs):
            model.train()
            for xb, yb in data:
                loss = F.cross_entropy(model(xb), yb)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        model.eval()
        with torch.no_grad():
            return F.cross_entropy(model(x[val_idx]), y[val_idx]).item()

    start = time.perf_counter()
    results: dict[str, dict[str, list[float]]] = {}
    for name, make in OPTIMIZERS.items():
        for seed in (int(s) for s in args.seeds.split(",")):
            torch.manual_seed(seed)
            base = nn.Sequential(nn.Linear(64, 6), nn.SiLU(), nn.Linear(6, 6), nn.SiLU(), nn.Linear(6, 10))
            optimizer = make(base.parameters())
            fit(base, optimizer, 10)
            grower = Grower(base, x[:1], cost="flops", split_vectors=3, growth_ratio=1.0, seed=seed)
            grown = grower.step(base, data)
            for arm in ARMS:
                model = copy.deepcopy(grown)
                opt = make(base.parameters())
                opt.load_state_dict(copy.deepcopy(optimizer.state_dict()))  # its own state: Adam updates in place
                if arm == "new":
                    opt = make(model.parameters())
                else:
                    carry_optimizer(opt, base, model, grower.last_step.sources, offspring=arm)
                torch.manual_seed(100 + seed)
                results.setdefault(name, {}).setdefault(arm, []).append(fit(model, opt, 3))
    summary = {name: {arm: {"mean": statistics.mean(v), "sd": statistics.stdev(v) if len(v) > 1 else 0.0,
                            "per_seed": v} for arm, v in arms.items()} for name, arms in results.items()}
    for name, arms in summary.items():
        for arm, s in arms.items():
            diff = [a - b for a, b in zip(s["per_seed"], arms["parent"]["per_seed"])]
            s["minus_parent_mean"] = statistics.mean(diff)
            s["minus_parent_se"] = statistics.stdev(diff) / len(diff) ** 0.5 if len(diff) > 1 else 0.0
            print(f"{name} {arm:6s} val loss {s['mean']:.4f} ± {s['sd']:.4f} (sd); minus parent "
                  f"{s['minus_parent_mean']:+.4f} ± {s['minus_parent_se']:.4f} (se, paired)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"seconds": time.perf_counter() - start, "results": summary}, indent=1))


if __name__ == "__main__":
    main()
