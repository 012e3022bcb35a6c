"""Wall time of one growth stage with 1 and 2 processes (torchrun, gloo, CPU), and the scaling to N devices
expected on paper from the measured split of the stage (issue 14).

    python bench/bench_distributed.py

Both arms grow the same CIFAR-10 seed MobileNetV1 (``--limit`` training images) for one stage with
the same *global* batch (``--global-batch``: one process with the whole batch, two with half each,
which by construction follow the same trajectory), the same epochs, and the Rayleigh scoring of the
default settings; stage 0 (the seed) is trained for ``--seed-epochs`` and not timed. Each arm runs
``--repeats`` times, alternating, and the median is reported. On rank 0 the stage's own timings are
read from its record (score_s, select_s, split_s, train_s) and the stage's wall time is measured
around it; the all-reduce is timed apart on the same two processes (a gradient-sized all-reduce,
and the scoring's per-batch reductions), since DDP overlaps it with the backward pass.

A third arm runs one process on one rank's share (half the images, half the batch), which
separates each step's fixed overhead from its per-sample work; the N-device estimate
(``on_paper``, see :func:`on_paper`) divides only the per-sample work by N. The all-reduce cost
is gloo over loopback on this CPU; NCCL over NVLink or PCIe is faster, and a GPU step is more
nearly all per-sample work, so the estimate says what this network on this machine would gain,
not what GPU kernels would.

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
    from hwsplit.infra.distributed import barrier, is_main, rank, sum_across_ranks, world_size
    from hwsplit.infra.parallel import entry_point
    from hwsplit.run.config import GrowConfig
    from hwsplit.run.grow import grow

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


def _arm(world: int, args: argparse.Namespace, out: Path, *, half: bool = False) -> dict:
    """One arm in fresh processes; ``half``: one process doing one rank's share of the 2-process arm
    (half the images, half the batch: the same number of steps with half the work each)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    limit, batch = (args.limit // 2, args.global_batch // 2) if half else (args.limit, args.global_batch)
    worker = [str(Path(__file__).resolve()), "--worker", str(out), "--data-dir", args.data_dir,
              "--limit", str(limit), "--test-limit", str(args.test_limit), "--epochs", str(args.epochs),
              "--seed-epochs", str(args.seed_epochs), "--global-batch", str(batch)]
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


def on_paper(single: dict, half: dict, double: dict, n: int, split_epochs: int = 1) -> dict:
    """Stage time expected on ``n`` devices at the same global batch, from measured parts.

    Training and scoring take the same number of steps on every rank whatever ``n`` (the global
    batch is fixed), each step doing 1/n of the samples. From one process on all the data
    (``single``: steps s, time a) and on one rank's share (``half``: the same s steps, half the
    samples each, time b): per-sample work C = 2(a - b), per-step overhead s·o = 2b - a (clamped
    to [0, a]), separately for training and scoring. Then T(n) = s·o + C/n + the replicated rest
    (selection, surgery, evaluation, pricing, records: the one-process stage minus training and
    scoring) + the all-reduces: one gradient-sized all-reduce per training step and one
    parameter-sized one per Rayleigh step, each at the measured 2-process cost × 2(n-1)/n (ring).
    """
    a, b = single["seconds"], half["seconds"]
    fixed = compute = 0.0
    for part in ("train_s", "score_s"):
        step = min(max(2 * b[part] - a[part], 0.0), a[part])
        fixed += step
        compute += a[part] - step
    replicated = single["stage_wall_s"] - a["train_s"] - a["score_s"]
    collectives = single["steps_per_epoch"] * (double.get("epochs", 1) + split_epochs)
    comm = 0.0 if n == 1 else collectives * double["allreduce_grad_s"] * (2 * (n - 1) / n)
    t = fixed + compute / n + replicated + comm
    return {"n": n, "stage_s": t, "speedup": single["stage_wall_s"] / t, "allreduce_s": comm,
            "per_step_overhead_s": fixed, "per_sample_work_s": compute, "replicated_s": replicated,
            "no_comm_speedup": single["stage_wall_s"] / (fixed + compute / n + replicated),
            "compute_bound_speedup": single["stage_wall_s"] / ((fixed + compute) / n + replicated)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default="../shared/data/cifar10")
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
    runs: dict[str, list[dict]] = {"1": [], "2": [], "1-half": []}
    for rep in range(args.repeats):
        for arm in runs:
            runs[arm].append(_arm(2 if arm == "2" else 1, args, scratch / f"w{arm}-r{rep}.json",
                                  half=arm == "1-half"))
            print(f"repeat {rep}, arm {arm}: stage {runs[arm][-1]['stage_wall_s']:.1f} s", flush=True)

    def median_run(arm: str) -> dict:
        ordered = sorted(runs[arm], key=lambda r: r["stage_wall_s"])
        return ordered[len(ordered) // 2]

    single, double, half = median_run("1"), median_run("2"), median_run("1-half")
    double["epochs"] = args.epochs
    result = {
        "command": "" + common.command_line(), "date": common.now(),
        "machine": info, "loadavg_end": [round(x, 2) for x in os.getloadavg()],
        "settings": {k: v for k, v in vars(args).items() if k != "worker"},
        "runs": runs,
        "median": {"1": single, "2": double, "1-half": half},
        "measured_speedup_2": single["stage_wall_s"] / double["stage_wall_s"],
        "on_paper": [on_paper(single, half, double, n) for n in (1, 2, 4, 8)],
        "wall_s": time.perf_counter() - start,
    }
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    out.with_suffix(".md").write_text(fragment(result))
    print(fragment(result))


def fragment(r: dict) -> str:
    s1, s2, sh = r["median"]["1"], r["median"]["2"], r["median"]["1-half"]
    p = r["on_paper"][0]

    def split(s: dict) -> str:
        x = s["seconds"]
        return (f"{s['stage_wall_s']:.1f} s (score {x['score_s']:.1f}, select {x['select_s']:.2f}, "
                f"split+eval {x['split_s']:.1f}, train {x['train_s']:.1f})")

    g, lim = r["settings"]["global_batch"], r["settings"]["limit"]
    lines = [f"Command: `{r['command']}`; {r['date']}; {r['machine']['cpu']}, {r['machine']['cores']} cores, "
             f"1 thread per process, load average {r['machine']['loadavg']} at the start and "
             f"{r['loadavg_end']} at the end (other jobs on the machine).", "",
             f"One growth stage of the CIFAR-10 seed MobileNetV1, {lim} training images, global batch {g}, "
             f"median of {r['settings']['repeats']}:", "",
             "| arm | stage wall time (split) | all-reduce of the gradient (per step) |",
             "|---|---|---|",
             f"| 1 process, batch {g}, {lim} images | {split(s1)} | — |",
             f"| 2 processes, batch {g // 2} each | {split(s2)} | {s2['allreduce_grad_s'] * 1e3:.2f} ms "
             f"({s2['params']} float32) |",
             f"| 1 process doing one rank's share (batch {g // 2}, {lim // 2} images) | {split(sh)} | — |", "",
             f"Measured speed-up with 2 processes: {r['measured_speedup_2']:.2f}x.", "",
             f"On paper for N devices at the same global batch (from the arms above: per-step overhead "
             f"{p['per_step_overhead_s']:.1f} s, per-sample work {p['per_sample_work_s']:.1f} s, replicated "
             f"{p['replicated_s']:.1f} s; all-reduce at the measured gloo cost):", "",
             "| N | stage (s) | speed-up | all-reduce (s) | without all-reduce | if per-step overhead also divided |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {q['n']} | {q['stage_s']:.1f} | {q['speedup']:.2f} | {q['allreduce_s']:.2f} | "
              f"{q['no_comm_speedup']:.2f} | {q['compute_bound_speedup']:.2f} |" for q in r["on_paper"]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
