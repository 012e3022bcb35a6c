"""What a run shows after it is replaced, killed or fine-tuned: nothing stale, interrupted runs said to be,
fine-tunings named by their grown stages, the stop reason printed (issue 29)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from cli import main
from hwsplit.run.guard import KILL_AT_ENV
from hwsplit.run.report import write_report
from hwsplit.run.rundir import RunDir, record_widths, run_status, stage_table

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--stages", "1", "--epochs", "1", "--limit", "200", "--batch-size", "32"]


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "stages.jsonl").read_text().splitlines() if line.strip()]


def _cli(*args: str, code: int = 0) -> str:
    result = CliRunner().invoke(main, list(args))
    assert result.exit_code == code, result.output
    return result.output


def test_overwrite_leaves_nothing_stale(tmp_path):
    out, elsewhere = tmp_path / "grow", tmp_path / "ft-elsewhere"
    _cli("grow", *TINY, "--final-epochs", "1", "--out", str(out))
    _cli("finetune", str(out), "--stage", "1", "--epochs", "1")
    _cli("finetune", str(out), "--stage", "0", "--epochs", "1", "--out", str(elsewhere))
    _cli("export", str(out), "--onnx", str(tmp_path / "last.onnx"))
    _cli("export", str(out / "final"), "--onnx", str(tmp_path / "final.onnx"))
    kept = tmp_path / "changed.onnx"  # exported, then changed by the user: never deleted
    _cli("export", str(out), "--stage", "0", "--onnx", str(kept))
    kept.write_bytes(kept.read_bytes() + b"\0")
    old = _records(out)

    text = _cli("grow", "--stages", "2", "--epochs", "1", "--limit", "200", "--batch-size", "32", "--seed", "1",
                "--overwrite", "--out", str(out))
    assert "stopped:" in text
    assert not (out / "final").exists() and not (out / "finetune").exists()
    assert not (tmp_path / "last.onnx").exists() and not (tmp_path / "final.onnx").exists() and kept.exists()
    new = _records(out)
    assert len(old) == 2 and len(new) == 3
    # report and export show only the new run
    result = write_report([out], tmp_path / "report")
    assert result["runs"] == ["grow"] and len(result["rows"]) == 1 + len(new)
    assert [row[2] for row in result["rows"][1:]] == [f"{100 * r['test_top1']:.2f}" for r in new]
    _cli("export", str(out / "final"), "--onnx", str(tmp_path / "x.onnx"), code=2)
    # a fine-tuning made elsewhere from the replaced run is refused, by report and export alike
    for args in (["report", str(elsewhere), "--out", str(tmp_path / "r2")],
                 ["export", str(elsewhere), "--onnx", str(tmp_path / "y.onnx")]):
        text = _cli(*args, code=2)
        assert "has changed" in text and "Traceback" not in text
    assert not (tmp_path / "y.onnx").exists()


def test_a_killed_run_reads_as_interrupted(tmp_path):
    out = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", KILL_AT_ENV: "stage-1:start"}
    proc = subprocess.run([sys.executable, "cli.py", "grow", *TINY, "--out", str(out)], cwd=ROOT, env=env,
                          capture_output=True, timeout=300)
    assert proc.returncode != 0 and len(_records(out)) == 1
    assert "Status: running" in (out / "summary.md").read_text()  # what the killed process left
    status = run_status(RunDir(out))
    assert status.startswith("interrupted") and f"grow --resume {out}" in status
    text = _cli("summary", str(out))
    assert "interrupted" in text and "grow --resume" in text
    assert "Status: interrupted" in (out / "summary.md").read_text()  # corrected on disk too
    result = write_report([out], tmp_path / "report")
    assert result["status"]["killed"].startswith("interrupted")
    assert "status: interrupted" in (tmp_path / "report" / "table.md").read_text()


def test_a_run_whose_writer_holds_the_lock_is_running(tmp_path):
    run = RunDir(tmp_path / "r")
    run.path.mkdir()
    run.summary.write_text("# hwsplit run\n\nStatus: running\n")
    with run.lock("grow"):
        assert run_status(run) == "running"
    assert run_status(run).startswith("interrupted")


@pytest.fixture(scope="module")
def grown(tmp_path_factory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("lc") / "grow"
    text = _cli("grow", "--stages", "2", "--epochs", "1", "--limit", "200", "--batch-size", "32", "--out", str(out))
    return out, text


def test_grow_prints_why_it_stopped_and_the_table_shows_the_stem(grown):
    out, text = grown
    assert "stopped: stages done" in text
    records = _records(out)
    for r in records:
        widths = record_widths(r)
        assert widths[0] == r["architecture"]["stem_width"] and widths[1:] == r["architecture"]["widths"]
        assert " ".join(map(str, widths)) in text
        assert r["epochs_in_all"] == 1 + r["stage"]
    # a per-stage line gives the MACs once
    lines = [line for line in text.splitlines() if line.startswith("stage 1:")]
    assert lines and lines[0].count("MACs") == 1


def test_finetune_keeps_the_stage_numbers(grown, tmp_path):
    out, _ = grown
    text = _cli("finetune", str(out), "--stage", "2", "--stage", "1", "--epochs", "1", "--out", str(tmp_path / "ft"))
    records = _records(tmp_path / "ft")
    assert [r["stage"] for r in records] == [0, 1] and [r["source_stage"] for r in records] == [2, 1]
    table = text[text.index("stage  "):].splitlines()
    assert [line.split()[0] for line in table[2:4]] == ["2", "1"]
    rows = stage_table(records)
    assert [row[0] for row in rows[1:]] == ["2", "1"]
    assert all(row[rows[0].index("split")] == "-" for row in rows[1:])  # a fine-tuning splits nothing
    result = write_report([out, tmp_path / "ft"], tmp_path / "report")
    header = result["rows"][0]
    ft_rows = [row for row in result["rows"][1:] if row[0] == "ft"]
    assert [row[1] for row in ft_rows] == ["2", "1"]
    grow_rows = [row for row in result["rows"][1:] if row[0] == "grow"]
    assert [row[header.index("epochs in all")] for row in grow_rows] == ["1", "2", "3"]
    assert [row[header.index("epochs in all")] for row in ft_rows] == ["4", "3"]
