"""hwsplit's training epoch against a bare PyTorch loop on the same network, batch, format and threads.

    python bench/bench_train_speed.py                      # all 50,000 CIFAR-10 training images, widths 1 and 2.5
    python bench/bench_train_speed.py --images 10000 --out bench/results/train_speed_quick.json
    python bench/bench_train_speed.py --formats-only --out bench/results/train_formats.json

For each width multiplier of ``mobilenet_v1_cifar`` and each memory format (channels-first, channels-last) it
times one epoch of

* **bare**: a plain loop written here — the uint8 images held as one tensor, a whole batch padded, cropped and
  flipped with tensor ops, normalised, forward, cross entropy, backward, SGD (nesterov, weight decay);
* **hwsplit**: ``hwsplit.training.train.train`` over ``hwsplit.training.loaders.make_loaders``' training loader (the
  code path every grow stage, fine-tune and baseline uses), with ``TrainConfig(channels_last=...)``;

same initial weights, same batch size (``--batch-size``, 128), one intra-op thread. The two are interleaved
(bare, hwsplit, bare, hwsplit for ``--repeats``) and each figure is the minimum over repeats. Printed and saved:
seconds per epoch (scaled to 50,000 images when ``--images`` is smaller) and hwsplit ÷ bare. Time it on an
otherwise idle machine.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

FULL_EPOCH = 50_000


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default="../shared/data/cifar10")
    p.add_argument("--images", type=int, default=FULL_EPOCH, help="training images per timed epoch")
    p.add_argument("--widths", default="1,2.5", help="width multipliers of the seed")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--formats", default="first,last", help="memory formats: first (NCHW), last (channels-last)")
    p.add_argument("--formats-only", action="store_true",
                   help="only time training steps channels-last vs channels-first for several networks")
    p.add_argument("--out", default="bench/results/train_speed.json")
    return p.parse_args(argv)


def bare_epoch(model, images, labels, mean, std, *, batch_size: int, channels_last: bool, seed: int) -> float:
    """One epoch of the bare loop; seconds."""
    import torch
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
    mul = (1 / 255.0 / std).view(1, -1, 1, 1)
    add = (-mean / std).view(1, -1, 1, 1)
    model.train()
    n = images.shape[0]
    t0 = time.perf_counter()
    order = torch.randperm(n, generator=g)
    for idx in order.split(batch_size):
        x = images[idx]
        b, c, h, w = x.shape
        padded = torch.zeros(b, c, h + 8, w + 8, dtype=x.dtype)
        padded[:, :, 4:4 + h, 4:4 + w] = x
        off = torch.randint(0, 9, (2, b, 1), generator=g)  # a crop offset per sample
        rows, cols = off[0] + torch.arange(h), off[1] + torch.arange(w)
        flip = torch.rand(b, 1, generator=g) < 0.5
        cols = torch.where(flip, cols.flip(1), cols)
        x = padded[torch.arange(b).view(b, 1, 1, 1), torch.arange(c).view(1, c, 1, 1),
                   rows.view(b, 1, h, 1), cols.view(b, 1, 1, w)]
        x = x.float().mul_(mul).add_(add)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        loss = F.cross_entropy(model(x), labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return time.perf_counter() - t0


def hwsplit_epoch(model, bundle, *, batch_size: int, channels_last: bool, seed: int) -> float:
    from hwsplit.training.loaders import make_loaders
    from hwsplit.training.train import TrainConfig, train

    loader, _ = make_loaders(bundle, batch_size=batch_size, seed=seed)
    t0 = time.perf_counter()
    train(model, loader, config=TrainConfig(epochs=1, lr=0.05, channels_last=channels_last), device="cpu")
    return time.perf_counter() - t0


#: (name, input shape, width multiplier, batch) of the memory-format comparison (``--formats-only``).
FORMAT_NETWORKS = [("digits seed", (1, 8, 8), 1.0, 64), ("digits ×4", (1, 8, 8), 4.0, 64),
                   ("cifar seed", (3, 32, 32), 1.0, 64), ("cifar ×2.5", (3, 32, 32), 2.5, 128),
                   ("cifar ×4", (3, 32, 32), 4.0, 128)]


def format_steps(threads: int) -> list[dict]:
    """Training-step time channels-last ÷ channels-first for each of :data:`FORMAT_NETWORKS` (random inputs;
    the best of 3 rounds of 10 steps after 3 warm-up steps)."""
    import torch
    import torch.nn.functional as F

    from hwsplit.network.families import build_seed

    torch.set_num_threads(threads)
    rows = []
    for name, shape, width, batch in FORMAT_NETWORKS:
        ms = {}
        for cl in (False, True):
            torch.manual_seed(0)
            model = build_seed("mobilenet_v1_cifar", {}, shape, 10, width_mult=width)
            x, y = torch.randn(batch, *shape), torch.randint(0, 10, (batch,))
            if cl:
                model = model.to(memory_format=torch.channels_last)
                x = x.contiguous(memory_format=torch.channels_last)
            opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)

            def step(model=model, x=x, y=y, opt=opt):
                loss = F.cross_entropy(model(x), y)
                opt.zero_grad()
                loss.backward()
                opt.step()

            for _ in range(3):
                step()
            best = math.inf
            for _ in range(3):
                t0 = time.perf_counter()
                for _ in range(10):
                    step()
                best = min(best, (time.perf_counter() - t0) / 10)
            ms[cl] = best * 1e3
        rows.append({"network": name, "batch": batch, "channels_first_ms": round(ms[False], 2),
                     "channels_last_ms": round(ms[True], 2), "last_vs_first": round(ms[True] / ms[False], 3)})
        print(f"{name:>12} batch {batch}: channels-first {ms[False]:7.2f} ms, channels-last {ms[True]:7.2f} ms, "
              f"ratio {ms[True] / ms[False]:.2f}", flush=True)
    return rows


def main(argv=None) -> None:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    if args.formats_only:
        rows = format_steps(args.threads)
        common.save_json(common.resolve(args.out), {"date": common.now(), "machine": common.machine(),
                                                    "command": common.command_line(), "threads": args.threads,
                                                    "torch": torch.__version__, "format_steps": rows})
        return
    from hwsplit.network.families import build_seed
    from hwsplit.training.data import load_dataset

    bundle = load_dataset("npz", data_dir=common.resolve(args.data_dir), limit=args.images, test_limit=100)
    images, labels = bundle.train.images, bundle.train.labels
    mean, std = torch.tensor(bundle.mean), torch.tensor(bundle.std)
    scale = FULL_EPOCH / images.shape[0]
    rows = []
    for w in [float(x) for x in args.widths.split(",")]:
        for fmt in args.formats.split(","):
            cl = fmt == "last"
            best = {"bare": math.inf, "hwsplit": math.inf}
            for r in range(args.repeats):
                for kind in ("bare", "hwsplit"):
                    torch.manual_seed(r)
                    model = build_seed("mobilenet_v1_cifar", {}, tuple(bundle.input_shape), bundle.num_classes,
                                       width_mult=w)
                    if cl:
                        model = model.to(memory_format=torch.channels_last)
                    if kind == "bare":
                        s = bare_epoch(model, images, labels, mean, std, batch_size=args.batch_size,
                                       channels_last=cl, seed=r)
                    else:
                        s = hwsplit_epoch(model, bundle, batch_size=args.batch_size, channels_last=cl, seed=r)
                    best[kind] = min(best[kind], s * scale)
            row = {"width_mult": w, "format": "channels_last" if cl else "channels_first",
                   "bare_s": round(best["bare"], 2), "hwsplit_s": round(best["hwsplit"], 2),
                   "ratio": round(best["hwsplit"] / best["bare"], 3)}
            rows.append(row)
            print(f"width x{w:g} {row['format']:>14}: bare {row['bare_s']:6.1f} s  hwsplit {row['hwsplit_s']:6.1f} s"
                  f"  ratio {row['ratio']:.3f}   (per {FULL_EPOCH:,}-image epoch)", flush=True)
    out = {"date": common.now(), "machine": common.machine(), "command": common.command_line(),
           "images_timed": int(images.shape[0]), "batch_size": args.batch_size, "threads": args.threads,
           "torch": torch.__version__, "rows": rows}
    common.save_json(common.resolve(args.out), out)


if __name__ == "__main__":
    main()
