"""Rayleigh settings against exact on the synthetic 4x-wide test net (tests/test_splitting_matrix.py's
``wide_net``: 512 synthetic images, 8 batches), a validation-like setting for issue 13's step 3.

    python bench/bench_rayleigh_widenet.py [--kwargs '{"steps_per_batch": 2}' ...] [--seeds 0,1]

Prints, per setting and seed: worst-group Spearman ρ, mean share of exact negatives found, median
eigenvector |cos| with exact.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import torch  # noqa: E402
from conftest import batches, synthetic_data, train_briefly  # noqa: E402
from scipy.stats import spearmanr  # noqa: E402

from hwsplit import build_model, splitting_indices  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--kwargs", action="append", default=None, help="JSON of splitting_indices arguments")
    parser.add_argument("--seeds", default="0,1")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = build_model("mobilenet_v1_cifar", stem_width=24, widths=[32, 40, 48], strides=[1, 2, 2],
                        num_classes=5, activation="silu")
    x, y = synthetic_data(512, resolution=12)
    data = batches(x, y, 64)
    model = train_briefly(model, data, epochs=6)
    exact = splitting_indices(model, data, method="exact")
    for kw in [json.loads(k) for k in (args.kwargs or ["{}"])]:
        for seed in [int(s) for s in args.seeds.split(",")]:
            fast = splitting_indices(model, data, seed=seed, **kw)
            rhos, found, cos = [], [], []
            for n in exact:
                e, r = exact[n].eigenvalues, fast[n].eigenvalues
                rhos.append(spearmanr(e, r)[0])
                neg = e < -1e-3 * e.abs().max()
                found.append(float((r[neg] < 0).float().mean()))
                cos.append((exact[n].eigenvectors.flatten(1) * fast[n].eigenvectors.flatten(1)).sum(1).abs())
            print(json.dumps({"kwargs": kw, "seed": seed, "spearman_min": round(min(rhos), 3),
                              "negative_found_mean": round(sum(found) / len(found), 3),
                              "cos_median": round(float(torch.cat(cos).median()), 3)}), flush=True)


if __name__ == "__main__":
    main()
