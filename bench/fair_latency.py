"""bench_fair.py's latency axis: every compared architecture timed end to end on a quiet core (``--steps measure``).

``<out>/latency.json`` holds, per architecture (:func:`arch_key`), the passes of onnxruntime's latency (1 thread,
batch 1, ms), their median and the latency table's prediction; a network's latency is its architecture's.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import fair_compare as fc  # noqa: E402
from common import log  # noqa: E402
from fair_arms import ARMS, PRUNE_METHODS  # noqa: E402

INPUT_SHAPE = (1, 3, 32, 32)


def arch_key(arch: dict) -> str:
    return json.dumps(arch, sort_keys=True)


def compared_architectures(root: Path) -> list[dict]:
    """One record per architecture that a comparison of seed directory ``root`` uses, the first record of each
    (deduplicated by :func:`arch_key`): width multipliers (every schedule: ``width-x*`` and ``width<N>-x*``),
    every arm's grown stages with their retrained and fine-tuned copies (the same architectures), and the pruned
    networks, fine-tuned and retrained (not the wide network they were pruned from: no comparison uses it).

    Every record that the run layer writes carries ``architecture``; one without it (a run older than the field)
    cannot be rebuilt and so cannot be timed: it is left out, with a log line."""
    recs = [r for d in sorted(root.glob("width*-x*")) if fc.done(d) for r in fc.records(d)]
    for arm in ARMS:
        g = root / f"grow-{arm}"
        recs += fc.records(g) + fc.derived(g, "retrain") + fc.derived(g, "finetune")
    for method in PRUNE_METHODS:
        d = root / f"prune-{method}"
        recs += [r for r in fc.records(d) if r.get("stage", 0) >= 1] + fc.records(d / "retrain")
    by_arch: dict[str, dict] = {}
    missing = 0
    for r in recs:
        if "architecture" not in r:
            missing += 1
            continue
        by_arch.setdefault(arch_key(r["architecture"]), r)
    if missing:
        log.info("%s: %d record(s) without an architecture field (runs older than it) cannot be timed: left out",
                 root.name, missing)
    return list(by_arch.values())


def measure_latency(out: Path, root: Path, args: argparse.Namespace) -> None:
    """Time every compared architecture of ``root`` (:func:`compared_architectures`) not yet measured
    ``--measure-passes`` times in ``<out>/latency.json``: interleaved passes over them (each network once per
    pass), so that the measurements of a network are minutes apart. The table is saved after every pass: a killed
    measurement continues from its last pass. ``latency_ms`` (the median of the passes, in ms) is written once a
    network has all its passes; until then the network counts as not measured."""
    import torch

    import cost_models
    from hwsplit.network.models import model_from_architecture

    path = out / "latency.json"
    table = json.loads(path.read_text()) if path.exists() else {"networks": {}, "sessions": []}
    compared = compared_architectures(root)
    todo: dict[str, dict] = {}
    for r in compared:
        k = arch_key(r["architecture"])
        if len(table["networks"].get(k, {}).get("passes_ms", [])) < args.measure_passes:
            todo[k] = r
    if not todo:
        log.info("%s: %s", root.name, f"all {len(compared)} architectures are measured already" if compared
                 else "no architecture to time yet")
        return
    here, before = common.cpu_model(), machines(table)
    if before and before != [here]:
        raise SystemExit(f"{path}: its latencies were measured on {', '.join(before)}; this machine is {here}. "
                         "Latencies of two machines do not compare: time the new architectures on that machine, or "
                         "move latency.json aside to time every architecture on this one.")
    check_same_machine(table, path, args.measure_time)
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
            passes[k].append(_time_once(model, args.measure_time))
            log.info("%s pass %d: %d/%d %.4f ms", root.name, p + 1, i + 1, len(models), passes[k][-1])
        save()


def _time_once(model, time_budget_s: float) -> float:
    """One end-to-end latency (ms) of ``model``: onnxruntime, 1 thread, batch 1, the protocol of every entry."""
    from cost_models.profiling.measure import measure_model

    return measure_model(model, INPUT_SHAPE, backend="onnxruntime", threads=1,
                         time_budget_s=time_budget_s)["latency_ms"]["median"]


def check_same_machine(table: dict, path: Path, time_budget_s: float) -> None:
    """Time the fastest and the slowest network ``table`` holds once more and refuse (``SystemExit``) when the median
    of now ÷ then is beyond ±``DRIFT_LIMIT_PCT`` % (the limit of hwsplit's ``drift``): the CPU model a VM reports
    does not identify its host (BENCHMARKS.md: two "AMD EPYC" hosts 1.85× apart), and latencies of two hosts, or of
    one that drifted, do not compare. Nothing to check in a table without a finished network."""
    import torch

    from cost_models.profiling.profiler import DRIFT_LIMIT_PCT
    from hwsplit.network.models import model_from_architecture

    done = sorted((n for n in table.get("networks", {}).values() if n.get("latency_ms")), key=lambda n: n["latency_ms"])
    if not done:
        return
    ratios = []
    for n in {id(n): n for n in (done[0], done[-1])}.values():
        torch.manual_seed(0)
        model = model_from_architecture(n["architecture"]).eval()
        ratios.append(_time_once(model, time_budget_s) / n["latency_ms"])
    ratio = statistics.median(ratios)
    log.info("same-machine check: %d network(s) of %s now at %.3f× their recorded latency", len(ratios), path.name,
             ratio)
    if abs(ratio - 1) * 100 > DRIFT_LIMIT_PCT:
        raise SystemExit(f"{path}: networks it holds now run at {ratio:.2f}× their recorded latency (limit "
                         f"±{DRIFT_LIMIT_PCT:g} %): this is another machine than the one that timed them, or it "
                         "drifted. Time the new architectures there, or move latency.json aside to time every "
                         "architecture again here.")


def machines(table: dict) -> list[str]:
    """The CPUs ``latency.json``'s sessions ran on, in order of first use (one, unless someone mixed them)."""
    return list(dict.fromkeys(s["machine"]["cpu"] for s in table.get("sessions", []) if s.get("machine")))


def resolution(table: dict) -> float:
    """2 SE of the difference of two networks' measured latencies, relative: 2 √2 × the median over ``table``'s
    networks (``latency.json``) of the standard error of their mean over passes ÷ that mean. Two latencies closer
    than this are not told apart by the measurement (0 when no network has two passes)."""
    ses = [statistics.stdev(p) / math.sqrt(len(p)) / statistics.fmean(p) for n in table.values()
           if len(p := n.get("passes_ms", [])) > 1]
    return 2 * math.sqrt(2) * statistics.median(ses) if ses else 0.0


def latency_of(r: dict, table: dict) -> float | None:
    """The measured latency (ms) of ``r``'s architecture in ``table`` (``latency.json``'s networks); None when it
    has none (not measured, passes missing, or no ``architecture`` field)."""
    m = table.get(arch_key(r["architecture"])) if "architecture" in r else None
    return m.get("latency_ms") if m else None


def with_latency(recs: list[dict], table: dict) -> list[dict]:
    return [{**r, "latency_ms": latency_of(r, table)} for r in recs]
