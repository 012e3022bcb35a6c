"""Wall time of one growth stage with 1 and 2 processes (torchrun, gloo, CPU), and the scaling to N devices
expected on paper from the measured split of the stage (issue 14).

    flock /work/locks/core1.lock python bench/bench_distributed.py

Both arms grow the same CIFAR-10 seed MobileNetV1 (``--limit`` training images) for one stage with
the same *global* batch (``--global-batch``: one process with the whole batch, two with half each,
which by construction follow the same trajectory), the same epochs, and the Rayleigh scoring of the
default settings; stage 0 (the seed) is trained for ``--seed-epochs`` and not timed. Each arm runs
``--repeats`` times, alternating, and the median is reported. On rank 0 the stage's own timings are
read from its record (score_s, select_s, split_s, train_s) and the stage's wall time is measured
around it; the all-reduce is timed apart on the same two processes (a gradient-sized all-reduce,
and the scoring's per-batch reductions), since DDP overlaps it with the backward pass.

The N-device estimate (``on_paper``) takes the one-process split: the sharded parts (training,
scoring, evaluation) divide by N, the replicated parts (selection, surgery, tracing, pricing) do
not, and the all-reduce adds steps/N × (the measured per-step cost at N = 2) × (2(N-1)/N) / 1 (a
ring all-reduce moves 2(N-1)/N of the buffer per rank). That per-step cost is gloo over loopback
on this CPU; NCCL over NVLink or PCIe is faster, so the estimate is a lower bound on the speed-up
for the compute it measures, and says nothing about GPU kernels themselves.

Writes ``bench/results/distributed.json`` and ``bench/results/distributed.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def _worker(args: argparse.Namespace) -> None:
    """One rank of one arm: grow one stage, time it, time the all-reduces; rank 0 writes ``args.worker``."""
    import torch

    torch.set_num_threads(1)
    from hwsplit.config import GrowConfig
    from hwsplit.distributed import barrier, is_main, rank, sum_across_ranks, world_size
    from hwsplit.grow import grow
    from hwsplit.parallel import entry_point

    @entry_point
    def run() -> dict:
        world = world_size()
        config = GrowConfig(model="mobilenet_v1_cifar", dataset="npz", data_dir=args.data_dir, data_limit=args.limit,
                            test_limit=args.test_limit, stages=1, epochs=args.epochs, seed_epochs=args.seed_epochs,
                            batch_size=args.global_batch // world, lr=0.1, seed=0, measure=False)
        marks: list[float] = []
        barrier()
        t0 = time.perf_counter()
        records = grow(config, Path(args.worker).with_suffix(f".run{world}"), overwrite=True,
                       on_stage=lambda r: marks.append(time.perf_counter()))
        barrier()
        stage_wall = time.perf_counter() - marks[0] if is_main() else 0.0
        result = {"rank": rank(), "world_size": world, "stage_wall_s": stage_wall, "total_s": time.perf_counter() - t0,
                  "seconds": records[-1]["seconds"], "params": records[-1]["params"],
                  "train_top1": records[-1]["train_top1"], "test_top1": records[-1]["test_top1"],
                  "neurons_split": records[-1].get("neurons_split"),
                  "steps_per_epoch": -(-args.limit // args.global_batch)}
        if world > 1:  # the all-reduce apart: one gradient-sized buffer, as DDP reduces per step
            grad = torch.zeros(records[-1]["params"])
            times = []
            for _ in range(args.allreduce_reps):
                barrier()
                t = time.perf_counter()
                sum_across_ranks(grad)
                times.append(time.perf_counter() - t)
            result["allreduce_grad_s"] = statistics.median(times)
        return result

    result = run()
    if result["rank"] == 0:  # the process group is gone by now: rank() would say 0 everywhere
        Path(args.worker).write_text(json.dumps(result))


def _arm(world: int, args: argparse.Namespace, out: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    worker = [str(Path(__file__).resolve()), "--worker", str(out), "--data-dir", args.data_dir,
              "--limit", str(args.limit), "--test-limit", str(args.test_limit), "--epochs", str(args.epochs),
              "--seed-epochs", str(args.seed_epochs), "--global-batch", str(args.global_batch)]
    if world == 1:
        cmd = [sys.executable, *worker]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(world), "--standalone",
               *worker]
    t = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, timeout=1800)
    result = json.loads(out.read_text())
    result["process_wall_s"] = time.perf_counter() - t
    return result


def on_paper(single: dict, double: dict, n: int) -> dict:
    """Stage time expected on ``n`` devices from the one-process split and the measured all-reduce."""
    s = single["seconds"]
    sharded = s["score_s"] + s["train_s"]
    replicated = single["stage_wall_s"] - sharded  # selection, surgery, evaluation, tracing, records
    steps = double["steps_per_epoch"] * double.get("epochs", 1)
    comm = 0.0 if n == 1 else steps / n * double["allreduce_grad_s"] * (2 * (n - 1) / n)
    t = sharded / n + replicated + comm
    return {"n": n, "stage_s": t, "speedup": single["stage_wall_s"] / t, "allreduce_s": comm,
            "no_comm_speedup": single["stage_wall_s"] / (sharded / n + replicated)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default="/work/shared/data/cifar10")
    parser.add_argument("--limit", type=int, default=2000, help="training images")
    parser.add_argument("--test-limit", type=int, default=1000)
    parser.add_argument("--epochs", type=int, default=1, help="training epochs of the timed stage")
    parser.add_argument("--seed-epochs", type=int, default=1)
    parser.add_argument("--global-batch", type=int, default=64, help="samples per step over all processes")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--allreduce-reps", type=int, default=30)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default="bench/results/distributed")
    args = parser.parse_args()
    if args.worker:
        _worker(args)
        return

    import common

    out = ROOT / args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path("/tmp") / f"bench_distributed_{os.getpid()}"
    scratch.mkdir(exist_ok=True)
    info, start = common.machine(), time.perf_counter()
    runs: dict[int, list[dict]] = {1: [], 2: []}
    for rep in range(args.repeats):
        for world in (1, 2):
            runs[world].append(_arm(world, args, scratch / f"w{world}-r{rep}.json"))
            print(f"repeat {rep}, {world} process(es): stage {runs[world][-1]['stage_wall_s']:.1f} s", flush=True)

    def median_run(world: int) -> dict:
        ordered = sorted(runs[world], key=lambda r: r["stage_wall_s"])
        return ordered[len(ordered) // 2]

    single, double = median_run(1), median_run(2)
    double["epochs"] = args.epochs
    result = {
        "command": "flock /work/locks/core1.lock " + common.command_line(), "date": common.now(),
        "machine": info, "loadavg_end": [round(x, 2) for x in os.getloadavg()],
        "settings": {k: v for k, v in vars(args).items() if k != "worker"},
        "runs": {str(k): v for k, v in runs.items()},
        "median": {"1": single, "2": double},
        "measured_speedup_2": single["stage_wall_s"] / double["stage_wall_s"],
        "on_paper": [on_paper(single, double, n) for n in (1, 2, 4, 8)],
        "wall_s": time.perf_counter() - start,
    }
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    out.with_suffix(".md").write_text(fragment(result))
    print(fragment(result))


def fragment(r: dict) -> str:
    s1, s2 = r["median"]["1"], r["median"]["2"]

    def split(s: dict) -> str:
        x = s["seconds"]
        return (f"{s['stage_wall_s']:.1f} s (score {x['score_s']:.1f}, select {x['select_s']:.2f}, "
                f"split+eval {x['split_s']:.1f}, train {x['train_s']:.1f})")

    lines = [f"Command: `{r['command']}`; {r['date']}; {r['machine']['cpu']}, {r['machine']['cores']} cores, "
             f"1 thread per process, load average {r['machine']['loadavg']} at the start and "
             f"{r['loadavg_end']} at the end (other jobs on the machine).", "",
             f"One stage, global batch {r['settings']['global_batch']}, {r['settings']['limit']} CIFAR-10 "
             f"images, median of {r['settings']['repeats']}:", "",
             "| processes | stage wall time (split) | all-reduce of the gradient (per step) |",
             "|---|---|---|",
             f"| 1 | {split(s1)} | — |",
             f"| 2 | {split(s2)} | {s2['allreduce_grad_s'] * 1e3:.2f} ms ({s2['params']} float32) |", "",
             f"Measured speed-up with 2 processes: {r['measured_speedup_2']:.2f}x.", "",
             "On paper for N devices (sharded: training + scoring; replicated: the rest; all-reduce at the "
             "measured gloo cost):", "",
             "| N | stage (s) | speed-up | all-reduce (s) | speed-up without all-reduce |", "|---|---|---|---|---|"]
    lines += [f"| {p['n']} | {p['stage_s']:.1f} | {p['speedup']:.2f} | {p['allreduce_s']:.2f} | "
              f"{p['no_comm_speedup']:.2f} |" for p in r["on_paper"]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
