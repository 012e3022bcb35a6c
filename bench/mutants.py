"""Mutation spot-check: plausible one-line bugs in the core, each put into a COPY of the repository,
the test files that should catch it run there; a mutant whose tests still pass survived.

    python bench/mutants.py                 # every mutant; writes bench/results/mutants.json
    python bench/mutants.py --only lut-edge-slope-wrong-end --keep   # one, keeping its copy
    python bench/mutants.py --list

Run it when the core changes (not in CI: a few minutes). The working tree is never modified: the tree
is copied to a temporary directory once, and each mutant patches the copy's file and restores it.
Every mutation is an exact string that must occur exactly once in its file: a pattern that is no
longer found is reported "stale" (the code moved on; update the list), never "killed". The unmutated
copy is tested first with every file the list names; if that fails, nothing is reported as killed.
Tests run with one thread (OMP/MKL, and tests/conftest.py sets torch's), ``-x`` (the first failure
kills), and from the copy's root so that ``hwsplit`` and ``cost_models`` import from the copy.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
OUT = ROOT / "bench" / "results" / "mutants.json"


@dataclass(frozen=True)
class Mutant:
    id: str
    file: str
    original: str
    replacement: str
    tests: tuple[str, ...]
    why: str


MUTANTS = [
    # -- hwsplit/splitting/ chain, recording, estimators, ritz: derivatives, surrogates, exact, Rayleigh(-Ritz) --
    Mutant("score-hardswish-f2-factor", "hwsplit/splitting/chain.py",
           "return x * q / 6.0, (q + x * q1) / 6.0, (2 * q1 + x * q2) / 6.0",
           "return x * q / 6.0, (q + x * q1) / 6.0, (q1 + x * q2) / 6.0",
           ("tests/test_derivatives.py",), "hardswish surrogate f'' without the factor 2 of (x·q)''"),
    Mutant("score-gelu-f2", "hwsplit/splitting/chain.py",
           "return x * cdf, cdf + x * pdf, pdf * (2 - x * x)",
           "return x * cdf, cdf + x * pdf, pdf * (1 - x * x)",
           ("tests/test_derivatives.py",), "GELU f'' = φ(x)(2 − x²) written as φ'(x)-like (1 − x²)"),
    Mutant("score-sigmoid-f2-sign", "hwsplit/splitting/chain.py",
           "return s, s * (1 - s), s * (1 - s) * (1 - 2 * s)",
           "return s, s * (1 - s), s * (1 - s) * (2 * s - 1)",
           ("tests/test_derivatives.py",), "sigmoid f'' with the wrong sign"),
    Mutant("score-elu-f2-positive-side", "hwsplit/splitting/chain.py",
           "torch.where(neg, e, torch.zeros_like(x))",
           "torch.where(neg, e, torch.ones_like(x))",
           ("tests/test_derivatives.py",), "ELU f'' = 1 on x > 0 (copied from f')"),
    Mutant("score-relu6-surrogate-shift", "hwsplit/splitting/chain.py",
           '"relu6": lambda x: sp(x) - sp(x - 6.0),',
           '"relu6": lambda x: sp(x) - sp(x - 3.0),',
           ("tests/test_derivatives.py",), "ReLU6 surrogate clipped at 3 (the hardswish constant)"),
    Mutant("score-chain-rule-d1-squared", "hwsplit/splitting/chain.py",
           "new_d2 = g2 * (d1 * d1) if new_d2 is None else new_d2.addcmul_(g2, d1 * d1)",
           "new_d2 = g2 * (d1 * d1) if new_d2 is None else new_d2.addcmul_(g2, d1)",
           ("tests/test_derivatives.py",), "(g∘f)'' = g''·f'² + g'·f'' with f' not squared"),
    Mutant("score-recorded-z-behind-surrogate", "hwsplit/splitting/chain.py",
           "if z is None or self.surrogate_before_dw:",
           "if z is None:",
           ("tests/test_splitting_matrix.py",), "reuses the real network's depthwise output behind a surrogate"),
    Mutant("score-exact-second-eigenvalue", "hwsplit/splitting/estimators.py",
           'scores[name] = SplitScore(evals[:, 0].cpu(), evecs[:, :, 0].reshape(shape).cpu(), "exact",',
           'scores[name] = SplitScore(evals[:, 1].cpu(), evecs[:, :, 1].reshape(shape).cpu(), "exact",',
           ("tests/test_splitting_matrix.py",), "exact method returns the second-smallest eigenpair"),
    Mutant("score-rayleigh-ascent", "hwsplit/splitting/estimators.py",
           "vs[name] = _normalise(v - step * grad / (sq[name].sqrt() + eps))",
           "vs[name] = _normalise(v + step * grad / (sq[name].sqrt() + eps))",
           ("tests/test_splitting_matrix.py",), "Rayleigh step climbs the quotient instead of descending"),
    Mutant("score-fused-lambda-every-batch", "hwsplit/splitting/estimators.py",
           "average = not ritz and not eigenvalue_pass and (epoch + done) / epochs > 1.0 - average_last + 1e-9",
           "average = not ritz and not eigenvalue_pass",
           ("tests/test_score.py",), "the in-pass λ averages every batch, not the last share"),
    Mutant("score-fused-lambda-after-step", "hwsplit/splitting/estimators.py",
           "average=batch.weight if average and inner == 0 else 0.0",
           "average=batch.weight if average and inner == steps_per_batch else 0.0",
           ("tests/test_score.py",), "the in-pass λ never accumulates (division by the weights of nothing)"),
    Mutant("score-ritz-drops-first-derivative-term", "hwsplit/splitting/chain.py",
           'return _channel_gram(z_dot, ctx["gz2"]) + _channel_gram(h_dot, ctx["gs_e1_2"])',
           'return _channel_gram(z_dot, ctx["gz2"])',
           ("tests/test_score.py",), "the Rayleigh–Ritz quadratic form forgets g_s E1''(h) of the depthwise chain"),
    Mutant("score-ritz-from-ignored", "hwsplit/splitting/estimators.py",
           "if ritz and epoch + done > ritz_start + 1e-9:",
           "if ritz:",
           ("tests/test_score.py",), "no descent before the Rayleigh–Ritz sum: λ of a random subspace"),
    Mutant("score-stderr-weights-not-squared", "hwsplit/splitting/ritz.py",
           "w2 = (w.to(dtype) ** 2)[:, None]",
           "w2 = w.to(dtype)[:, None]",
           ("tests/test_score_adaptive.py",), "batch-means SE with the group weights not squared (issue 31)"),
    Mutant("score-decided-one-sided", "hwsplit/splitting/ritz.py",
           "return (eigenvalues - threshold).abs() > z * stderr",
           "return (eigenvalues - threshold) > z * stderr",
           ("tests/test_score_adaptive.py",), "a neuron far below the cut counted as undecided (issue 31)"),
    Mutant("select-cut-layer-price-not-midpoint", "hwsplit/splitting/select.py",
           "layer_price[name] = 0.5 * (ratio[keep - 1] + ratio[keep]) if keep else -math.inf",
           "layer_price[name] = ratio[keep] if keep else -math.inf",
           ("tests/test_score_adaptive.py",), "a binding cap's price at the first neuron left, which it then takes"),
    Mutant("score-recorder-keeps-inplace-function", "hwsplit/splitting/recording.py",
           'node.kwargs = {**node.kwargs, "inplace": False}',
           'node.kwargs = {**node.kwargs, "inplace": True}',
           ("tests/test_score.py",), "the recording forward runs F.relu(..., inplace=True) in place"),
    # -- hwsplit/splitting/surgery.py ------------------------------------------------------------------------------
    Mutant("surgery-children-same-side", "hwsplit/splitting/surgery.py",
           "layer.weight = parameter_like(torch.cat([kept, w[idx] - delta]), layer.weight)",
           "layer.weight = parameter_like(torch.cat([kept, w[idx] + delta]), layer.weight)",
           ("tests/test_surgery.py", "tests/test_score.py"), "both children move by +εv (not ±εv)"),
    Mutant("surgery-consumer-not-halved", "hwsplit/splitting/surgery.py",
           "w[:, cols] *= 0.5",
           "w[:, cols] *= 1.0",
           ("tests/test_surgery.py",), "consumer columns copied without halving: the function changes"),
    # -- hwsplit/splitting/knapsack.py ----------------------------------------------------------------------------
    Mutant("knapsack-repair-drop-order", "hwsplit/splitting/knapsack.py",
           "chosen = _ratio_order(values, costs, np.flatnonzero(mask))[::-1]",
           "chosen = _ratio_order(values, costs, np.flatnonzero(mask))",
           ("tests/test_repair.py", "tests/test_select.py"), "repair drops the BEST ratio first"),
    Mutant("knapsack-greedy-cap-off-by-one", "hwsplit/splitting/knapsack.py",
           "if used + costs[i] <= limit and counts[layer] + 1 <= caps[layer]:",
           "if used + costs[i] <= limit and counts[layer] <= caps[layer]:",
           ("tests/test_select.py", "tests/test_repair.py"), "greedy fill lets a layer exceed its cap by one"),
    Mutant("knapsack-ratio-times", "hwsplit/splitting/knapsack.py",
           "ratio = values[idx] / costs[idx]",
           "ratio = values[idx] * costs[idx]",
           ("tests/test_select.py", "tests/test_repair.py"), "ratio order by λ·c instead of λ/c"),
    # -- FLOPs: hwsplit/network/specs.py (what cost_models/flops.py counts) and the generic marginal --------------
    Mutant("flops-consumer-columns", "hwsplit/network/specs.py",
           "return spec.replace(in_channels=spec.in_channels + columns)",
           "return spec.replace(in_channels=spec.in_channels + 1)",
           ("tests/test_flops.py",), "a consumer behind a flatten gains 1 input feature, not H·W"),
    Mutant("flops-macs-ignore-groups", "hwsplit/network/specs.py",
           "per_pixel = (self.in_channels // self.groups) * self.kernel * self.kernel * self.out_channels",
           "per_pixel = self.in_channels * self.kernel * self.kernel * self.out_channels",
           ("tests/test_flops.py",), "depthwise MACs counted as dense"),
    # -- cost_models/lut.py and the calibrated marginal --------------------------------------------------
    Mutant("lut-edge-slope-wrong-end", "cost_models/lut.py",
           "x0, x1 = (values[-2], values[-1]) if upper else (values[0], values[1])",
           "x0, x1 = (values[0], values[1]) if upper else (values[-2], values[-1])",
           ("tests/test_lut_curved.py", "tests/test_lut.py"), "extrapolation slope from the far end of the grid"),
    Mutant("lut-bilinear-weight", "cost_models/lut.py",
           "return float((1 - t) * ((1 - u) * g[a0, b0] + u * g[a0, b1]) + t * ((1 - u) * g[a1, b0] + u * g[a1, b1]))",
           "return float((1 - t) * ((1 - u) * g[a0, b0] + u * g[a0, b1]) + t * (u * g[a1, b0] + (1 - u) * g[a1, b1]))",
           ("tests/test_lut_curved.py", "tests/test_lut.py"), "bilinear weights swapped in one row of the cell"),
    Mutant("lut-corner-cross-term", "cost_models/lut.py",
           "extrapolated += max(cross, 0.0) / ((i1 - i0) * (o1 - o0)) * (ci - hi_i) * (co - hi_o)",
           "extrapolated += max(cross, 0.0) / ((i1 - i0) * (o1 - o0)) * (ci - hi_i)",
           ("tests/test_lut_curved.py", "tests/test_lut.py"), "cross term beyond the corner linear in one axis"),
    Mutant("cost-marginal-uncalibrated", "cost_models/base.py",
           "out[g.name] = self.calibration.scale * delta",
           "out[g.name] = delta",
           ("tests/test_lut_curved.py", "tests/test_lut.py"), "marginals not scaled like the calibrated total"),
    # -- cost_models/predictor.py ------------------------------------------------------------------------
    Mutant("predictor-overhead-kept", "cost_models/predictor.py",
           "y = np.maximum(raw - overhead, NET_FLOOR * raw)",
           "y = np.maximum(raw, NET_FLOOR * raw)",
           ("tests/test_predictor.py",), "per-layer targets keep the runtime overhead (counted once per layer)"),
    Mutant("predictor-in-elems", "cost_models/predictor.py",
           "float(spec.batch * spec.in_channels * spec.height * spec.width)",
           "float(spec.batch * spec.out_channels * spec.height * spec.width)",
           ("tests/test_predictor.py",), "input-elements term counts output channels"),
    # -- hwsplit/splitting/select.py: fit_plan_to_budget --------------------------------------------------------
    Mutant("grow-fit-drop-best-first", "hwsplit/splitting/select.py",
           "reverse=True)  # worst (least negative per cost) first",
           "reverse=False)  # worst (least negative per cost) first",
           ("tests/test_budget_fit.py",), "budget fitting drops the most valuable neurons first"),
    Mutant("grow-fit-unmeasured-return", "hwsplit/splitting/select.py",
           "        if over <= 1e-9 * max(1.0, abs(budget)) or not items:",
           "        if over <= 1e-9 * max(1.0, abs(budget)) or not items or rounds >= max_rounds:",
           ("tests/test_budget_fit.py",), "gives up after max_rounds with a plan over budget"),
    Mutant("grow-fit-freed-double", "hwsplit/splitting/select.py",
           "            freed += marginal[k]",
           "            freed += 2 * marginal[k]",
           ("tests/test_budget_fit.py",), "counts each dropped neuron's marginal twice"),
    # -- cost_models/profiling/meters.py ---------------------------------------------------------------------------
    Mutant("meters-idle-reset-accepted", "cost_models/profiling/meters.py",
           "if e1 > e0 and t1 > t0:",
           "if t1 > t0:",
           ("tests/test_meters_idle.py", "tests/test_meters.py"), "a counter reset in the idle window gives its power"),
]


def _ignore(directory: str, names: list[str]) -> set[str]:
    skip = {".git", "__pycache__", ".pytest_cache", ".ruff_cache", "runs", ".venv", "build", "dist"}
    out = {n for n in names if n in skip or n.endswith(".egg-info")}
    if Path(directory).resolve() == (ROOT / "bench").resolve():
        out.add("results")  # benchmark outputs: large and never imported by tests
    return out


def _run_tests(copy: Path, tests: list[str], timeout_s: float) -> tuple[int, float, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    env.pop("PYTHONPATH", None)
    t0 = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests],
                              cwd=copy, env=env, capture_output=True, text=True, timeout=timeout_s)
        rc, tail = proc.returncode, (proc.stdout + proc.stderr)[-1500:]
    except subprocess.TimeoutExpired:
        rc, tail = -1, f"timed out after {timeout_s:.0f} s"
    return rc, time.perf_counter() - t0, tail


def run(mutants: list[Mutant], *, timeout_s: float, keep: bool) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="hwsplit-mutants-"))
    copy = tmp / "repo"
    shutil.copytree(ROOT, copy, ignore=_ignore)
    try:
        where = subprocess.run([sys.executable, "-c", "import hwsplit, cost_models; print(hwsplit.__file__); "
                                "print(cost_models.__file__)"], cwd=copy, capture_output=True, text=True, check=True)
        if not all(Path(p).resolve().is_relative_to(copy.resolve()) for p in where.stdout.split()):
            raise SystemExit(f"the copy imports the package from elsewhere:\n{where.stdout}")
        all_tests = sorted({t for m in mutants for t in m.tests})
        rc, baseline_s, tail = _run_tests(copy, all_tests, timeout_s * 4)
        if rc != 0:
            raise SystemExit(f"the unmutated copy fails its tests (rc {rc}); nothing can be called killed:\n{tail}")
        print(f"baseline: {len(all_tests)} test files pass on the unmutated copy ({baseline_s:.0f} s)", flush=True)
        results = []
        for m in mutants:
            path = copy / m.file
            source = path.read_text()
            count = source.count(m.original)
            entry = {**asdict(m), "tests": list(m.tests)}
            if count != 1:
                entry.update(status="stale" if count == 0 else "ambiguous", occurrences=count, seconds=0.0)
            else:
                path.write_text(source.replace(m.original, m.replacement))
                try:
                    rc, seconds, tail = _run_tests(copy, list(m.tests), timeout_s)
                finally:
                    path.write_text(source)
                entry.update(status="survived" if rc == 0 else "killed", returncode=rc, seconds=round(seconds, 1))
                failed = [line.split(" - ")[0][len("FAILED "):] for line in tail.splitlines()
                          if line.startswith("FAILED ")]
                if failed:
                    entry["killed_by"] = failed[0]
                if rc == 0:
                    entry["output_tail"] = tail
                elif rc not in (1, -1):  # not an ordinary test failure (2: collection error, import error)
                    entry["note"] = tail.strip().splitlines()[-1] if tail.strip() else ""
            results.append(entry)
            print(f"{entry['status']:>9}  {m.id}  ({entry['seconds']:.0f} s)", flush=True)
        return {"results": results, "baseline_seconds": round(baseline_s, 1)}
    finally:
        if keep:
            print(f"copy kept at {copy}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", action="append", help="run only this mutant id (repeatable)")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    parser.add_argument("--timeout-s", type=float, default=300.0, help="per mutant")
    parser.add_argument("--keep", action="store_true", help="keep the temporary copy")
    parser.add_argument("--out", default=str(OUT))
    args = parser.parse_args()
    ids = [m.id for m in MUTANTS]
    if len(set(ids)) != len(ids):
        raise SystemExit("mutant ids must be unique")
    if args.list:
        for m in MUTANTS:
            print(f"{m.id:36s} {m.file:26s} {m.why}")
        return
    chosen = [m for m in MUTANTS if not args.only or m.id in args.only]
    if args.only and len(chosen) != len(set(args.only)):
        raise SystemExit(f"unknown mutant id among {args.only}")
    from common import machine, machine_line, now  # bench/common.py (this script's folder is on sys.path)

    # the commit tested: the tree as it is now (uncommitted edits to tracked files are flagged)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                                capture_output=True, text=True).stdout.strip())
    t0 = time.perf_counter()
    out = run(chosen, timeout_s=args.timeout_s, keep=args.keep)
    counts = {s: sum(r["status"] == s for r in out["results"]) for s in ("killed", "survived", "stale", "ambiguous")}
    info = machine()
    report = {"command": "python " + " ".join(["bench/mutants.py", *sys.argv[1:]]), "date": now(),
              "machine": machine_line(info), "loadavg": info.get("loadavg"), "commit": commit,
              "working_tree_modified": dirty, "n_mutants": len(chosen), **counts,
              "wall_s": round(time.perf_counter() - t0, 1), **out}
    survivors = [r["id"] for r in out["results"] if r["status"] == "survived"]
    stale = [r["id"] for r in out["results"] if r["status"] in ("stale", "ambiguous")]
    if args.only:
        print("(--only: bench/results/mutants.json not written)" if args.out == str(OUT) else "")
    if not args.only or args.out != str(OUT):
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
        print(f"wrote {args.out}")
    print(f"{counts['killed']} killed, {counts['survived']} survived, {counts['stale'] + counts['ambiguous']} stale "
          f"of {len(chosen)} mutants")
    for name in survivors:
        print(f"SURVIVED: {name}")
    for name in stale:
        print(f"STALE: {name} (pattern not found exactly once; update bench/mutants.py)")
    if survivors or stale:
        sys.exit(1)


if __name__ == "__main__":
    main()
