"""How training and scoring scale with torch's intra-op threads, on a quiet machine and beside one other
CPU-bound process: the measurement behind hwsplit's thread default (``--threads``).

    python bench/bench_threads.py                 # quiet machine: run it with nothing else busy

For each network (the digits seed of the README's main job and a 4× wider one, the CIFAR seed at widths 1 and
2.5) and each thread count (``--threads``, default 1 and all cores), it times ``--steps`` training steps
(forward, backward, SGD; batch ``--batch-size`` of random inputs, channels-last as hwsplit trains) and one
scoring call (``hwsplit.splitting.score.splitting_indices`` over ``--score-batches`` batches), first alone, then with a
competing process (one thread of float32 matrix products, the stand-in for "another job on the machine").
Printed and saved: milliseconds per training step and seconds per scoring call, and each thread count's time
÷ one thread's.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

NETWORKS = [("digits seed", (1, 8, 8), 1.0, 64), ("digits ×4", (1, 8, 8), 4.0, 64),
            ("cifar seed", (3, 32, 32), 1.0, 128), ("cifar ×2.5", (3, 32, 32), 2.5, 128)]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", default=f"1,{os.cpu_count()}")
    p.add_argument("--steps", type=int, default=15)
    p.add_argument("--score-batches", type=int, default=4)
    p.add_argument("--out", default="bench/results/threads.json")
    return p.parse_args(argv)


def _compete(stop) -> None:  # pragma: no cover - runs in a child process
    import torch

    torch.set_num_threads(1)
    a = torch.randn(512, 512)
    while not stop.is_set():
        a = (a @ a).tanh_()


def _time(name: str, shape, width: float, batch: int, threads: int, steps: int, score_batches: int) -> dict:
    import torch
    import torch.nn.functional as F

    from hwsplit.network.families import build_seed
    from hwsplit.splitting.score import splitting_indices

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = build_seed("mobilenet_v1_cifar", {}, shape, 10, width_mult=width)
    x, y = torch.randn(batch, *shape), torch.randint(0, 10, (batch,))
    model = model.to(memory_format=torch.channels_last)
    xc = x.contiguous(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step():
        loss = F.cross_entropy(model(xc), y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    step()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    train_ms = (time.perf_counter() - t0) / steps * 1e3
    model = model.to(memory_format=torch.contiguous_format)
    batches = [(x, y)] * score_batches
    t0 = time.perf_counter()
    splitting_indices(model, batches, seed=0)
    score_s = time.perf_counter() - t0
    return {"network": name, "threads": threads, "train_step_ms": round(train_ms, 2), "score_s": round(score_s, 3)}


def main(argv=None) -> None:
    args = parse_args(argv)
    threads = [int(t) for t in args.threads.split(",")]
    rows = []
    for load in ("quiet", "one competing process"):
        stop, child = None, None
        if load != "quiet":
            stop = mp.get_context("spawn").Event()
            child = mp.get_context("spawn").Process(target=_compete, args=(stop,), daemon=True)
            child.start()
            time.sleep(2)
        try:
            for name, shape, width, batch in NETWORKS:
                base = None
                for t in threads:
                    r = {"load": load, **_time(name, shape, width, batch, t, args.steps, args.score_batches)}
                    base = base or r
                    r["train_vs_1"] = round(r["train_step_ms"] / base["train_step_ms"], 2)
                    r["score_vs_1"] = round(r["score_s"] / base["score_s"], 2)
                    rows.append(r)
                    print(f"{load:>22} {name:>12} threads {t}: train {r['train_step_ms']:8.2f} ms/step "
                          f"({r['train_vs_1']:.2f}x), score {r['score_s']:7.3f} s ({r['score_vs_1']:.2f}x)", flush=True)
        finally:
            if child is not None:
                stop.set()
                child.join(10)
    import torch

    common.save_json(common.resolve(args.out), {"date": common.now(), "machine": common.machine(),
                                                "command": common.command_line(), "torch": torch.__version__,
                                                "rows": rows})


if __name__ == "__main__":
    main()
