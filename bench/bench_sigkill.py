"""Random SIGKILLs of a small digits ``grow``, then ``--resume``: is the result the uninterrupted run?

One uninterrupted reference run, then ``--kills`` trials: each starts the same ``grow`` (same
seed, same settings), SIGKILLs it in a random stage (uniform) at a random moment of it
(uniform over 95 % of the reference's time for that stage, counted from the previous stage's
record, or from config.json for the seed), resumes it with ``grow --resume`` and
compares with the reference: ``stages.jsonl`` records minus timing fields (``seconds`` and the
end-to-end ``measured`` block) must be equal, and every tensor of every ``stage-K.pt``
bit-identical.

    taskset -c 0 nice -n 10 python bench/bench_sigkill.py            # 10 kills
    taskset -c 0 nice -n 10 python bench/bench_sigkill.py --kills 3  # fewer

Resumable: each finished trial is written to ``bench/results/sigkill.json`` at once and skipped on
a second invocation with the same settings. Not timing-sensitive (the kill moment is random anyway);
one thread everywhere.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
RESULT = ROOT / "bench" / "results" / "sigkill.json"
SETTINGS = ["--model", "mobilenet_v1", "--stages", "2", "--epochs", "1", "--limit", "200", "--batch-size", "32",
            "--seed", "3"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
#: Record fields that depend on wall time, not on the computation.
TIMING_FIELDS = ("seconds", "measured")


def _grow(*args: str, wait: bool = True) -> subprocess.Popen | subprocess.CompletedProcess:
    cmd = [sys.executable, str(ROOT / "cli.py"), "grow", *args]
    if wait:
        return subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True)
    return subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _started(proc: subprocess.Popen, out: Path) -> float:
    """When the run began writing ``out`` (its config.json appeared), on the monotonic clock."""
    while not (out / "config.json").exists() and proc.poll() is None:
        time.sleep(0.01)
    return time.monotonic()


def _records(run: Path) -> list[dict[str, Any]]:
    path = run / "stages.jsonl"
    if not path.exists():
        return []
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING_FIELDS}
            for line in path.read_text().splitlines() if line.strip()]


def compare(run: Path, reference: Path) -> list[str]:
    """What differs between two run directories (empty: identical minus timings)."""
    import torch

    from hwsplit.network.checkpoint import load_checkpoint

    problems = []
    got, want = _records(run), _records(reference)
    if got != want:
        stages = [r.get("stage") for r in got]
        differ = [i for i, (a, b) in enumerate(zip(got, want)) if a != b]
        problems.append(f"records differ (stages {stages}, differing at {differ})")
    names = sorted(p.name for p in run.glob("stage-*.pt"))
    if names != sorted(p.name for p in reference.glob("stage-*.pt")):
        problems.append(f"checkpoints {names}")
    for name in names:
        if not (reference / name).exists():
            continue
        x = load_checkpoint(run / name)["state_dict"]
        y = load_checkpoint(reference / name)["state_dict"]
        if x.keys() != y.keys() or not all(torch.equal(x[k], y[k]) for k in x):
            problems.append(f"{name} tensors differ")
    if list(run.glob(".*.tmp")):
        problems.append("temporary files left")
    return problems


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill moments")
    args = parser.parse_args()
    state: dict[str, Any] = json.loads(RESULT.read_text()) if RESULT.exists() else {}
    if state.get("settings") != SETTINGS or state.get("kill_seed") != args.seed:
        state = {"settings": SETTINGS, "kill_seed": args.seed, "trials": []}
    work = Path(tempfile.mkdtemp(prefix="sigkill-"))
    try:
        reference = work / "reference"
        proc = _grow(*SETTINGS, "--out", str(reference), wait=False)
        marks = [_started(proc, reference)]  # config.json written, then each stage's record
        while proc.poll() is None:
            if len(_records(reference)) >= len(marks):
                marks.append(time.monotonic())
            time.sleep(0.01)
        marks = marks[:len(_records(reference)) + 1] + [time.monotonic()]
        assert proc.returncode == 0, "the reference run failed"
        spans = [b - a for a, b in zip(marks, marks[1:])]  # seconds of each stage (the last: to the end)
        state["reference_stage_s"] = [round(x, 2) for x in spans]
        rng = random.Random(args.seed)
        # a random stage (uniform), then a random moment of it (uniform over the reference's duration)
        stages = [rng.randrange(len(spans) - 1) for _ in range(args.kills)]  # not the tail after the last record
        moments = [(k, rng.uniform(0.0, 0.95) * spans[k]) for k in stages]
        for i, (after, moment) in enumerate(moments):
            if i < len(state["trials"]):
                continue  # done in an earlier invocation
            out = work / f"trial-{i}"
            proc = _grow(*SETTINGS, "--out", str(out), wait=False)
            _started(proc, out)
            while len(_records(out)) < after and proc.poll() is None:  # wait for `after` completed stages
                time.sleep(0.01)
            try:
                proc.wait(timeout=moment)
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
            killed = proc.returncode == -signal.SIGKILL
            completed = [r["stage"] for r in _records(out)]
            if (out / "config.json").exists():
                resumed = _grow("--resume", str(out))
                resume_exit = resumed.returncode
                resume_error = resumed.stderr.strip().splitlines()[-1:] if resumed.returncode else []
            else:  # killed before the run existed: a user starts it again
                resumed = _grow(*SETTINGS, "--out", str(out))
                resume_exit, resume_error = resumed.returncode, []
            problems = compare(out, reference) if resume_exit == 0 else ["resume failed"]
            trial = {"trial": i, "kill_in_stage": after, "kill_after_s": round(moment, 3), "killed": killed,
                     "stages_completed_before_kill": completed, "resume_exit": resume_exit,
                     "resume_error": resume_error, "identical": not problems, "problems": problems}
            state["trials"].append(trial)
            state["identical"] = sum(t["identical"] for t in state["trials"])
            state["killed_mid_run"] = sum(t["killed"] for t in state["trials"])
            state["date"] = time.strftime("%Y-%m-%d", time.gmtime())
            RESULT.parent.mkdir(parents=True, exist_ok=True)
            RESULT.write_text(json.dumps(state, indent=1) + "\n")
            print(json.dumps(trial), flush=True)
            shutil.rmtree(out, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"{state['identical']}/{len(state['trials'])} identical after resume "
          f"({state['killed_mid_run']} killed mid-run); {RESULT}")


if __name__ == "__main__":
    main()
