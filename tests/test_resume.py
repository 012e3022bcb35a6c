"""Crash safety: a run killed with SIGKILL at any moment resumes to the same stages as an uninterrupted run."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from cli import main
from hwsplit.network.checkpoint import load_checkpoint
from hwsplit.run.guard import KILL_AT_ENV

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--stages", "2", "--epochs", "1", "--limit", "300", "--batch-size", "32"]

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs POSIX signals")


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "stages.jsonl").read_text().splitlines() if line.strip()]


def _cli(*args: str) -> None:
    result = CliRunner().invoke(main, list(args))
    assert result.exit_code == 0, result.output


def _spawn(out: Path, kill_at: str | None = None) -> subprocess.Popen:
    # one thread, like the in-process reference (tests/conftest.py), so float sums happen in the same order
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    env.pop(KILL_AT_ENV, None)
    if kill_at:
        env[KILL_AT_ENV] = kill_at
    return subprocess.Popen([sys.executable, "cli.py", "grow", *TINY, "--out", str(out)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def assert_same_run(run: Path, reference: Path) -> None:
    """Same stages, architectures, records that do not depend on time, and bitwise equal weights."""
    got, want = _records(run), _records(reference)
    assert [r["stage"] for r in got] == [r["stage"] for r in want]
    for a, b in zip(got, want):
        assert a["architecture"] == b["architecture"], a["stage"]
        for key in ("widths", "split", "test_top1", "test_loss", "train_loss", "macs", "cost"):
            assert a.get(key) == b.get(key), (a["stage"], key)
        x = load_checkpoint(run / f"stage-{a['stage']}.pt")["state_dict"]
        y = load_checkpoint(reference / f"stage-{a['stage']}.pt")["state_dict"]
        assert x.keys() == y.keys()
        assert all(torch.equal(x[k], y[k]) for k in x), f"stage {a['stage']} weights differ"
    assert not list(run.glob(".*.tmp"))
    assert sorted(p.name for p in run.glob("stage-*.pt")) == sorted(p.name for p in reference.glob("stage-*.pt"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ref") / "grow"
    _cli("grow", *TINY, "--out", str(out))
    assert [r["stage"] for r in _records(out)] == [0, 1, 2]
    return out


def _wait_for_stage_0(proc: subprocess.Popen, out: Path) -> None:
    deadline = time.monotonic() + 120
    while not ((out / "stages.jsonl").exists() and _records(out)):
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.monotonic() < deadline, "stage 0 took more than 2 minutes"
        time.sleep(0.02)


def test_killed_runs_resume_to_the_same_run(tmp_path, reference):
    """Two runs at once: one killed at a random moment after stage 0, one between a checkpoint and its record."""
    at_random, at_point = tmp_path / "random", tmp_path / "point"
    point = _spawn(at_point, kill_at="stage-2:checkpoint")
    # The kill must land mid-run: the process still alive (killed by the signal, exit status -9) and the
    # final record not written. A run that finished first is tried again with a shorter delay.
    for attempt in range(4):
        proc = _spawn(at_random)
        _wait_for_stage_0(proc, at_random)
        delay = random.uniform(0.0, 1.0) / 2 ** attempt  # the rest of the run takes 1.5-3.5 s on 2 shared cores
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=120)
        completed = [r["stage"] for r in _records(at_random)]
        if proc.returncode == -signal.SIGKILL and completed[-1] < 2:
            break
        shutil.rmtree(at_random)
    else:
        pytest.fail(f"4 runs ended before a kill {delay:.3f} s after stage 0 could land (status {proc.returncode})")
    summary = at_random / "summary.md"
    assert not summary.exists() or "stopped: stages done" not in summary.read_text()
    point.communicate(timeout=120)
    assert point.returncode == -signal.SIGKILL, point.returncode
    # the checkpoint of stage 2 is on disk, its record is not: the stage is redone on resume
    assert [r["stage"] for r in _records(at_point)] == [0, 1] and (at_point / "stage-2.pt").exists()
    for out in (at_point, at_random):
        _cli("grow", "--resume", str(out))
        try:
            assert_same_run(out, reference)
        except AssertionError as err:
            what = f"killed {delay:.3f} s after stage 0 ({completed} complete)" if out == at_random else "at stage-2"
            raise AssertionError(f"{what}: {err}") from err
        assert "stopped: stages done" in (out / "summary.md").read_text()


def test_resume_discards_partial_files_and_extends_a_run(tmp_path, reference):
    # A run of 1 stage, plus debris of an interrupted stage 2: an orphan checkpoint and a temporary file.
    out = tmp_path / "grow"
    _cli("grow", *TINY[2:], "--stages", "1", "--out", str(out))
    shutil.copy(reference / "stage-1.pt", out / "stage-2.pt")
    (out / ".stage-2.pt.abc123.tmp").write_bytes(b"half a checkpoint")
    # --stages may extend a run: resuming to 2 stages gives the 2-stage run
    _cli("grow", "--resume", str(out), "--stages", "2")
    assert_same_run(out, reference)
    assert json.loads((out / "config.json").read_text())["stages"] == 2
    # resuming a finished run changes nothing
    before = (out / "stages.jsonl").read_text()
    _cli("grow", "--resume", str(out))
    assert (out / "stages.jsonl").read_text() == before


def test_resume_truncates_records_whose_checkpoint_is_missing(tmp_path, reference):
    out = tmp_path / "grow"
    shutil.copytree(reference, out)
    (out / "stage-1.pt").unlink()  # records 1 and 2 can no longer be trusted
    _cli("grow", "--resume", str(out))
    assert_same_run(out, reference)


@pytest.mark.parametrize("args, message", [
    (["--lr", "0.5"], "--lr cannot be combined"),
    (["--out", "elsewhere"], "--out cannot be combined"),
])
def test_resume_refuses_other_settings(reference, args, message):
    result = CliRunner().invoke(main, ["grow", "--resume", str(reference), *args])
    assert result.exit_code == 2 and message in result.output, result.output


def test_resume_of_something_that_is_not_a_run(tmp_path):
    result = CliRunner().invoke(main, ["grow", "--resume", str(tmp_path)])
    assert result.exit_code == 2 and "config.json" in result.output, result.output
    result = CliRunner().invoke(main, ["grow", "--resume", str(tmp_path / "missing")])
    assert result.exit_code == 2 and "not a run directory" in result.output, result.output


def test_a_stage_killed_after_an_epoch_resumes_from_that_epoch(tmp_path):
    """A 3-epoch stage killed after its 2nd epoch keeps partial-1.pt and resumes from it: the weights are the
    uninterrupted run's, bit for bit, and the partial file is gone once the stage is durable."""
    args = ["--stages", "1", "--epochs", "3", "--seed-epochs", "1", "--limit", "300", "--batch-size", "32"]
    reference, killed = tmp_path / "ref", tmp_path / "killed"
    _cli("grow", *args, "--out", str(reference))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", KILL_AT_ENV: "stage-1:epoch-1"}
    proc = subprocess.run([sys.executable, "cli.py", "grow", *args, "--out", str(killed)], cwd=ROOT, env=env,
                          capture_output=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    state = torch.load(killed / "partial-1.pt", weights_only=True)
    assert state["epochs_done"] == 2 and len(state["epochs"]) == 2
    _cli("grow", "--resume", str(killed))
    assert_same_run(killed, reference)
    assert not list(killed.glob("partial-*.pt"))


def test_a_run_made_before_the_layout_move_still_loads_and_resumes(tmp_path):
    """tests/fixtures/run_6f3b5be: a 1-stage MLP run written by main 6f3b5be (before the folder move and the
    selection, scoring and TensorBoard settings). Run directories store no module paths: it resumes to 2 stages
    with its records kept, and summary and report read it."""
    run = tmp_path / "old"
    shutil.copytree(ROOT / "tests" / "fixtures" / "run_6f3b5be", run)
    before = _records(run)
    _cli("grow", "--resume", str(run), "--stages", "2")
    after = _records(run)
    assert [r["stage"] for r in after] == [0, 1, 2]
    assert after[:2] == before
    assert json.loads((run / "config.json").read_text())["stages"] == 2
    x = load_checkpoint(run / "stage-1.pt")
    assert x["architecture"] == before[1]["architecture"]
    _cli("summary", str(run))
    _cli("report", str(run), "--out", str(tmp_path / "report"))
