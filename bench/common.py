"""Helpers shared by the paper-claim benchmarks (bench_fast_vs_exact, bench_energy_vs_vanilla,
bench_split_vs_width, bench_hardware_cost): paths, machine description, the shared CLI flags, running
growth arms in parallel processes, and writing small, committable results.

Every benchmark writes its run directories under ``bench/results/<name>/`` and a markdown fragment
``bench/results/<name>.md``. Checkpoints (``stage-K.pt``) are deleted at the end unless a benchmark
needs them (``--keep-checkpoints``), so that what is committed is JSON, Markdown and PNG only.

Two choices every benchmark makes here, and says so in its fragment:

* **Full test set.** ``hwsplit.training.data.load_dataset(limit=N)`` also cuts the *test* set to ``N // 5``
  images. The benchmarks limit only the training images (``--limit``) and evaluate on the full
  CIFAR-10 test set (10,000 images) through ``GrowConfig(test_limit=None)`` (``--test-limit -1``
  restores the library's default, ``--test-limit N`` sets another number).
* **Shared seed.** Two arms of a comparison that differ only from stage 1 on (cost model, scoring
  method) start from the *same* trained seed: stage 0 is trained once, copied into the other arm's
  run directory (its record re-priced by that arm's cost model) and both arms continue with
  ``hwsplit.run.grow.grow(..., resume=True)``. The stage loop re-seeds every stage from the stage number,
  so the result is what two uninterrupted runs would give, at the cost of one seed instead of two.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import dataclasses
import datetime as _dt
import json
import logging
import multiprocessing as mp
import os
import platform
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# The paper's CIFAR-10 seed MobileNetV1 (arXiv:1910.03103 §5), as hwsplit.network.models ships it.
SEED_STEM = 8
SEED_WIDTHS = [8, 8, 8, 16, 16, 24, 24, 24, 24, 24, 24, 32, 32]

log = logging.getLogger("bench")


# ------------------------------------------------------------------------------------------------
# paths, flags, logging
# ------------------------------------------------------------------------------------------------

def resolve(path: str | Path) -> Path:
    """``path`` as given when absolute, else relative to the repository root (not the cwd)."""
    p = Path(path).expanduser()
    return p if p.is_absolute() else (ROOT / p)


def rel(path: str | Path) -> str:
    """``path`` relative to the repository root when inside it (for fragments and logs)."""
    try:
        return str(Path(path).resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def add_common_flags(parser: argparse.ArgumentParser, *, name: str, limit: int = 10000, epochs: int = 3,
                     seed_epochs: int = 10, stages: int = 3, jobs: int = 2) -> None:
    """The flags every benchmark takes (reduced-schedule defaults; the paper's schedule is flags only)."""
    parser.add_argument("--data-dir", default="../shared/data/cifar10",
                        help="CIFAR-10 as train.npz/test.npz (relative paths: from the repository root)")
    parser.add_argument("--limit", type=int, default=limit,
                        help="training images (first N of train.npz); 0 = all 50,000")
    parser.add_argument("--test-limit", type=int, default=0,
                        help="test images (first N of test.npz); 0 = all 10,000; -1 = hwsplit's default (limit // 5)")
    parser.add_argument("--epochs", type=int, default=epochs, help="training epochs per growth stage")
    parser.add_argument("--seed-epochs", type=int, default=seed_epochs, help="training epochs of the seed (stage 0)")
    parser.add_argument("--stages", type=int, default=stages, help="growth stages after the seed")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--growth-ratio", type=float, default=0.5, help="budget of a stage = ratio x current cost")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads per process (1: the small nets train fastest that way on a shared CPU)")
    parser.add_argument("--jobs", type=int, default=jobs,
                        help="arms run in parallel processes (1: one after the other)")
    parser.add_argument("--keep-checkpoints", action="store_true", help="keep every stage-K.pt")
    parser.add_argument("--fragment-only", action="store_true",
                        help="run nothing: rebuild <out>.md from the results saved in <out>")
    parser.add_argument("--out", default=f"bench/results/{name}",
                        help="directory of the run directories; the fragment is <out>.md")


def setup_logging(prefix: str = "") -> None:
    fmt = f"%(asctime)s {prefix}%(name)s: %(message)s" if prefix else "%(asctime)s %(name)s: %(message)s"
    logging.basicConfig(level=logging.INFO, format=fmt, datefmt="%H:%M:%S", stream=sys.stdout, force=True)


def data_limit(args: argparse.Namespace) -> int | None:
    return None if not args.limit or args.limit <= 0 else int(args.limit)


def grow_config(args: argparse.Namespace, **overrides: Any):
    """A GrowConfig for CIFAR-10 (npz) from the common flags; ``overrides`` win."""
    from hwsplit.run.config import GrowConfig

    fields = dict(
        # absolute, as grow stores it (a relative one would not match config.json when an arm resumes)
        model="mobilenet_v1_cifar", dataset="npz", data_dir=str(resolve(args.data_dir).resolve()),
        data_limit=data_limit(args), stages=args.stages, epochs=args.epochs, seed_epochs=args.seed_epochs,
        batch_size=args.batch_size, lr=args.lr, growth_ratio=args.growth_ratio, device=args.device,
        seed=args.seed, measure=False,
        # --limit cuts the training set only: all 10,000 test images unless --test-limit says otherwise
        test_limit={0: None, -1: "auto"}.get(args.test_limit, args.test_limit),
    )
    fields.update(overrides)
    return GrowConfig(**fields)


# ------------------------------------------------------------------------------------------------
# the process each arm runs in
# ------------------------------------------------------------------------------------------------

def prepare_process(threads: int, test_limit: int, tag: str = "") -> None:
    """Threads, logging and the test-set size of a benchmark process (the parent or an arm)."""
    import torch

    torch.set_num_threads(max(1, int(threads)))
    os.chdir(ROOT)  # relative paths in run configs (profiles/..., ../shared/data/...) are from the repository root
    setup_logging(f"[{tag}] " if tag else "")
    del test_limit  # the test-set size travels in each run's GrowConfig (grow_config)


def _arm(task: dict[str, Any]) -> dict[str, Any]:
    """Run one task in this process: ``{"kind": "grow"|"width", "config": {...}, "out": ..., ...}``."""
    prepare_process(task["threads"], task["test_limit"], task.get("tag", ""))
    from hwsplit.run.config import GrowConfig
    from hwsplit.run.grow import grow

    config = GrowConfig(**task["config"])
    t0 = time.perf_counter()
    if task["kind"] == "grow":
        records = grow(config, task["out"], resume=task.get("resume", False))
    elif task["kind"] == "width":
        from hwsplit.run.baselines import width_baseline

        records = width_baseline(config, task["multipliers"], task["out"], epochs=task.get("epochs"))
    else:
        raise ValueError(f"unknown task kind {task['kind']!r}")
    return {"out": task["out"], "stages": len(records), "wall_s": time.perf_counter() - t0}


def run_tasks(tasks: Sequence[dict[str, Any]], jobs: int) -> list[dict[str, Any]]:
    """Run tasks (see :func:`_arm`) in ``jobs`` spawned processes at a time."""
    ctx = mp.get_context("spawn")  # a fresh process per batch of arms, even for one: isolated threads/logging
    with cf.ProcessPoolExecutor(max_workers=max(1, min(jobs, len(tasks))), mp_context=ctx) as pool:
        return list(pool.map(_arm, tasks))


def grow_task(config, out: Path, args: argparse.Namespace, tag: str, *, resume: bool = False) -> dict[str, Any]:
    return {"kind": "grow", "config": config.to_dict(), "out": str(out), "resume": resume, "tag": tag,
            "threads": args.threads, "test_limit": args.test_limit}


def grow_arms_shared_seed(arms: dict[str, Any], root: Path, args: argparse.Namespace) -> dict[str, float]:
    """Grow every arm (``{name: GrowConfig}``, identical up to stage 0) from one trained seed in ``root/<name>``.

    See :func:`grow_groups_shared_seed`; returns wall seconds ``{"seed": ..., "arms": ...}``.
    """
    return grow_groups_shared_seed({"": arms}, root, args)


def grow_groups_shared_seed(groups: dict[str, dict[str, Any]], root: Path,
                            args: argparse.Namespace) -> dict[str, float]:
    """Grow arms in groups; the arms of a group (``{arm: GrowConfig}``) are identical up to stage 0.

    Each group's stage 0 is trained once, in ``root/<group>/<first arm>`` (the seeds of all groups
    ``args.jobs`` at a time); its checkpoint and record are copied into the group's other arm
    directories (the record re-priced by each arm's cost model) and every arm then resumes from stage
    1, ``args.jobs`` at a time. Returns wall seconds: ``{"seed": ..., "arms": ...}``.
    """
    t0 = time.perf_counter()
    seeds = []
    for group, arms in groups.items():
        first = next(iter(arms))
        seeds.append(grow_task(dataclasses.replace(arms[first], stages=0), root / group / first, args,
                               f"{group}/{first}".strip("/")))
        log.info("training the shared seed of %s in %s", group or "the arms", rel(root / group / first))
    run_tasks(seeds, args.jobs)
    t_seed = time.perf_counter() - t0
    tasks = []
    for group, arms in groups.items():
        names = list(arms)
        for name in names[1:]:
            copy_seed(root / group / names[0], root / group / name, arms[name])
        tasks += [grow_task(arms[n], root / group / n, args, f"{group}/{n}".strip("/"), resume=True) for n in names]
    t1 = time.perf_counter()
    for r in run_tasks(tasks, args.jobs):
        log.info("%s: %d stage(s) in %.0f s", rel(r["out"]), r["stages"], r["wall_s"])
    return {"seed": t_seed, "arms": time.perf_counter() - t1}


def copy_seed(src: Path, dst: Path, config) -> None:
    """Make ``dst`` a run of ``config`` whose stage 0 is ``src``'s (re-priced by ``config``'s cost model)."""
    import cost_models
    from hwsplit.infra.fsio import atomic_write_json
    from hwsplit.network.checkpoint import load_checkpoint, load_model
    from hwsplit.run.rundir import RunDir, start_fresh

    s, d = RunDir(src), RunDir(dst)
    start_fresh(d)
    shutil.copyfile(s.checkpoint(0), d.checkpoint(0))
    record = dict(s.records()[0])
    cm = cost_models.get_cost_model(config.cost, **config.cost_options)
    model = load_model(s.checkpoint(0))
    shape = tuple(load_checkpoint(s.checkpoint(0))["extra"].get("input_shape") or (1, 3, 32, 32))
    record["cost"] = {"name": cm.name, "unit": cm.unit, "value": cm.total(model, shape)}
    record.pop("measured", None)
    atomic_write_json(d.config, config.to_dict())
    d.write_records([record])


# ------------------------------------------------------------------------------------------------
# results: machine, checkpoints, fragments, tables
# ------------------------------------------------------------------------------------------------

def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict[str, Any]:
    import torch

    info = {"cpu": cpu_model(), "cores": os.cpu_count(), "python": platform.python_version(),
            "torch": torch.__version__, "os": f"{platform.system()} {platform.release()}",
            "loadavg": [round(x, 2) for x in os.getloadavg()]}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    try:
        import onnxruntime

        info["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    return info


def machine_line(info: dict[str, Any]) -> str:
    gpu = f", GPU {info['gpu']}" if info.get("gpu") else ", no GPU"
    return (f"{info['cpu']} ({info['cores']} cores, shared with other jobs){gpu}; Python {info['python']}, "
            f"torch {info['torch']}" + (f", onnxruntime {info['onnxruntime']}" if info.get("onnxruntime") else "")
            + f"; {info['os']}")


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def command_line() -> str:
    return "python " + " ".join([rel(sys.argv[0])] + sys.argv[1:])


def delete_checkpoints(root: Path, keep: Callable[[Path], bool] = lambda p: False) -> list[Path]:
    """Delete ``stage-K.pt`` files under ``root`` except those ``keep`` accepts; returns what was kept."""
    kept = []
    for p in sorted(root.rglob("stage-*.pt")):
        if keep(p):
            kept.append(p)
        else:
            p.unlink()
    return kept


def last_checkpoint(run: Path) -> Path | None:
    from hwsplit.run.rundir import RunDir

    cps = RunDir(run).checkpoints()
    return cps[max(cps)] if cps else None


def tree_size(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def md_table(rows: Sequence[Sequence[Any]]) -> str:
    head, *body = [[str(c) for c in r] for r in rows]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in body]
    return "\n".join(lines)


def schedule_line(args: argparse.Namespace) -> str:
    n_train = "all 50,000" if not data_limit(args) else f"first {args.limit:,}"
    n_test = {0: "all 10,000", -1: "hwsplit default (limit // 5)"}.get(args.test_limit, f"first {args.test_limit:,}")
    return (f"CIFAR-10 (`{args.data_dir}`, npz): {n_train} training images (random crop + flip), "
            f"{n_test} test images; seed {args.seed_epochs} epochs, {args.stages} growth stages of "
            f"{args.epochs} epochs, batch {args.batch_size}, SGD lr {args.lr} (Nesterov 0.9, cosine per stage, "
            f"weight decay 5e-4), growth ratio {args.growth_ratio}, seed {args.seed}, device {args.device}, "
            f"{args.threads} torch thread(s) per process, {args.jobs} process(es) in parallel")


def write_fragment(path: Path, title: str, sections: Sequence[tuple[str, str]]) -> None:
    """``path``: a markdown fragment ``## title`` then ``### heading`` + body per section."""
    lines = [f"## {title}", ""]
    for heading, body in sections:
        if heading:
            lines += [f"### {heading}", ""]
        lines += [body.rstrip(), ""]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines), encoding="utf-8")
    log.info("wrote %s", rel(path))


def records(run: Path) -> list[dict[str, Any]]:
    from hwsplit.run.rundir import RunDir

    return RunDir(run).records()


def fmt_num(x: float) -> str:
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            return f"{x / div:.3g}{suffix}"
    return f"{x:.4g}"


def save_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def header_sections(args: argparse.Namespace, info: dict[str, Any], wall_s: float) -> list[tuple[str, str]]:
    return [("How it was run",
             f"- command: `{command_line()}`\n- machine: {machine_line(info)}\n- date: {now()}\n"
             f"- schedule: {schedule_line(args)}\n- wall time of the whole script: {wall_s / 60:.1f} min "
             f"(load average at the start {info['loadavg'][0]:.2f}, at the end {os.getloadavg()[0]:.2f})")]


def interpolate(points: Sequence[tuple[float, float]], x: float) -> float | None:
    """Piecewise-linear y at ``x`` over ``points`` sorted by x; None outside their x-range."""
    pts = sorted(points)
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    if len(pts) == 1 and pts[0][0] == x:
        return pts[0][1]
    return None


def matched_comparison(a: Sequence[dict[str, Any]], b: Sequence[dict[str, Any]], key: str = "macs",
                       skip_first: bool = True) -> list[dict[str, Any]]:
    """Each point of ``a`` (records) against ``b``'s accuracy interpolated at the same log10 ``key``.

    ``skip_first`` leaves out ``a``'s first record (the shared seed). Points outside ``b``'s range are
    left out: no extrapolation.
    """
    import math

    curve = [(math.log10(r[key]), r["test_top1"]) for r in b]
    out = []
    for r in a[1:] if skip_first else a:
        y = interpolate(curve, math.log10(r[key]))
        if y is not None:
            out.append({"stage": r["stage"], key: r[key], "acc": r["test_top1"], "other_acc": y,
                        "diff": r["test_top1"] - y})
    return out


def accuracy_se(p: float, n_test: int) -> float:
    """Standard error of a test accuracy ``p`` measured on ``n_test`` images."""
    import math

    return math.sqrt(max(p * (1 - p), 1e-12) / max(1, n_test))


def n_test_images(args: argparse.Namespace) -> int:
    if args.test_limit == 0:
        return 10000
    if args.test_limit > 0:
        return min(10000, args.test_limit)
    return max(1, (data_limit(args) or 50000) // 5)


def save_run_info(out: Path, args: argparse.Namespace, info: dict[str, Any], wall_s: float,
                  **extra: Any) -> dict[str, Any]:
    """``<out>/run_info.json``: how the results were made (for ``--fragment-only`` to rebuild the fragment)."""
    run_info = {"how": header_sections(args, info, wall_s)[0][1], "args": vars(args), "n_test": n_test_images(args),
                "wall_s": wall_s, **extra}
    save_json(out / "run_info.json", run_info)
    return run_info


def begin(args: argparse.Namespace, write_fragment: Any) -> tuple[Path, dict[str, Any], float] | None:
    """The shared start of a benchmark's ``main``: set up the process; with ``--fragment-only`` rebuild
    the fragment from saved results and return None; else create ``--out`` and return
    ``(out, machine info, start time)``."""
    prepare_process(args.threads, args.test_limit)
    out = resolve(args.out)
    if args.fragment_only:
        run_info, run_args = load_run_info(out)
        write_fragment(out, run_args, run_info)
        return None
    info = machine()
    out.mkdir(parents=True, exist_ok=True)
    log.info("machine: %s", machine_line(info))
    return out, info, time.perf_counter()


def finish(out: Path, args: argparse.Namespace, info: dict[str, Any], t_start: float, write_fragment: Any,
           **extra: Any) -> None:
    """The shared end of a benchmark's ``main``: drop checkpoints (unless ``--keep-checkpoints``), save
    ``run_info.json`` with ``extra``, write the fragment and log the wall time."""
    delete_checkpoints(out, keep=lambda p: args.keep_checkpoints)
    wall = time.perf_counter() - t_start
    run_info = save_run_info(out, args, info, wall, **extra)
    write_fragment(out, args, run_info)
    log.info("done in %.1f min; results %s (%d bytes)", wall / 60, rel(out), tree_size(out))


def load_run_info(out: Path) -> tuple[dict[str, Any], argparse.Namespace]:
    """The saved run info and the arguments the results were made with."""
    path = out / "run_info.json"
    if not path.exists():
        raise SystemExit(f"{rel(path)} does not exist: run the benchmark first (without --fragment-only)")
    run_info = json.loads(path.read_text(encoding="utf-8"))
    return run_info, argparse.Namespace(**run_info["args"])
