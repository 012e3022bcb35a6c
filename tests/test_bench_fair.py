"""bench/bench_fair.py's measured-latency axis (issues 25 and 27) on synthetic result trees: which architectures
the step ``measure`` times, the comparisons at matched measured latency, the fragment and the second plot.

Nothing here times a network: the records and ``latency.json`` hold made-up numbers, and the one test of the
step ``measure`` itself replaces the end-to-end timer (it checks the bookkeeping: what is timed, how often, and
that a killed measurement continues from its last pass).
"""

from __future__ import annotations

import json
import logging
import math
import re
import statistics
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import bench_fair  # noqa: E402
import common  # noqa: E402
import fair_arms  # noqa: E402
import fair_compare  # noqa: E402
import fair_latency  # noqa: E402

STRIDES = [1, 2, 1, 2, 1, 2, 1, 1, 1, 1, 1, 2, 1]
SEED = [8, 8, 8, 16, 16, 24, 24, 24, 24, 24, 24, 32, 32]


def arch(scale: float = 1.0, last: int | None = None) -> dict:
    """A CIFAR MobileNetV1 architecture: the seed's widths × ``scale``, the last layer ``last`` wide if given."""
    widths = [max(1, round(w * scale)) for w in SEED]
    if last is not None:
        widths[-1] = last
    return {"activation": "silu", "dropout": 0.0, "family": "mobilenet_v1", "in_channels": 3, "num_classes": 10,
            "stem_stride": 1, "stem_width": max(1, round(8 * scale)), "strides": STRIDES, "widths": widths}


def rec(a: dict | None, *, stage: int = 0, macs: float, acc: float, **extra) -> dict:
    r = {"stage": stage, "macs": macs, "test_top1": acc, "val_top1": acc, "epochs": 30,
         "schedule": {"epochs": 30}, "seconds": {"train_s": 1.0}, **extra}
    if a is not None:
        r["architecture"] = a
    return r


def write(run: Path, records: list[dict], done: bool = True) -> None:
    run.mkdir(parents=True, exist_ok=True)
    (run / "stages.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if done:
        (run / "DONE").write_text("{}\n")


def key(a: dict) -> str:
    return fair_latency.arch_key(a)


# ------------------------------------------------------------------------------------------------
# which architectures the step measure times
# ------------------------------------------------------------------------------------------------

def test_compared_architectures_every_arm_once_and_records_without_architecture_logged(tmp_path, caplog):
    root = tmp_path / "s0"
    w1, w2, g1, g2, a1, p1, p2, wide = (arch(1), arch(2), arch(1, last=48), arch(1, last=64), arch(1, last=40),
                                        arch(1, last=20), arch(1.5, last=20), arch(3))
    write(root / "width-x1", [rec(w1, macs=1, acc=0.7, width_mult=1.0)])
    write(root / "width-x2", [rec(w2, macs=4, acc=0.8, width_mult=2.0)])
    write(root / "width65-x2", [rec(w2, macs=4, acc=0.81, width_mult=2.0)])  # the same architecture, 65 epochs
    write(root / "width-x3", [rec(arch(3), macs=9, acc=0.85, width_mult=3.0)], done=False)  # in training
    write(root / "width-x2.5", [rec(None, macs=6, acc=0.84, width_mult=2.5)])  # older than the field
    write(root / "grow-flops", [rec(w1, stage=0, macs=1, acc=0.6), rec(g1, stage=1, macs=1.5, acc=0.65),
                                rec(g2, stage=2, macs=2, acc=0.7)])
    write(root / "grow-flops" / "retrain-1", [rec(g1, macs=1.5, acc=0.72, source_stage=1)])
    write(root / "grow-flops" / "retrain-2", [rec(g2, macs=2, acc=0.74, source_stage=2)], done=False)
    write(root / "grow-flops" / "finetune-2", [rec(g2, macs=2, acc=0.75, source_stage=2, epochs_in_all=65)])
    write(root / "grow-authors", [rec(w1, stage=0, macs=1, acc=0.6), rec(a1, stage=1, macs=1.4, acc=0.66)])
    write(root / "prune-slimming", [rec(wide, stage=0, macs=9, acc=0.85), rec(p1, stage=1, macs=1.2, acc=0.7),
                                    rec(p2, stage=2, macs=2.1, acc=0.72)])
    write(root / "prune-slimming" / "retrain", [rec(p1, stage=0, macs=1.2, acc=0.71, source_stage=1),
                                                rec(p2, stage=1, macs=2.1, acc=0.73, source_stage=2)], done=False)
    with caplog.at_level(logging.INFO, logger="bench"):
        got = fair_latency.compared_architectures(root)
    keys = [key(r["architecture"]) for r in got]
    assert len(keys) == len(set(keys))  # each architecture once
    # every width multiplier done, every grown stage (retrained and fine-tuned copies are the same), the pruned
    # networks; not the wide network they were pruned from, not a width multiplier still in training
    assert set(keys) == {key(a) for a in (w1, w2, g1, g2, a1, p1, p2)}
    assert "1 record(s) without an architecture field" in caplog.text


def test_measure_times_each_architecture_its_passes_and_continues_after_a_kill(tmp_path, monkeypatch):
    import cost_models.profiling.measure
    from hwsplit.network.models import architecture

    out = tmp_path / "fair_full"
    root = out / "s0"
    write(root / "width-x1", [rec(arch(1), macs=550e3, acc=0.7, width_mult=1.0)])
    write(root / "width-x2", [rec(arch(2), macs=2.2e6, acc=0.8, width_mult=2.0)])
    write(root / "grow-flops", [rec(arch(1), stage=0, macs=550e3, acc=0.6),
                                rec(arch(1, last=64), stage=1, macs=700e3, acc=0.65)])
    write(root / "prune-l1", [rec(arch(3), stage=0, macs=5e6, acc=0.85),
                              rec(arch(1.2, last=16), stage=1, macs=600e3, acc=0.66)])
    calls: list[str] = []

    class Killed(Exception):
        pass

    def fake_timer(model, shape, **kw):  # a made-up latency per architecture; the 5th call is a kill
        calls.append(key(architecture(model)))
        if len(calls) == 5:
            raise Killed
        return {"latency_ms": {"median": 0.01 * len(calls)}}

    monkeypatch.setattr(cost_models.profiling.measure, "measure_model", fake_timer)
    args = bench_fair.parse_args(["--preset", "full", "--seeds", "0", "--out", str(out), "--measure-passes", "2"])
    with pytest.raises(Killed):
        fair_latency.measure_latency(out, root, args)
    table = json.loads((out / "latency.json").read_text())["networks"]
    # 4 architectures (the seed's is width × 1's); pass 1 saved, the kill in pass 2 lost only its own measurement
    assert len(table) == 4 and all(len(n["passes_ms"]) == 1 and "latency_ms" not in n for n in table.values())
    fair_latency.measure_latency(out, root, args)
    table = json.loads((out / "latency.json").read_text())["networks"]
    assert all(len(n["passes_ms"]) == 2 and n["latency_ms"] == pytest.approx(sum(n["passes_ms"]) / 2)
               for n in table.values())
    assert len(calls) == 4 + 1 + 4  # pass 1, the killed call, then pass 2 of every network: nothing timed twice
    n = len(calls)
    fair_latency.measure_latency(out, root, args)  # all measured: nothing to do
    assert len(calls) == n
    with pytest.raises(SystemExit, match="without --jobs"):
        bench_fair._expand(args, root, "measure")
    # a new architecture on another machine: refused, the table's machine and this one named
    saved = json.loads((out / "latency.json").read_text())
    assert fair_latency.machines(saved) == [common.cpu_model()]
    for s in saved["sessions"]:
        s["machine"]["cpu"] = "Another CPU"
    (out / "latency.json").write_text(json.dumps(saved))
    write(root / "width-x3", [rec(arch(3), macs=5e6, acc=0.85, width_mult=3.0)])
    with pytest.raises(SystemExit, match=re.escape(f"measured on Another CPU; this machine is {common.cpu_model()}")):
        fair_latency.measure_latency(out, root, args)
    assert len(calls) == n


def test_new_architectures_are_timed_only_where_the_table_was(tmp_path, monkeypatch):
    """Before adding to a table, its fastest and slowest networks are timed again: beyond ±10 % of their recorded
    latency this is another host (or a drifted one), refused; within it the new network is timed."""
    import cost_models.profiling.measure

    out = tmp_path / "fair_full"
    root = out / "s0"
    write(root / "width-x1", [rec(arch(1), macs=550e3, acc=0.7, width_mult=1.0)])
    write(root / "width-x2", [rec(arch(2), macs=2.2e6, acc=0.8, width_mult=2.0)])
    factor, calls = [1.0], []

    def timer(model, shape, **kw):  # latency ∝ the last layer's width, times the machine's factor
        calls.append(1)
        return {"latency_ms": {"median": factor[0] * 1e-3 * list(model.modules())[-1].in_features}}

    monkeypatch.setattr(cost_models.profiling.measure, "measure_model", timer)
    args = bench_fair.parse_args(["--preset", "full", "--seeds", "0", "--out", str(out), "--measure-passes", "1"])
    fair_latency.measure_latency(out, root, args)  # a new table: nothing to check
    assert len(calls) == 2
    write(root / "width-x3", [rec(arch(3), macs=5e6, acc=0.85, width_mult=3.0)])
    factor[0] = 1.5
    with pytest.raises(SystemExit, match=r"1\.50× their recorded latency"):
        fair_latency.measure_latency(out, root, args)
    assert len(calls) == 4 and key(arch(3)) not in json.loads((out / "latency.json").read_text())["networks"]
    factor[0] = 1.04  # the same host a little slower: within the limit, the new network is timed
    fair_latency.measure_latency(out, root, args)
    assert len(calls) == 7 and key(arch(3)) in json.loads((out / "latency.json").read_text())["networks"]


def test_step_measure_times_the_seeds_of_seeds(tmp_path, monkeypatch):
    import cost_models.profiling.measure

    out = tmp_path / "fair_full"
    for seed, scale in ((0, 1.0), (1, 1.5), (2, 2.0)):
        write(out / f"s{seed}" / "width-x1", [rec(arch(scale), macs=550e3, acc=0.7, width_mult=1.0)])
    timed = []
    monkeypatch.setattr(cost_models.profiling.measure, "measure_model",
                        lambda model, shape, **kw: timed.append(1) or {"latency_ms": {"median": 0.1}})
    monkeypatch.setattr(bench_fair.common, "prepare_process", lambda *a, **kw: None)  # keeps cwd and logging
    bench_fair.main(["--preset", "full", "--steps", "measure", "--seeds", "0,2", "--measure-passes", "1",
                     "--out", str(out)])
    table = json.loads((out / "latency.json").read_text())["networks"]
    assert set(table) == {key(arch(1.0)), key(arch(2.0))}  # seed 1 is not in --seeds
    assert len(timed) == 3  # each network once, and seed 0's again before seed 2's joined it (same machine?)
    assert "| width × 1 (30 ep.) | 70.00 | 70.00 | 550k | 0.1000 |" in (tmp_path / "fair_full.md").read_text()
    with pytest.raises(SystemExit, match="without --jobs"):
        bench_fair.main(["--preset", "full", "--steps", "measure", "--jobs", "2", "--out", str(out)])


# ------------------------------------------------------------------------------------------------
# comparisons at matched measured latency, the fragment, the plots
# ------------------------------------------------------------------------------------------------

W = {1.0: arch(1), 1.5: arch(1.5), 2.0: arch(2)}
G = {1: arch(1, last=48), 2: arch(1, last=64)}
A = {1: arch(1, last=40), 2: arch(1, last=56)}
P = {1: arch(1, last=20), 2: arch(1.5, last=20)}


def full_tree(out: Path, seed: int = 0, bonus: float = 0.0) -> None:
    """One seed of the full preset: width × 1, 1.5, 2; flops and authors grown and retrained; slimming pruning
    fine-tuned and retrained (every width multiplier and pruned network ``bonus`` more accurate)."""
    root = out / f"s{seed}"
    for m, macs, acc in ((1.0, 500e3, 0.70), (1.5, 1e6, 0.75), (2.0, 2e6, 0.80)):
        write(root / f"width-x{m:g}", [rec(W[m], macs=macs, acc=acc + bonus, width_mult=m)])
    write(root / "grow-flops", [rec(W[1.0], stage=0, macs=500e3, acc=0.6), rec(G[1], stage=1, macs=700e3, acc=0.65),
                                rec(G[2], stage=2, macs=1.4e6, acc=0.7)])
    for k, acc in ((1, 0.78), (2, 0.79)):
        write(root / "grow-flops" / f"retrain-{k}", [rec(G[k], macs=[0, 700e3, 1.4e6][k], acc=acc, source_stage=k)])
    write(root / "grow-authors", [rec(W[1.0], stage=0, macs=500e3, acc=0.6), rec(A[1], stage=1, macs=650e3, acc=0.64),
                                  rec(A[2], stage=2, macs=1.3e6, acc=0.69)])
    for k, acc in ((1, 0.74), (2, 0.77)):
        write(root / "grow-authors" / f"retrain-{k}", [rec(A[k], macs=[0, 650e3, 1.3e6][k], acc=acc,
                                                           source_stage=k)])
    write(root / "prune-slimming", [rec(arch(3), stage=0, macs=4.5e6, acc=0.85, wide_width_mult=3.0),
                                    rec(P[1], stage=1, macs=690e3, acc=0.71 + bonus, target_stage=1),
                                    rec(P[2], stage=2, macs=1.5e6, acc=0.76 + bonus, target_stage=2)])
    write(root / "prune-slimming" / "retrain", [rec(P[1], stage=0, macs=690e3, acc=0.72 + bonus, source_stage=1),
                                                rec(P[2], stage=1, macs=1.5e6, acc=0.77 + bonus, source_stage=2)],
          done=False)


#: Made-up latencies (ms) in which the grown stage 1, cheaper in MACs than width × 1.5, is exactly as slow as
#: width × 2: at matched measured latency it meets width × 2's accuracy, at matched MACs a point below × 1.5.
LATENCY = {key(W[1.0]): 0.1, key(W[1.5]): 0.2, key(W[2.0]): 0.4, key(G[1]): 0.4, key(G[2]): 0.2,
           key(A[1]): 0.2,  # authors stage 2: not measured
           key(P[1]): 0.1, key(P[2]): 0.4}


def write_latency(out: Path, table: dict = LATENCY, partial: tuple[str, ...] = ()) -> None:
    nets = {k: {"passes_ms": [v] * 3, "latency_ms": v, "macs": 1.0, "lut_predicted_ms": v} for k, v in table.items()}
    for k in partial:  # passes missing: no latency yet
        nets[k] = {"passes_ms": [0.3], "macs": 1.0, "lut_predicted_ms": 0.3}
    (out / "latency.json").write_text(json.dumps({"networks": nets, "sessions": [
        {"date": "2026-12-07 07:00 UTC", "load_before": 0.05, "load_after": 0.1, "networks": len(nets)}]}))


def summarise(out: Path, seeds: str = "0") -> dict:
    args = bench_fair.parse_args(["--preset", "full", "--seeds", seeds, "--out", str(out)])
    return bench_fair.summarise(out, args)


def test_comparisons_at_matched_measured_latency_and_their_fragment(tmp_path):
    out = tmp_path / "fair_full"
    full_tree(out)
    write_latency(out, partial=(key(A[2]),))
    result = summarise(out)
    lat = result["seeds"][0]["latency"]
    by_stage = {c["stage"]: c for c in lat["flops_vs_width"]}
    assert by_stage[1]["diff"] == pytest.approx(0.78 - 0.80)  # as slow as width × 2
    assert by_stage[2]["diff"] == pytest.approx(0.79 - 0.75)  # as slow as width × 1.5
    # at matched MACs, stage 1 (700k) is compared with the width curve between × 1 and × 1.5
    x = (math.log10(700e3) - math.log10(500e3)) / (math.log10(1e6) - math.log10(500e3))
    macs = {c["stage"]: c for c in result["seeds"][0]["flops"]["retrained_vs_width"]}
    assert macs[1]["diff"] == pytest.approx(0.78 - (0.70 + x * 0.05))
    # a network without a measured latency (authors stage 2: one pass only) is left out, not guessed
    assert [c["stage"] for c in lat["authors_vs_width"]] == [1]
    assert lat["authors_vs_width"][0]["diff"] == pytest.approx(0.74 - 0.75)
    # flops against the pruned networks, fine-tuned and retrained, on log10 ms
    ft = {c["stage"]: c for c in lat["flops_vs_prune_slimming"]}
    assert ft[1]["diff"] == pytest.approx(0.78 - 0.76)
    assert ft[2]["diff"] == pytest.approx(0.79 - 0.71)  # 0.2 ms: the best pruned network at 0.2 ms or less (0.1 ms)
    assert {c["stage"]: c["diff"] for c in lat["flops_vs_prune_slimming_retrained"]} == pytest.approx(
        {1: 0.78 - 0.77, 2: 0.79 - 0.72})
    assert "flops_vs_prune_l1" not in lat  # no l1 run
    agg = result["aggregate"]
    assert agg["latency_flops_vs_width"][1]["diff"] == pytest.approx(-0.02)
    assert agg["latency_flops_vs_width"][1]["latency_ms"] == pytest.approx(0.4)
    assert agg["latency_flops_vs_prune_l1"] == {}

    text = (tmp_path / "fair_full.md").read_text()
    line = next(t for t in text.splitlines() if t.startswith("- retrained grown (flops) − width, at matched measured"))
    assert "stage 1 (0.400 ms, 1 seed(s)): -2.00 ±" in line and "stage 2 (0.200 ms, 1 seed(s)): +4.00 ±" in line
    assert "- retrained flops − slimming pruning, retrained, at matched measured latency: stage 1" in text
    assert "- retrained flops − l1 pruning, fine-tuned, at matched measured latency: no comparison yet" in text
    assert ("8 architectures measured, latencies within 0.0 % count as the same (1 with passes missing, left out)"
            in text)
    assert "[test top-1 vs measured latency](fair_full/accuracy_vs_latency.png)" in text
    assert "[test top-1 vs MACs](fair_full/accuracy_vs_macs.png)" in text
    assert "| network | test top-1 (%) | val top-1 (%) | MACs | measured (ms) |" in text
    assert "| width × 2 (30 ep.) | 80.00 | 80.00 | 2M | 0.4000 |" in text
    assert "| authors stage 2 retrained (30 ep.) | 77.00 | 77.00 | 1.3M | - |" in text
    assert "| slimming: wide network × 3 | 85.00 | - | 4.5M | - |" in text
    assert (out / "accuracy_vs_macs.png").stat().st_size > 0 and (out / "accuracy_vs_latency.png").stat().st_size > 0
    # the latency curves hold only the points that have a latency, at their latency
    cl = result["curves_latency"]
    assert [p["latency_ms"] for p in cl["authors stages, retrained"]] == [0.2]
    assert [p["latency_ms"] for p in cl["width multipliers"]] == [0.1, 0.2, 0.4]
    assert len(result["curves"]["authors stages, retrained"]) == 2


def test_latency_comparisons_aggregate_over_seeds(tmp_path):
    out = tmp_path / "fair_full"
    full_tree(out, 0)
    full_tree(out, 1, bonus=0.01)  # the width multipliers of seed 1 one point better, the grown stages not
    write_latency(out)
    agg = summarise(out, "0,1")["aggregate"]["latency_flops_vs_width"]
    assert agg[1]["n_seeds"] == 2
    assert agg[1]["diff"] == pytest.approx(statistics.mean([-0.02, -0.03]))
    assert agg[1]["diffs"] == pytest.approx([-0.02, -0.03])
    assert agg[1]["two_se_seeds"] == pytest.approx(2 * 0.01 / math.sqrt(2) / math.sqrt(2))


def test_without_latency_json_nothing_at_matched_latency(tmp_path):
    out = tmp_path / "fair_full"
    full_tree(out)
    result = summarise(out)
    assert "latency" not in result["seeds"][0] and result["curves_latency"] == {}
    assert all(v == {} for k, v in result["aggregate"].items() if k.startswith("latency_"))
    text = (tmp_path / "fair_full.md").read_text()
    assert "- retrained grown (flops) − width, at matched measured latency: no comparison yet" in text
    assert "measured (ms)" not in text and "; not measured yet" in text
    assert "test top-1 vs measured latency once `--steps measure` has run" in text
    assert not (out / "accuracy_vs_latency.png").exists() and (out / "accuracy_vs_macs.png").exists()


def test_a_latency_curve_is_compared_by_its_validation_front():
    """Latency is not monotone in width: a multiplier the blocked kernels take runs faster than a narrower one.
    The width curve at matched latency is its front — points no faster point beats, judged on validation."""
    width = [{"stage": 0, "macs": 1, "latency_ms": 0.10, "test_top1": 0.72, "val_top1": 0.72},
             {"stage": 1, "macs": 2, "latency_ms": 0.20, "test_top1": 0.74, "val_top1": 0.74},  # slower, worse
             {"stage": 2, "macs": 3, "latency_ms": 0.12, "test_top1": 0.78, "val_top1": 0.77},
             {"stage": 3, "macs": 4, "latency_ms": 0.28, "test_top1": 0.80, "val_top1": 0.80}]
    front = fair_compare.front(width)
    assert [r["latency_ms"] for r in front] == [0.10, 0.12, 0.28]
    grown = [{"stage": 1, "macs": 2, "latency_ms": 0.20, "test_top1": 0.75, "val_top1": 0.75}]
    (c,) = fair_compare.compare(grown, front, 10_000, "latency_ms")
    assert 0.78 < c["other"] < 0.80 and c["diff"] < -0.03  # not the 0.74 of the slower, narrower multiplier


def test_the_aligned_arm_grows_in_multiples_of_four_from_the_shared_seed():
    """The remedy the measured latency points at: the MACs price, growth in multiples of 4 channels (widths the
    blocked kernels take), from the flops arm's trained seed (the CIFAR seed's widths are multiples of 4)."""
    import argparse

    from hwsplit.network.models import MOBILENET_V1_CIFAR_SEED

    assert fair_arms.arm_overrides("aligned", argparse.Namespace()) == {"channel_multiple": 4}
    assert "aligned" in fair_arms.GROW_STEPS and "aligned" in bench_fair.PRESETS["full"]["steps"]
    seed = [MOBILENET_V1_CIFAR_SEED["stem"]] + [w for w, _ in MOBILENET_V1_CIFAR_SEED["blocks"]]
    assert all(w % 4 == 0 for w in seed)
    assert "aligned_vs_width" in fair_arms.LATENCY_COMPARISONS


def test_the_full_lut_arm_is_aligned_and_bounded_by_the_widest_widths_table_latency():
    """Full preset: the lut arm grows in the shipped profile's blocked-kernel multiple, its total budget the table's
    latency of the widest width multiplier (above the seed's, so it grows), and it is compared at matched latency."""
    import cost_models
    from hwsplit.network.families import build_seed

    args = bench_fair.parse_args(["--preset", "full"])
    over = fair_arms.arm_overrides("lut", args)
    assert over["cost"] == "lut" and over["channel_multiple"] == 4
    lut = cost_models.get_cost_model("lut", profile=str(ROOT / args.profile))
    widest = build_seed("mobilenet_v1_cifar", {}, (3, 32, 32), 10, width_mult=3.0, channel_multiple=4)
    seed = build_seed("mobilenet_v1_cifar", {}, (3, 32, 32), 10)
    assert over["budget"] == pytest.approx(lut.total(widest, (1, 3, 32, 32)), rel=1e-5)
    assert over["budget"] > lut.total(seed, (1, 3, 32, 32))
    assert "lut_vs_width" in fair_arms.LATENCY_COMPARISONS and "retrain-lut" in args.steps
    # claim 4 (an explicit --channel-multiple) keeps every arm on that multiple and the growth ratio alone
    assert "budget" not in fair_arms.arm_overrides("lut", bench_fair.parse_args(["--channel-multiple", "16"]))


def test_a_network_slower_than_the_whole_front_is_compared_with_its_best():
    """The other family's best at the same latency or less: a step along the validation front, so a grown network
    slower than every width multiplier is compared with the fastest-best one, and one faster than all is left out."""
    width = [{"stage": 0, "macs": 1, "latency_ms": 0.074, "test_top1": 0.805, "val_top1": 0.806},
             {"stage": 1, "macs": 2, "latency_ms": 0.127, "test_top1": 0.84, "val_top1": 0.85},
             {"stage": 2, "macs": 3, "latency_ms": 0.126, "test_top1": 0.808, "val_top1": 0.804}]
    grown = [{"stage": 3, "macs": 2, "latency_ms": 0.28, "test_top1": 0.823},
             {"stage": 4, "macs": 3, "latency_ms": 0.10, "test_top1": 0.80},
             {"stage": 5, "macs": 1, "latency_ms": 0.05, "test_top1": 0.70}]
    out = {c["stage"]: c for c in fair_compare.compare_front(grown, fair_compare.front(width), 10_000)}
    assert out[3]["other"] == 0.84 and out[3]["diff"] == pytest.approx(0.823 - 0.84)
    assert out[4]["other"] == 0.805 and 5 not in out


def test_a_point_just_beyond_a_curves_end_is_compared_with_the_end_and_no_further():
    """No extrapolation, but a pruned network up to 2 % under its target (or a stage a little past the widest
    multiplier) is compared with the curve's end point; 2.5 % beyond is left out."""
    curve = [{"macs": 1e6, "test_top1": 0.70}, {"macs": 2e6, "test_top1": 0.80}]
    assert fair_compare.interp(curve, 1.5e6) == pytest.approx(0.70 + 0.10 * math.log10(1.5) / math.log10(2))
    assert fair_compare.interp(curve, 2.05e6) is None and fair_compare.interp(curve, 0.975e6) is None
    assert fair_compare.interp(curve, 2.03e6) == 0.80 and fair_compare.interp(curve, 0.985e6) == 0.70


def test_final_init_compares_grown_weights_with_a_fresh_start_on_validation(tmp_path):
    # issue 26: the last flops stage fine-tuned from its grown weights against the same architecture retrained
    # from scratch, both 30 final epochs, on validation; a pruning arm's retrained networks shown as they finish
    out = tmp_path / "fair_full"
    full_tree(out)
    root = out / "s0"
    (root / "prune-slimming" / "DONE").unlink()
    write(root / "grow-flops" / "finetune-2", [rec(G[2], macs=1.4e6, acc=0.81, source_stage=2, epochs_in_all=65)])
    result = summarise(out)
    (c,) = result["seeds"][0]["final_init_val"]
    assert c["stage"] == 2 and c["diff"] == pytest.approx(0.81 - 0.79)
    assert result["aggregate"]["final_init_val"][2]["diff"] == pytest.approx(0.02)
    text = (tmp_path / "fair_full.md").read_text()
    assert "(`--final-init grown` − `fresh`): stage 2" in text
    # two of the pruned architectures retrained, the pruning run not done: in the table, not compared
    assert len(result["seeds"][0]["prune-slimming"]["retrained"]) == 2
    assert "flops_vs_prune_slimming_retrained" not in result["seeds"][0]
    assert "| slimming pruned to stage 1's cost, retrained |" in text


def test_a_front_point_slower_by_less_than_the_latency_resolution_counts_as_as_fast():
    # passes 4 % apart: 2 SE of a difference of two latencies is 3.2 %; a width multiplier 2 % slower than the
    # grown network is compared with it; without the tolerance the next faster point would be, a timing wobble
    # swapping the verdict
    table = {"a": {"passes_ms": [0.100, 0.104, 0.102]}, "b": {"passes_ms": [0.2, 0.208, 0.204]},
             "c": {"passes_ms": [0.3, 0.3]}}
    tol = fair_latency.resolution(table)
    assert tol == pytest.approx(2 * math.sqrt(2) * 0.002 / math.sqrt(3) / 0.102, rel=1e-3)
    front = [{"latency_ms": 0.20, "test_top1": 0.70, "val_top1": 0.70},
             {"latency_ms": 0.255, "test_top1": 0.80, "val_top1": 0.80}]
    grown = [{"stage": 2, "macs": 1e6, "latency_ms": 0.25, "test_top1": 0.79}]
    assert fair_compare.compare_front(grown, front, 10_000)[0]["other"] == 0.70
    (c,) = fair_compare.compare_front(grown, front, 10_000, tolerance=tol)
    assert c["other"] == 0.80 and c["diff"] == pytest.approx(-0.01)


def test_a_step_that_needs_a_grow_run_waits_for_it_to_finish(tmp_path, caplog, monkeypatch):
    # a second process's retrain-authors started while the first was still growing stage 4 retrained stages 1-3
    # only; now a step that needs the whole list of stages skips an unfinished grow run with a log line
    out = tmp_path / "fair_full"
    root = out / "s0"
    write(root / "grow-flops", [rec(arch(1), stage=0, macs=550e3, acc=0.6),
                                rec(arch(1, last=48), stage=1, macs=700e3, acc=0.65)], done=False)
    calls = []
    monkeypatch.setattr("hwsplit.run.finetune.finetune", lambda *a, **k: calls.append(k))
    args = bench_fair.parse_args(["--preset", "full", "--seeds", "0", "--out", str(out)])
    with caplog.at_level(logging.WARNING, logger="bench"):
        bench_fair.run_seed(args, out, 0, ["retrain-flops", "finetune", "width-total", "prune-l1"],
                            summarise_after=False)
    assert calls == [] and caplog.text.count("grow-flops is not finished") == 4
    assert not (root / "grow-flops" / "retrain-1").exists() and not (root / "prune-l1").exists()


def test_a_longer_schedule_starts_from_the_grow_runs_and_the_widths_trained_that_long(tmp_path, monkeypatch):
    # the same architectures retrained for 65 epochs: the grow runs are shared (not their 30-epoch retrained
    # stages), and so are width multipliers already trained 65 epochs (step width-total's); the rest is trained
    src, dst = tmp_path / "fair_full" / "s0", tmp_path / "fair_full65" / "s0"
    write(src / "grow-flops", [rec(arch(1), macs=550e3, acc=0.6), rec(arch(1, last=48), stage=1, macs=7e5, acc=0.7)])
    (src / "grow-flops" / "stage-1.pt").write_bytes(b"checkpoint")
    (src / "grow-flops" / ".lock").write_text("")
    write(src / "grow-flops" / "retrain-1", [rec(arch(1, last=48), macs=7e5, acc=0.72, source_stage=1)])
    write(src / "grow-authors", [rec(arch(1), macs=550e3, acc=0.6)], done=False)  # still growing
    write(src / "width-x1", [rec(arch(1), macs=550e3, acc=0.72, width_mult=1.0)])  # 30 epochs
    write(src / "width65-x2.5", [rec(arch(2.5), macs=2e6, acc=0.85, epochs=65, width_mult=2.5)])
    (src / "width65-x2.5" / "partial-0.pt").write_bytes(b"stale")
    write(src / "width65-x3", [rec(arch(3), macs=2.7e6, acc=0.8, epochs=65, width_mult=3.0)], done=False)  # in training
    write(dst / "width-x1.5", [rec(arch(1.5), macs=9e5, acc=0.8, epochs=65, width_mult=1.5)])
    assert bench_fair.import_grown(src, dst, 65) == ["grow-flops", "width-x2.5"]
    assert sorted(p.name for p in (dst / "grow-flops").iterdir()) == ["DONE", "stage-1.pt", "stages.jsonl"]
    assert sorted(p.name for p in (dst / "width-x2.5").iterdir()) == ["DONE", "stages.jsonl"]
    assert not (dst / "width-x3").exists() and not (dst / "width-x1").exists()
    assert bench_fair.import_grown(src, dst, 65) == []  # what is there is kept
    assert bench_fair.import_grown(src, tmp_path / "fair_full30" / "s0", 30) == ["grow-flops", "width-x1"]
    assert bench_fair.import_grown(tmp_path / "nothing" / "s0", dst, 65) == []
    # from the command line: the shared grow run's stage retrained 65 epochs; the latency table comes along (it
    # is keyed by architecture)
    (tmp_path / "fair_full" / "latency.json").write_text(json.dumps({"networks": {}}))
    calls = []

    def fake_finetune(src, **k):
        calls.append((Path(src).name, k))
        Path(k["out"]).mkdir(parents=True)

    monkeypatch.setattr("hwsplit.run.finetune.finetune", fake_finetune)
    out = tmp_path / "fair_full65b"
    bench_fair.main(["--preset", "full", "--seeds", "0", "--retrain-epochs", "65", "--out", str(out),
                     "--grown-from", str(tmp_path / "fair_full"), "--steps", "retrain-flops"])
    assert (out / "latency.json").exists() and (out / "s0" / "width-x2.5" / "DONE").exists()
    ((name, k),) = calls
    assert name == "grow-flops" and k["epochs"] == 65 and k["stages"] == [1] and k["from_scratch"]


def test_a_longer_schedule_reports_each_shared_network_under_both_schedules(tmp_path):
    src = tmp_path / "fair_full"
    full_tree(src)
    out = tmp_path / "fair_full65"
    root = out / "s0"
    # width × 1 and × 2 and flops stage 2 retrained 65 epochs so far
    for m, macs, acc in ((1.0, 500e3, 0.73), (2.0, 2e6, 0.85)):
        write(root / f"width-x{m:g}", [rec(W[m], macs=macs, acc=acc, width_mult=m, epochs=65)])
    write(root / "grow-flops", [rec(W[1.0], stage=0, macs=500e3, acc=0.6), rec(G[1], stage=1, macs=700e3, acc=0.65),
                                rec(G[2], stage=2, macs=1.4e6, acc=0.7)])
    write(root / "grow-flops" / "retrain-2", [rec(G[2], macs=1.4e6, acc=0.84, source_stage=2, epochs=65)])
    args = bench_fair.parse_args(["--preset", "full", "--seeds", "0", "--out", str(out), "--retrain-epochs", "65",
                                  "--grown-from", str(src)])
    result = bench_fair.summarise(out, args)
    sched = result["seeds"][0]["schedule"]
    assert [n["name"] for n in sched["networks"]] == ["width × 1", "width × 2", "flops stage 2"]
    w1 = sched["networks"][0]
    assert w1["epochs"] == [30, 65] and w1["gain"] == pytest.approx(0.03)
    assert w1["two_se"] == pytest.approx(2 * math.sqrt((0.7 * 0.3 + 0.73 * 0.27) / 10_000))
    # there (30 epochs): stage 2 (0.79) against the width curve at 1.4M MACs; here (65): against 0.73 → 0.85
    there = sched["flops_vs_width"]
    assert [c["stage"] for c in there] == [1, 2]
    (here,) = result["seeds"][0]["flops"]["retrained_vs_width"]
    assert here["stage"] == 2 and here["diff"] == pytest.approx(0.84 - (0.73 + 0.12 * math.log10(1.4e6 / 5e5)
                                                                          / math.log10(4)), abs=1e-6)
    text = (tmp_path / "fair_full65.md").read_text()
    assert f"### The same networks under `{src}`'s schedule" in text
    assert "| flops stage 2 | 1.4M | 79.00 | 84.00 | +5.00 ± " in text


def test_one_factor_arms_change_one_setting_of_the_default_each(tmp_path):
    """Issue 26's one-factor comparisons: each arm is today's default with one element of the authors' recipe (or
    the per-stage training length) changed, grows from the shared seed and is compared on validation; its verdict
    line appears once it has retrained stages."""
    import argparse
    import dataclasses

    args = bench_fair.parse_args(["--preset", "full", "--seeds", "0", "--out", str(tmp_path / "fair_full")])
    base = fair_arms.base_config(args, 0)
    authors = fair_arms.arm_overrides("authors", args)
    for arm in fair_arms.ONE_FACTOR_ARMS:
        overrides = fair_arms.arm_overrides(arm, args)
        config = dataclasses.replace(base, **overrides)  # the GrowConfig checks hold
        changed = {f.name for f in dataclasses.fields(config) if getattr(config, f.name) != getattr(base, f.name)}
        assert changed == set(overrides), arm
        assert arm in fair_arms.GROW_STEPS and arm in fair_arms.VALIDATION_ARMS
        if arm != "long":
            assert {k: authors[k] for k in overrides} == overrides, arm
    assert fair_arms.arm_overrides("long", argparse.Namespace(epochs=3)) == {"epochs": 6}
    assert dataclasses.replace(base, **fair_arms.arm_overrides("long", args)).epochs == 2 * base.epochs

    out = tmp_path / "fair_full"
    full_tree(out)
    root = out / "s0"
    write(root / "grow-sqrt", [rec(W[1.0], stage=0, macs=500e3, acc=0.6), rec(A[1], stage=1, macs=650e3, acc=0.64)])
    write(root / "grow-sqrt" / "retrain-1", [rec(A[1], macs=650e3, acc=0.74, source_stage=1)])
    result = summarise(out)
    assert [c["stage"] for c in result["seeds"][0]["sqrt_vs_flops_val"]] == [1]
    text = (tmp_path / "fair_full.md").read_text()
    assert "- issue 26, one factor, on VALIDATION: retrained sqrt (√ΔMACs price only) − retrained flops" in text
    assert "retrained groups (" not in text  # no runs: no line
