"""bench_fair.py's comparisons: a results tree read back, one family's points against another's curve.

Pure functions of records (``stages.jsonl`` lines): at matched MACs by interpolating the other curve at the same
log10 MACs (:func:`compare`, no extrapolation beyond :data:`END_TOLERANCE`), at matched measured latency against the
other family's validation front (:func:`front`, :func:`compare_front`); each difference with 2 SE of two independent
test accuracies (binomial, √2 × SE); over seeds, the mean difference with the test set's 2 SE and the spread between
seeds (:func:`aggregate`), and the verdict line BENCHMARKS.md quotes (:func:`verdict_line`).
"""

from __future__ import annotations

import math
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402


def done(path: Path) -> bool:
    return (path / "DONE").exists()


def records(path: Path) -> list[dict]:
    return common.records(path) if (path / "stages.jsonl").exists() else []


def derived(src: Path, sub: str) -> list[dict]:
    """Completed ``sub`` records of a grow run: ``src/sub`` (all stages in one) and ``src/sub-K`` (one each)."""
    recs = {r["source_stage"]: r for r in (records(src / sub) if done(src / sub) else [])}
    for d in sorted(src.glob(f"{sub}-*")):
        if done(d):
            recs.update({r["source_stage"]: r for r in records(d)})
    return [recs[k] for k in sorted(recs)]


def width_curve(root: Path, tag: str) -> list[dict]:
    recs = [r for d in sorted(root.glob(f"{tag}-x*")) if done(d) for r in records(d)]
    return sorted(recs, key=lambda r: r["macs"])


#: A point this far (relative) beyond a curve's end is compared with the end point: a pruned network lands up to 2 %
#: under its target by design, and a grown stage can end a few thousand MACs past the widest multiplier.
END_TOLERANCE = 0.02


def interp(curve: list[dict], x: float, key: str = "macs", metric: str = "test_top1") -> float | None:
    pts = [(math.log10(r[key]), r[metric]) for r in curve if r.get(key) and r.get(metric) is not None]
    y = common.interpolate(pts, math.log10(x))
    if y is None and pts:  # no extrapolation, but the ends stretch by END_TOLERANCE
        lo, hi = min(pts), max(pts)
        if 0 < lo[0] - math.log10(x) <= math.log10(1 + END_TOLERANCE):
            return lo[1]
        if 0 < math.log10(x) - hi[0] <= math.log10(1 + END_TOLERANCE):
            return hi[1]
    return y


def compare(points: list[dict], curve: list[dict], n_test: int, key: str = "macs",
            metric: str = "test_top1") -> list[dict]:
    """Each point against ``curve``'s accuracy (``metric``: test or validation top-1, over ``n_test`` images)
    interpolated at the same log10 ``key`` (MACs or latency_ms)."""
    out = []
    for r in points:
        y = interp(curve, r[key], key, metric) if r.get(key) and r.get(metric) is not None else None
        if y is not None:
            out.append(comparison(r, y, n_test, key, metric))
    return out


def comparison(r: dict, other: float, n_test: int, key: str, metric: str = "test_top1", **extra) -> dict:
    """Point ``r`` against the other family's accuracy ``other`` at the same ``key``: the difference and its 2 SE
    (two independent accuracies over ``n_test`` images)."""
    se = math.sqrt(2) * common.accuracy_se(r[metric], n_test)
    return {"stage": r.get("source_stage", r["stage"]), "macs": r["macs"], key: r[key], "acc": r[metric],
            "other": other, **extra, "diff": r[metric] - other, "two_se": 2 * se}


def front(curve: list[dict], key: str = "latency_ms") -> list[dict]:
    """The points of ``curve`` that no point at the same or lower ``key`` beats on VALIDATION top-1 (test top-1
    where a point has no validation figure), sorted by ``key``: what the family reaches at that cost or less.
    Measured latency is not monotone in width (a multiplier whose widths the backend's blocked kernels take runs
    faster than a narrower one whose widths they do not), so a latency curve is compared by its front; the front
    is chosen on validation, never on test."""
    out: list[dict] = []
    best = -math.inf
    for r in sorted((r for r in curve if r.get(key)), key=lambda r: r[key]):
        score = r.get("val_top1") if r.get("val_top1") is not None else r.get("test_top1")
        if score is not None and score > best:
            out.append(r)
            best = score
    return out


def compare_front(points: list[dict], front: list[dict], n_test: int, key: str = "latency_ms",
                  tolerance: float = 0.0) -> list[dict]:
    """Each point against the best the other family reaches at the same ``key`` or less: the last point of its
    validation ``front`` (:func:`front`) at or below the point's ``key`` × (1 + ``tolerance``) — a step, not an
    interpolation, so a point slower than the whole front is compared with the front's best (no extrapolation is
    involved). ``tolerance`` is the measurement's resolution (:func:`fair_latency.resolution`): a front point slower by
    less than that is as fast, so a timing wobble of 1–2 % does not swap the point compared with. Points faster
    than every front point are left out. Differences of test top-1, 2 SE of two independent test accuracies."""
    out = []
    for r in points:
        if not r.get(key) or r.get("test_top1") is None:
            continue
        below = [f for f in front if f[key] <= r[key] * (1 + tolerance)]
        if not below:
            continue
        out.append(comparison(r, below[-1]["test_top1"], n_test, key, **{f"other_{key}": below[-1][key]}))
    return out


def aggregate(per_seed: list[list[dict]]) -> dict:
    """Per comparison index (grown stage): mean diff over the seeds that have it, and its 2 SE."""
    by_stage: dict[int, list[dict]] = {}
    for comps in per_seed:
        for c in comps:
            by_stage.setdefault(c["stage"], []).append(c)
    out = {}
    for stage, cs in sorted(by_stage.items()):
        n = len(cs)
        diffs = [c["diff"] for c in cs]
        out[stage] = {"n_seeds": n, "diff": statistics.mean(diffs),
                      "two_se": math.sqrt(sum(c["two_se"] ** 2 for c in cs)) / n,
                      # between seeds (seed, data order and test noise together); None with one seed
                      "two_se_seeds": 2 * statistics.stdev(diffs) / math.sqrt(n) if n > 1 else None,
                      "macs": statistics.mean(c["macs"] for c in cs),
                      **({"latency_ms": statistics.mean(c["latency_ms"] for c in cs)} if "latency_ms" in cs[0] else {}),
                      "diffs": [c["diff"] for c in cs]}
    return out


def verdict_line(name: str, agg: dict) -> str:
    if not agg:
        return f"- {name}: no comparison yet"
    parts, ahead, behind = [], 0, 0
    for stage, a in agg.items():
        where = f"{a['latency_ms']:.3f} ms" if "latency_ms" in a else f"{common.fmt_num(a['macs'])} MACs"
        # the verdict's 2 SE: the larger of the test-set noise and the spread between seeds
        se = max(a["two_se"], a.get("two_se_seeds") or 0.0)
        seeds_se = f", between seeds ± {100 * a['two_se_seeds']:.2f}" if a.get("two_se_seeds") is not None else ""
        parts.append(f"stage {stage} ({where}, {a['n_seeds']} seed(s)): "
                     f"{100 * a['diff']:+.2f} ± {100 * a['two_se']:.2f}{seeds_se}")
        ahead += a["diff"] > se
        behind += a["diff"] < -se
    return (f"- {name}: " + "; ".join(parts) + f" — ahead beyond 2 SE at {ahead}, behind beyond 2 SE at {behind} "
            f"of {len(agg)}")


def mean_point(points: list[dict], key: str) -> dict:
    """Mean ``key`` (MACs or latency_ms) and test top-1 of one curve point over the seeds that have it."""
    accs = [p["test_top1"] for p in points]
    n = len(accs)
    return {key: statistics.mean(p[key] for p in points), "test_top1": statistics.mean(accs), "n_seeds": n,
            "two_se_seeds": 2 * statistics.stdev(accs) / math.sqrt(n) if n > 1 else None}
